"""The demo world: deterministic, in the real formats of docs/DESIGN.md §6, and its labels match its pixels."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from PIL import Image
import numpy as np
from pycocotools.coco import COCO
import pytest

from xlearner import expand, squeeze
from xlearner.configfile import load_config
from xlearner.formats import check_data
from xlearner.tools.demo import generate
from xlearner.tools.shapes import COLORS, NOVEL, PATTERNS, UPSTREAM
from xlearner.tools.worlds import SPECS, STANDIN_SPECS

from runner import REPO


COCO_SOURCES = [s.name for s in SPECS if s.fmt == "coco"]
MASK_SOURCES = [s.name for s in SPECS if s.fmt == "masks"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int16)
    return rgb.max(-1) - rgb.min(-1)


# ----------------------------------------------------------------------------
# determinism


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    generate(tmp_path / "a", seed=3, scale=0.02, workers=1)
    generate(tmp_path / "b", seed=3, scale=0.02, workers=2)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) > 100
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


@pytest.mark.slow
def test_downstream_scale_grows_only_the_downstream_sets(tmp_path):
    """The ablation's world (make paper-table: --downstream-scale 5): the same upstream bytes, larger downstream."""
    small = generate(tmp_path / "a", seed=0, scale=0.1, workers=1)
    big = generate(tmp_path / "b", seed=0, scale=0.1, workers=1, downstream_scale=3)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    upstream = [s.name for s in SPECS if small[s.name]["role"] == "upstream"]
    assert len(upstream) == 5
    for name in upstream:
        assert {k: v for k, v in a.items() if k.startswith(name + "/")} == {
            k: v for k, v in b.items() if k.startswith(name + "/")}
    for spec in SPECS:
        if small[spec.name]["role"] == "downstream":  # e.g. novel-cls: 400 x 0.1 = 40 -> 120 train images
            assert big[spec.name]["train"] == round(spec.n_train * 0.3) == 3 * small[spec.name]["train"]
            assert big[spec.name]["val"] == round(spec.n_val * 0.3)


def test_another_seed_another_world(tmp_path):
    generate(tmp_path / "a", seed=0, scale=0.02, workers=1)
    generate(tmp_path / "b", seed=1, scale=0.02, workers=1)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    common = [k for k in a if k in b and k.endswith(".png")]
    assert common
    differ = sum(a[k] != b[k] for k in common)
    assert differ > 0.9 * len(common)
    assert a["shapes-det/train.json"] != b["shapes-det/train.json"]


def test_regenerating_replaces_the_old_world(tmp_path):
    out = tmp_path / "w"
    generate(out, seed=0, scale=0.02, workers=1)
    stale = out / "shapes-cls" / "train" / "circle" / "99999.png"
    stale.write_bytes(b"not a png")
    generate(out, seed=0, scale=0.02, workers=1)
    assert not stale.exists()
    assert (out / ".complete").is_file()


# ----------------------------------------------------------------------------
# the summary and the marker


def test_summary_matches_the_files(demo_world):
    world = json.loads((demo_world / "world.json").read_text())
    assert world["seed"] == 0 and world["scale"] == 0.05
    assert (demo_world / ".complete").is_file()
    readme = (demo_world / "README.txt").read_text()
    for spec in SPECS:
        info = world["sources"][spec.name]
        assert spec.name in readme
        for split in ("train", "val"):
            root = demo_world / spec.name
            if spec.fmt == "imagefolder":
                n = len(list((root / split).glob("*/*.png")))
            elif spec.fmt == "csv":
                n = len(list((root / "images" / split).glob("*.png")))
            elif spec.fmt == "coco":
                n = len(list((root / split).glob("*.png")))
            else:
                n = len(list((root / split / "images").glob("*.png")))
                assert len(list((root / split / "masks").glob("*.png"))) == n
            assert n == info[split] > 0, (spec.name, split)


# ----------------------------------------------------------------------------
# formats


@pytest.mark.parametrize("name,classes", [
    ("shapes-cls", UPSTREAM), ("novel-cls", NOVEL), ("count-cls", ("1", "2", "3", "4", "5"))])
def test_imagefolder_classes(demo_world, name, classes):
    for split in ("train", "val"):
        root = demo_world / name / split
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        assert found == sorted(classes)
        for c in found:
            images = list((root / c).glob("*.png"))
            assert len(images) >= 3, f"{root / c} has {len(images)} images"
            with Image.open(images[0]) as im:
                assert im.size == (64, 64) and im.mode == "RGB"


def test_texture_csv(demo_world):
    root = demo_world / "texture-cls"
    for split in ("train", "val"):
        with open(root / f"{split}.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["path", "label"]
        labels = [lab for _, lab in rows[1:]]
        assert sorted(set(labels)) == sorted(PATTERNS)
        for path, _ in rows[1:]:
            assert (root / path).is_file(), path  # relative to the csv


@pytest.mark.parametrize("name", COCO_SOURCES)
def test_coco_json_and_boxes(demo_world, name):
    for split in ("train", "val"):
        coco = COCO(str(demo_world / name / f"{split}.json"))
        cat_ids = sorted(coco.getCatIds())
        assert cat_ids != list(range(1, len(cat_ids) + 1)), "ids should be non-contiguous on purpose"
        assert coco.getAnnIds(), "every split has some boxes"
        for img in coco.loadImgs(coco.getImgIds()):
            with Image.open(demo_world / name / split / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"])
        for ann in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = ann["bbox"]
            img = coco.imgs[ann["image_id"]]
            assert w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
            assert ann["category_id"] in cat_ids and ann["iscrowd"] == 0
            assert 0 < ann["area"] <= w * h


def test_colour_boxes_hold_their_colour(demo_world):
    """A colors-det box is the tight box of a visible object: much of it has the category's colour."""
    root = demo_world / "colors-det"
    coco = COCO(str(root / "train.json"))
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], np.float32)
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.imgs[ann["image_id"]]
        rgb = np.asarray(Image.open(root / "train" / img["file_name"]), np.float32)
        x, y, w, h = ann["bbox"]
        pix = rgb[y:y + h, x:x + w].reshape(-1, 1, 3)
        dist = np.linalg.norm(pix - palette[None], axis=2)
        want = names.index(coco.cats[ann["category_id"]]["name"])
        match = (dist.argmin(1) == want) & (dist.min(1) < 60)
        assert match.mean() > 0.1, (img["file_name"], ann)


@pytest.mark.parametrize("name,num_classes", [("shapes-seg", 9), ("novel-seg", 5)])
def test_masks_match_images(demo_world, name, num_classes):
    seen = set()
    for split in ("train", "val"):
        for path in sorted((demo_world / name / split / "images").glob("*.png")):
            mask_img = Image.open(path.parent.parent / "masks" / path.name)
            assert mask_img.mode == "L"
            mask = np.asarray(mask_img)
            rgb = np.asarray(Image.open(path))
            assert mask.shape == rgb.shape[:2] == (128, 128)
            assert mask.max() < num_classes
            seen |= set(np.unique(mask).tolist())
            # objects are saturated colours on near-grey backgrounds: masks must sit on the objects
            sat = _saturation(rgb)
            assert sat[mask == 0].mean() < 40
            if (mask > 0).any():
                assert sat[mask > 0].mean() > 80
    assert 0 in seen and len(seen) > 2


# ----------------------------------------------------------------------------
# the upstream / downstream split of shapes


def test_novel_shapes_never_upstream(demo_world):
    assert not set(NOVEL) & set(UPSTREAM) and len(NOVEL) >= 4 and len(UPSTREAM) == 8
    world = json.loads((demo_world / "world.json").read_text())["sources"]
    for name in ("novel-cls", "novel-det", "novel-seg"):
        assert set(world[name]["classes"]) == set(NOVEL), name
    novel_cats = {c["name"] for c in json.loads((demo_world / "novel-det" / "train.json").read_text())["categories"]}
    assert novel_cats == set(NOVEL)
    for name in ("shapes-cls", "shapes-det", "shapes-seg"):
        assert set(world[name]["classes"]) == set(UPSTREAM), name
    assert set(world["colors-det"]["classes"]) == set(COLORS)


# ----------------------------------------------------------------------------
# the demo config


def test_demo_config_loads_and_points_into_the_world(demo_config, demo_world):
    assert load_config(REPO / "configs" / "demo.toml").sources  # as shipped
    names = [s.name for s in demo_config.sources]
    assert names == ["shapes-cls", "texture-cls", "shapes-det", "colors-det", "shapes-seg"]
    assert [d.name for d in demo_config.transfer.datasets] == ["novel-cls", "count-cls", "novel-det", "novel-seg"]
    for src in demo_config.sources + demo_config.transfer.datasets:
        for key in ("train", "val", "train_ann", "val_ann"):
            value = getattr(src, key)
            if value:
                assert Path(value).exists(), (src.name, key, value)
                assert str(demo_world) in value
    assert str(demo_world) not in demo_config.expand.out and "runs" in demo_config.expand.out

# ----------------------------------------------------------------------------
# The full-size stand-in world and the ResNet-50 recipe on it (docs/OPERATIONS.md, "Full scale").

RECIPE = REPO / "configs" / "xlearner_r50.toml"
SETS = REPO / "configs" / "standin.sets"


def standin_sets(world: Path) -> list[str]:
    """configs/standin.sets, then data_root = `world` (the last --set wins)."""
    lines = [ln.strip() for ln in SETS.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return lines + [f'data_root="{world}"']


@pytest.fixture(scope="module")
def world(make_world) -> Path:
    return make_world(0.02, "standin")  # 3 images per cls class, 4 per det/seg split




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
    stage.append("squeeze.norm_steps=1")  # the teacher's statistics from 1 batch, not 20 passes of 3 ResNet-50s
    no_eval = [f'sources.{s.name}.val=""' for s in STANDIN_SPECS]  # evaluation is the demo tests' business
    cpu = ["model.channels_last=false"]  # a GPU memory format: on a CPU it doubles the ResNet-50 step (measured)
    # the heads at scripts/gpu_check.sh's tiny sizes (torchvision's defaults suit 800 px images, not 64 px)
    cpu += ["model.fpn_channels=64", "model.box_batch_size_per_image=64", "model.box_head_dim=256",
            "model.rpn_pre_nms_top_n=300", "model.rpn_post_nms_top_n=150", "model.seg_channels=64"]
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
