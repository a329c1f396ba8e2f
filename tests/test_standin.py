"""The full-size stand-in world and the ResNet-50 recipe on it (README, "Full scale").

`demo-data --world standin` writes configs/xlearner_r50.toml's six sources at
their real sizes and file types; configs/standin.sets points the recipe at it.
These tests check the world, that the recipe reads it with the real readers,
and that one expand step and one squeeze step of the recipe's structure (three
ResNet-50 branches, all six sources, detection included) run on a CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from xlearner import expand, squeeze
from xlearner.config import load_config
from xlearner.datasets import check_data
from xlearner.tools.demo import STANDIN_SPECS, generate

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "xlearner_r50.toml"
SETS = REPO / "configs" / "standin.sets"


def standin_sets(world: Path) -> list[str]:
    """configs/standin.sets, its data/standin prefix replaced by `world`."""
    lines = [ln.strip() for ln in SETS.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return [ln.replace('"data/standin/', f'"{world}/') for ln in lines]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("standin")
    generate(out, seed=0, scale=0.02, world="standin")  # 3 images per cls class, 4 per det/seg split
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_standin_is_deterministic_whatever_the_workers(tmp_path, world):
    generate(tmp_path / "w1", seed=0, scale=0.02, workers=1, world="standin")
    a, b = _files(world), _files(tmp_path / "w1")
    assert len(a) > 100 and a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_standin_has_the_real_sizes_formats_and_label_spaces(world):
    info = json.loads((world / "world.json").read_text())["sources"]
    assert sorted(info) == sorted(["imagenet", "places365", "inat2021", "coco", "objects365", "ade20k"])
    sizes = {"imagenet": (500, 375), "places365": (500, 375), "inat2021": (500, 375),
             "coco": (640, 480), "objects365": (640, 480), "ade20k": (512, 512)}
    for spec in STANDIN_SPECS:
        images = sorted((world / spec.name / "train").rglob(f"*{spec.ext}"))
        assert len(images) == info[spec.name]["train"] > 0, spec.name
        with Image.open(images[0]) as im:
            assert (im.format, im.size, im.mode) == ("JPEG", sizes[spec.name], "RGB"), spec.name
    assert len(list((world / "imagenet" / "train").glob("*/*.JPEG"))) == info["imagenet"]["train"]
    for name, n in (("coco", 80), ("objects365", 365)):
        coco = json.loads((world / name / "train.json").read_text())
        assert len(coco["categories"]) == n
        per_image = [sum(a["image_id"] == img["id"] for a in coco["annotations"]) for img in coco["images"]]
        assert sum(per_image) >= 2 * len(per_image)  # several boxes an image
    mask = world / "ade20k" / "train" / "masks" / "00000.png"
    with Image.open(mask) as m:
        assert (m.format, m.size, m.mode) == ("PNG", (512, 512), "L")
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
    assert check_data(cfg.sources) == []  # every image decodes with the real readers


def test_recipe_one_expand_and_one_squeeze_step_on_cpu(world, tmp_path):
    """The recipe's structure: 3 x ResNet-50 with hrnet RLs, 6 sources, det included; small images and batches."""
    small = [f"sources.{n}.{k}" for n in ("imagenet", "places365", "inat2021") for k in ("image_size=32", "batch_size=2",
                                                                                           "num_classes=0")]
    small += [f"sources.{n}.{k}" for n in ("coco", "objects365", "ade20k") for k in ("image_size=64", "batch_size=2")]
    stage = [f"{st}.{k}" for st in ("expand", "squeeze") for k in ("steps=1", "workers=0", 'amp="off"', "log_every=1")]
    no_eval = [f'sources.{s.name}.val=""' for s in STANDIN_SPECS]  # evaluation is the demo tests' business
    cpu = ["model.channels_last=false"]  # a GPU memory format: on a CPU it doubles the ResNet-50 step (measured)
    cfg = load_config(RECIPE, standin_sets(world) + small + stage + no_eval + cpu + [
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
