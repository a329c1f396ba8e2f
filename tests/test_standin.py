"""The full-size stand-in world and the ResNet-50 recipe on it (docs/OPERATIONS.md, "Full scale").

`demo-data --world standin` writes configs/xlearner_r50.toml's six sources at
their real sizes and file types, in the real datasets' layouts (ImageNet, Places365,
iNaturalist, COCO 2017, Objects365, ADEChallengeData2016); configs/standin.sets points
the recipe at it by data_root alone. These tests check the world, that the recipe
reads it with the real readers, and that one expand step and one squeeze step of the
recipe's structure (three ResNet-50 branches, all six sources, detection included)
run on a CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runner import REPO
from xlearner import expand, squeeze
from xlearner.configfile import load_config
from xlearner.formats import check_data
from xlearner.tools.demo import STANDIN_SPECS, generate

RECIPE = REPO / "configs" / "xlearner_r50.toml"
SETS = REPO / "configs" / "standin.sets"


def standin_sets(world: Path) -> list[str]:
    """configs/standin.sets, then data_root = `world` (the last --set wins)."""
    lines = [ln.strip() for ln in SETS.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return lines + [f'data_root="{world}"']


@pytest.fixture(scope="module")
def world(make_world) -> Path:
    return make_world(0.02, "standin")  # 3 images per cls class, 4 per det/seg split


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_standin_is_deterministic_whatever_the_workers(tmp_path, world):
    generate(tmp_path / "w1", seed=0, scale=0.02, workers=1, world="standin")
    a, b = _files(world), _files(tmp_path / "w1")
    assert len(a) > 100 and a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


# each source's train images and one file of each kind, where its dataset puts them
LAYOUT = {
    "imagenet": ("imagenet/train/*/*.JPEG", "imagenet/val/n00000000/ILSVRC2012_val_00000001.JPEG"),
    "places365": ("places365_standard/train/*/*.jpg", "places365_standard/val/checker/Places365_val_00000001.jpg"),
    "inat2021": ("inat2021/train_mini/*/*.jpg", "inat2021/val/00000_Standin_count_1/00000001.jpg"),
    "coco": ("coco/train2017/*.jpg", "coco/annotations/instances_val2017.json"),
    "objects365": ("objects365/train/patch0/*.jpg", "objects365/annotations/zhiyuan_objv2_val.json"),
    "ade20k": ("ADEChallengeData2016/images/training/*.jpg",
               "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png"),
}


def test_standin_is_written_in_the_real_layouts(world):
    info = json.loads((world / "world.json").read_text())["sources"]
    assert sorted(info) == sorted(LAYOUT)
    sizes = {"imagenet": (500, 375), "places365": (500, 375), "inat2021": (500, 375),
             "coco": (640, 480), "objects365": (640, 480), "ade20k": (512, 512)}
    for spec in STANDIN_SPECS:
        pattern, one_file = LAYOUT[spec.name]
        images = sorted(world.glob(pattern))
        assert len(images) == info[spec.name]["train"] > 0, spec.name
        assert (world / one_file).is_file(), one_file
        with Image.open(images[0]) as im:
            assert (im.format, im.size, im.mode) == ("JPEG", sizes[spec.name], "RGB"), spec.name
    assert sorted(p.name for p in (world / "imagenet" / "train").iterdir()) == [f"n{k:08d}" for k in range(8)]
    assert (world / "imagenet" / "train" / "n00000000" / "n00000000_1.JPEG").is_file()
    assert (world / "coco" / "train2017" / "000000000001.jpg").is_file()
    for name, ann, n in (("coco", "coco/annotations/instances_train2017.json", 80),
                         ("objects365", "objects365/annotations/zhiyuan_objv2_train.json", 365)):
        coco = json.loads((world / ann).read_text())
        assert len(coco["categories"]) == n
        per_image = [sum(a["image_id"] == img["id"] for a in coco["annotations"]) for img in coco["images"]]
        assert sum(per_image) >= 2 * len(per_image)  # several boxes an image
        image_dir = Path(ann).parts[0] + "/" + ("train2017" if name == "coco" else "train")
        assert all((world / image_dir / img["file_name"]).is_file() for img in coco["images"])
    masks = sorted((world / "ADEChallengeData2016" / "annotations" / "training").glob("*.png"))
    assert [m.stem for m in masks] == [f"ADE_train_{n:08d}" for n in range(1, len(masks) + 1)]
    with Image.open(masks[0]) as m:
        assert (m.format, m.size, m.mode) == ("PNG", (512, 512), "L")
        values = set(np.unique(np.asarray(m)).tolist())
    assert 0 in values and values <= set(range(9))  # 0 = other, 1..8 the drawn shapes
    assert info["ade20k"]["num_classes"] == 150


def test_standin_sets_point_the_unchanged_recipe_at_the_world(world):
    cfg = load_config(RECIPE, standin_sets(world))
    assert [s.name for s in cfg.sources] == ["imagenet", "places365", "inat2021", "coco", "objects365", "ade20k"]
    assert {s.name: s.num_classes for s in cfg.sources} == {
        "imagenet": 1000, "places365": 365, "inat2021": 10000, "coco": 0, "objects365": 0, "ade20k": 150}
    recipe = load_config(RECIPE)  # everything but the paths, class counts and run dirs is the recipe's
    for key in ("image_size", "batch_size", "weight", "task", "format"):
        assert [getattr(s, key) for s in cfg.sources] == [getattr(s, key) for s in recipe.sources]
    assert cfg.model == recipe.model
    for s, r in zip(cfg.sources, recipe.sources):  # data_root moved every path, and changed nothing else in it
        for key in ("train", "val", "train_ann", "val_ann"):
            assert getattr(s, key) == getattr(r, key).replace(recipe.data_root, str(world), 1), (s.name, key)
    keys = {ln.split("=")[0] for ln in standin_sets(world)}
    assert keys == {"data_root", "sources.imagenet.num_classes", "sources.places365.num_classes",
                    "sources.inat2021.num_classes", "expand.out", "squeeze.out"}
    assert check_data(cfg.sources) == []  # every image decodes with the real readers


@pytest.mark.slow
def test_recipe_one_expand_and_one_squeeze_step_on_cpu(world, tmp_path):
    """The recipe's structure: 3 x ResNet-50 with hrnet RLs, 6 sources, det included; small images and batches.
    The recipe reads the world with only data_root changed (the rest are CPU sizes)."""
    small = [f"sources.{n}.{k}" for n in ("imagenet", "places365", "inat2021") for k in ("image_size=32", "batch_size=2",
                                                                                           "num_classes=0")]
    small += [f"sources.{n}.{k}" for n in ("coco", "objects365", "ade20k") for k in ("image_size=64", "batch_size=2")]
    stage = [f"{st}.{k}" for st in ("expand", "squeeze") for k in ("steps=1", "workers=0", 'amp="off"', "log_every=1")]
    no_eval = [f'sources.{s.name}.val=""' for s in STANDIN_SPECS]  # evaluation is the demo tests' business
    cpu = ["model.channels_last=false"]  # a GPU memory format: on a CPU it doubles the ResNet-50 step (measured)
    cfg = load_config(RECIPE, [f'data_root="{world}"'] + small + stage + no_eval + cpu + [
        f'expand.out="{tmp_path / "expand"}"', f'squeeze.out="{tmp_path / "squeeze"}"'])
    assert cfg.model.arch == "resnet50" and len({s.task for s in cfg.sources}) == 3
    ckpt = expand.run(cfg)
    log = [json.loads(ln) for ln in (tmp_path / "expand" / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if r["event"] == "train"]
    assert [r["step"] for r in train] == [1]
    assert sorted(train[0]["losses"]) == sorted(s.name for s in cfg.sources)
    backbone = squeeze.run(cfg, ckpt)
    assert backbone.is_file()
    log = [json.loads(ln) for ln in (tmp_path / "squeeze" / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if r["event"] == "train"]
    assert [r["step"] for r in train] == [1]
    assert {k.split("/")[0] for k in train[0]["losses"]} == {s.name for s in cfg.sources}
