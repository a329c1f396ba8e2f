"""Tests of the multi-source loader (xlearner/data.py) and the readers (xlearner/formats/).

Every test writes its own tiny data into tmp_path (PNGs, JSON, CSV, idx files):
nothing is downloaded, and nothing depends on the demo world.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xlearner.tools.bench import bench_loader
from xlearner.config import Config, SourceConfig
from xlearner.backbone import IMAGENET_MEAN, IMAGENET_STD, to_input
from xlearner.data import (DataWarning, MultiSourceLoader, build_dataset,
                           build_eval_loader, collate_fn, move_to)
from xlearner.formats.files import DataError
from xlearner.formats import check_data
from xlearner.formats.tvdatasets import prepare_mnist_like

RNG = np.random.default_rng(0)


def png(path, size=(20, 16), value=None, mode="RGB"):
    """A small image (random pixels unless `value`); size is (W, H)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if value is None:
        arr = RNG.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
    else:
        arr = np.full((h, w, 3) if mode == "RGB" else (h, w), value, np.uint8)
    Image.fromarray(arr, mode).save(path)
    return path


def unit(img):
    """A loader image (uint8) as float pixels in [0, 1]."""
    assert img.dtype == torch.uint8
    return img.float() / 255


def imagefolder(root, classes=("a", "b"), per_class=4, size=(20, 16)):
    for split in ("train", "val"):
        for c in classes:
            for i in range(per_class):
                png(root / split / c / f"{i}.png", size)
    return SourceConfig(name="folder", task="cls", format="imagefolder", train=str(root / "train"),
                        val=str(root / "val"), image_size=16, batch_size=4)


def csv_source(root, n, name="csvsrc", batch_size=2):
    """A csv source whose label is the sample's index: the label identifies the sample."""
    root.mkdir(parents=True, exist_ok=True)
    rows = ["path,label"]
    for i in range(n):
        png(root / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{i}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return SourceConfig(name=name, task="cls", format="csv", train=str(root / "train.csv"),
                        val=str(root / "train.csv"), image_size=8, batch_size=batch_size)


def coco_json(root, images, anns, cats=((3, "circle"), (7, "square"), (42, "triangle")), name="ann.json"):
    """images: [(file, W, H)]; anns: [(image index, category id, [x, y, w, h], iscrowd)]."""
    data = {"images": [{"id": 100 + i, "file_name": f, "width": w, "height": h} for i, (f, w, h) in enumerate(images)],
            "annotations": [{"id": k + 1, "image_id": 100 + i, "category_id": c, "bbox": b, "iscrowd": crowd,
                             "area": b[2] * b[3]} for k, (i, c, b, crowd) in enumerate(anns)],
            "categories": [{"id": cid, "name": n} for cid, n in cats]}
    (root / name).write_text(json.dumps(data))
    return root / name


def coco_source(root, images, anns, **kw):
    root.mkdir(parents=True, exist_ok=True)
    for f, w, h in images:
        png(root / "img" / f, (w, h))
    ann = coco_json(root, images, anns, **kw)
    return SourceConfig(name="det", task="det", format="coco", train=str(root / "img"), train_ann=str(ann),
                        val=str(root / "img"), val_ann=str(ann), image_size=32, batch_size=2)


def mask_source(root, n=4, size=(16, 12), num_classes=3, value=None):
    for i in range(n):
        png(root / "images" / f"{i}.png", size)
        m = RNG.integers(0, num_classes, size[::-1], dtype=np.uint8) if value is None else np.full(size[::-1], value(i), np.uint8)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m, "L").save(root / "masks" / f"{i}.png")
    return SourceConfig(name="seg", task="seg", format="masks", train=str(root), val=str(root),
                        num_classes=num_classes, image_size=8, batch_size=2)


# ----------------------------------------------------------------------------
# readers

def test_coco_reader_matches_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    images = [("a.png", 40, 30), ("b.png", 32, 32), ("empty.png", 24, 20)]
    anns = [(0, 7, [1.5, 2.0, 10.0, 8.0], 0), (0, 42, [20, 5, 15, 20], 0), (0, 3, [0, 0, 40, 30], 1),  # crowd
            (1, 3, [4, 4, 8, 8], 0), (1, 42, [25, 25, 10, 10], 0)]  # clipped to the 32x32 image
    src = coco_source(tmp_path, images, anns)
    ds = build_dataset(src, "train", train=False)
    coco = COCO(src.train_ann)
    assert ds.cat_ids == [3, 7, 42] and ds.classes == ["circle", "square", "triangle"] and ds.num_classes == 3
    assert len(ds) == 3
    for i in range(len(ds)):
        img, t = ds[i]
        info = coco.loadImgs(t["image_id"])[0]
        assert img.shape == (3, info["height"], info["width"]) and img.dtype == torch.uint8
        ref = coco.loadAnns(coco.getAnnIds(imgIds=t["image_id"], iscrowd=False))
        expect = torch.tensor([[x, y, min(x + w, info["width"]), min(y + h, info["height"])]
                               for x, y, w, h in (a["bbox"] for a in ref)], dtype=torch.float32).reshape(-1, 4)
        assert t["boxes"].shape == expect.shape and torch.allclose(t["boxes"], expect)
        assert t["labels"].dtype == torch.int64
        assert [ds.cat_ids[int(l) - 1] for l in t["labels"]] == [a["category_id"] for a in ref]
    assert ds[2][1]["boxes"].shape == (0, 4) and ds[2][1]["labels"].shape == (0,)  # no annotations
    assert len(ds.coco.getAnnIds(iscrowd=True)) == 1  # COCOeval still sees the crowd region


def test_imagefolder_and_csv_labels(tmp_path):
    ds = build_dataset(imagefolder(tmp_path / "f", classes=("dog", "cat", "ant")), "val", train=False)
    assert ds.classes == ["ant", "cat", "dog"] and len(ds) == 12
    img, label = ds[0]
    assert img.shape == (3, 16, 16) and label == 0
    src = csv_source(tmp_path / "c", 12)
    ds = build_dataset(src, "train", train=True)
    assert ds.classes == [str(i) for i in range(12)]  # numeric labels sort as numbers
    assert [ds[i][1] for i in range(12)] == list(range(12))


def test_multilabel_csv(tmp_path):
    png(tmp_path / "x.png")
    (tmp_path / "t.csv").write_text("path,label\nx.png,cat;dog\nx.png,dog\n")
    src = SourceConfig(name="ml", format="csv", train=str(tmp_path / "t.csv"), multi_label=True, image_size=8)
    ds = build_dataset(src, "train", train=False)
    assert ds[0][1].tolist() == [1.0, 1.0] and ds[1][1].tolist() == [0.0, 1.0]


def _broken_world(tmp: Path) -> tuple[list[SourceConfig], dict[str, str]]:
    """One source per kind of bad input; returns the sources and {kind: the file to be named}."""
    named = {}
    src_corrupt = imagefolder(tmp / "corrupt")
    (tmp / "corrupt/train/a/0.png").write_bytes(b"not a png at all")
    good = (tmp / "corrupt/train/b/0.png").read_bytes()
    (tmp / "corrupt/train/b/1.png").write_bytes(good[: len(good) // 2])  # truncated
    named["corrupt"], named["truncated"] = str(tmp / "corrupt/train/a/0.png"), str(tmp / "corrupt/train/b/1.png")

    src_missing = csv_source(tmp / "missing", 3, name="missing")
    os.remove(tmp / "missing/img/1.png")
    named["missing"] = str(tmp / "missing/img/1.png")

    src_zero = coco_source(tmp / "zero", [("a.png", 20, 20)], [(0, 3, [2, 2, 0, 5], 0)])
    named["zero width"] = str(tmp / "zero/ann.json")
    src_cat = coco_source(tmp / "cat", [("a.png", 20, 20)], [(0, 5, [2, 2, 5, 5], 0)])
    named["unknown category"] = str(tmp / "cat/ann.json")
    src_json = coco_source(tmp / "json", [("a.png", 20, 20)], [])
    (tmp / "json/ann.json").write_text('{"images": [}')
    named["malformed json"] = str(tmp / "json/ann.json")

    src_range = mask_source(tmp / "range", num_classes=3)
    Image.fromarray(np.full((12, 16), 7, np.uint8), "L").save(tmp / "range/masks/2.png")
    named["mask range"] = str(tmp / "range/masks/2.png")
    src_size = mask_source(tmp / "size")
    Image.fromarray(np.zeros((5, 5), np.uint8), "L").save(tmp / "size/masks/1.png")
    named["mask size"] = str(tmp / "size/masks/1.png")

    src_empty = imagefolder(tmp / "empty")
    (tmp / "empty/train/c").mkdir()
    named["empty folder"] = str(tmp / "empty/train/c")
    srcs = [src_corrupt, src_missing, src_zero, src_cat, src_json, src_range, src_size, src_empty]
    for i, s in enumerate(srcs):
        s.name = f"s{i}"
    return srcs, named


def test_structural_errors_name_the_file(tmp_path):
    srcs, named = _broken_world(tmp_path)
    by_name = {s.name: s for s in srcs}
    cases = [("s1", "missing", "not found"), ("s2", "zero width", "zero or negative width"),
             ("s3", "unknown category", "unknown category id 5"), ("s4", "malformed json", "malformed JSON"),
             ("s7", "empty folder", "empty class folder")]
    for name, kind, reason in cases:
        with pytest.raises(DataError) as e:
            build_dataset(by_name[name], "train", train=True)
        assert named[kind] in str(e.value) and reason in str(e.value), (kind, str(e.value))
    # per-image problems do not stop the build: the sample is skipped when read
    ds = build_dataset(by_name["s5"], "train", train=True)
    with pytest.warns(DataWarning, match="outside"):
        assert ds[2] is None
    ds = build_dataset(by_name["s6"], "train", train=True)
    with pytest.warns(DataWarning, match="mask is 5x5"):
        assert ds[1] is None


def test_check_data_reports_everything_at_once(tmp_path):
    srcs, named = _broken_world(tmp_path)
    problems = check_data(srcs)
    for kind, path in named.items():
        assert any(p.startswith(path + ":") for p in problems), f"{kind} ({path}) not reported in {problems}"
    assert all(": " in p for p in problems)
    assert not check_data([imagefolder(tmp_path / "ok")])


def test_val_class_set_must_match_train(tmp_path):
    src = imagefolder(tmp_path)
    png(tmp_path / "val/zebra/0.png")
    with pytest.raises(DataError, match="class set differs"):
        build_dataset(src, "val", train=False)
    assert any("extra ['zebra']" in p for p in check_data([src]))


def test_coco_val_categories_must_match_train(tmp_path):
    src = coco_source(tmp_path, [("a.png", 20, 20)], [(0, 3, [2, 2, 5, 5], 0)])
    assert build_dataset(src, "val", train=False).cat_ids == [3, 7, 42]  # same file for both splits: fine
    # val: same ids, but 7 is renamed and 42 is replaced by 43
    val = coco_json(tmp_path, [("a.png", 20, 20)], [(0, 3, [2, 2, 5, 5], 0)],
                    cats=((3, "circle"), (7, "star"), (43, "triangle")), name="val.json")
    src.val_ann = str(val)
    with pytest.raises(DataError) as e:
        build_dataset(src, "val", train=False)
    msg = str(e.value)
    assert f"{val}: categories differ from the train split's {src.train_ann}" in msg
    assert "missing [(7, 'square'), (42, 'triangle')], extra [(7, 'star'), (43, 'triangle')]" in msg
    assert build_dataset(src, "train", train=True).cat_ids == [3, 7, 42]  # the train split alone is fine
    assert [p for p in check_data([src]) if "categories differ" in p] == [msg.split("\n  ")[1]]


def test_undecodable_image_is_skipped_and_counted(tmp_path):
    src = imagefolder(tmp_path, per_class=4)  # 8 train images, batch 4
    (tmp_path / "train/a/1.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "train/b/2.png").write_bytes(b"")
    ds = build_dataset(src, "train", train=True)
    loader = MultiSourceLoader([src], {"folder": ds}, workers=0)
    with pytest.warns(DataWarning):
        seen = sum(len(next(loader)["folder"]["labels"]) for _ in range(4))  # two epochs
    assert seen == 12 and loader.skipped == {"folder": 4}
    assert loader.state_dict()["folder"] == {"epoch": 2, "batch": 0, "skipped": 4}


# ----------------------------------------------------------------------------
# the loader

def _ids(batch, task):
    if task == "cls":
        return batch["labels"].tolist()
    return [t["image_id"] for t in batch["targets"]]


def test_two_ranks_disjoint_cover_and_reshuffle(tmp_path):
    cls = csv_source(tmp_path / "c", 16, batch_size=2)  # 8 per rank: 4 batches per epoch
    det = coco_source(tmp_path / "d", [(f"{i}.png", 12, 10) for i in range(8)], [])  # 2 batches per epoch
    datasets = {"csvsrc": build_dataset(cls, "train", True), "det": build_dataset(det, "train", True)}
    ranks = [MultiSourceLoader([cls, det], datasets, rank=r, world_size=2, seed=3, workers=0) for r in (0, 1)]
    seen = {(r, s): [] for r in (0, 1) for s in ("csvsrc", "det")}
    for _ in range(8):
        for r, loader in enumerate(ranks):
            out = next(loader)
            seen[r, "csvsrc"] += _ids(out["csvsrc"], "cls")
            seen[r, "det"] += _ids(out["det"], "det")
    for name, n, per_rank in (("csvsrc", 16, 8), ("det", 8, 4)):
        expected = set(range(16)) if name == "csvsrc" else {100 + i for i in range(8)}
        epochs = [[seen[r, name][e * per_rank:(e + 1) * per_rank] for r in (0, 1)] for e in range(64 // n // 2)]
        for a, b in epochs:
            assert not set(a) & set(b), f"{name}: ranks overlap"
            assert set(a) | set(b) == expected and len(a) == len(b) == per_rank, f"{name}: epoch not covered"
        assert epochs[0][0] != epochs[1][0], f"{name}: no reshuffle between epochs"
    assert ranks[0].state_dict() == {"csvsrc": {"epoch": 2, "batch": 0, "skipped": 0},
                                     "det": {"epoch": 4, "batch": 0, "skipped": 0}}


def _run(loader, steps):
    return [{k: (v["images"].clone(), (v["labels"] if "labels" in v else v["masks"]).clone())
             for k, v in next(loader).items()} for _ in range(steps)]


def test_resume_replays_the_same_samples_and_augmentations(tmp_path):
    cls = imagefolder(tmp_path / "f", per_class=5)  # 10 images, batch 4: 2 batches per epoch
    seg = mask_source(tmp_path / "s", n=6)           # batch 2: 3 batches per epoch
    datasets = {"folder": build_dataset(cls, "train", True), "seg": build_dataset(seg, "train", True)}
    rng_before = torch.get_rng_state()
    full = _run(MultiSourceLoader([cls, seg], datasets, seed=5, workers=0), 7)
    assert torch.equal(torch.get_rng_state(), rng_before), "the loader must not consume the global RNG"
    for workers in (0, 2):
        first = MultiSourceLoader([cls, seg], datasets, seed=5, workers=workers)
        head = _run(first, 3)
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        resumed = MultiSourceLoader([cls, seg], datasets, seed=5, workers=workers)
        resumed.load_state_dict(state)
        for a, b in zip(full, head + _run(resumed, 4)):
            for k in a:
                assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]), (workers, k)
        resumed.close()
    other_seed = _run(MultiSourceLoader([cls, seg], datasets, seed=6, workers=0), 1)
    assert not torch.equal(other_seed[0]["folder"][0], full[0]["folder"][0])


def test_too_small_source_is_a_clear_error(tmp_path):
    src = csv_source(tmp_path, 5, batch_size=4)
    with pytest.raises(DataError, match="5 training samples, fewer than batch_size 4 x world_size 2"):
        MultiSourceLoader([src], {"csvsrc": build_dataset(src, "train", True)}, world_size=2)


def test_eval_loader_shards_without_duplicates(tmp_path):
    src = csv_source(tmp_path, 10)
    ds = build_dataset(src, "val", train=False)
    shards = [[l for b in build_eval_loader(src, ds, rank=r, world_size=3, batch_size=2, workers=0)
               for l in b["labels"].tolist()] for r in range(3)]
    assert shards == [list(range(r, 10, 3)) for r in range(3)]


# ----------------------------------------------------------------------------
# transforms and batching

def test_det_flip_moves_the_boxes(tmp_path):
    W, H, box = 40, 30, (5, 8, 17, 20)  # xyxy
    arr = np.zeros((H, W, 3), np.uint8)
    arr[box[1]:box[3], box[0]:box[2]] = 255
    (tmp_path / "img").mkdir()
    Image.fromarray(arr).save(tmp_path / "img/a.png")
    ann = coco_json(tmp_path, [("a.png", W, H)], [(0, 3, [5, 8, 12, 12], 0)])
    src = SourceConfig(name="det", task="det", format="coco", train=str(tmp_path / "img"), train_ann=str(ann))
    ds = build_dataset(src, "train", train=True)
    flipped = set()
    for seed in range(12):
        img, t = ds[(0, seed)]
        assert img.shape == (3, H, W)  # native size: the detector resizes
        x1, y1, x2, y2 = (int(v) for v in t["boxes"][0])
        is_flipped = x1 != box[0]
        flipped.add(is_flipped)
        assert (x1, y1, x2, y2) == ((W - box[2], box[1], W - box[0], box[3]) if is_flipped else box)
        img = unit(img)
        assert img[:, y1:y2, x1:x2].min() == 1.0 and img.sum() == 3 * (x2 - x1) * (y2 - y1)  # the box is on the object
    assert flipped == {True, False}


def test_seg_mask_moves_with_the_image(tmp_path):
    # 16x16 blocks whose gray level encodes the label: image and mask must agree after crop and flip
    labels = np.array([[0, 1, 2, 3], [3, 0, 1, 2], [1, 3, 0, 2], [2, 2, 3, 1]], np.uint8)  # no mirror symmetry
    mask = np.kron(labels, np.ones((16, 16), np.uint8))
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.repeat((mask * 60)[..., None], 3, 2)).save(tmp_path / "images/a.png")
    Image.fromarray(mask, "L").save(tmp_path / "masks/a.png")
    src = SourceConfig(name="seg", task="seg", format="masks", train=str(tmp_path), num_classes=4, image_size=32)
    ds = build_dataset(src, "train", train=True)
    for seed in range(6):
        img, m = ds[(0, seed)]
        assert img.shape == (3, 32, 32) and m.shape == (32, 32) and m.dtype == torch.int64
        decoded = (img[0].long() / 60).round().long()
        agree, mirrored = (decoded == m).float().mean(), (decoded == m.flip(-1)).float().mean()
        assert agree > 0.85 and agree > mirrored + 0.2, (seed, agree, mirrored)
    img, m = build_dataset(src, "train", train=False)[0]  # eval: a plain resize to S x S
    assert m.shape == (32, 32) and torch.equal(m, torch.from_numpy(mask[::2, ::2]).long())


def test_collate_pads_seg_and_drops_none():
    a = (torch.ones(3, 4, 5), torch.zeros(4, 5, dtype=torch.long))
    b = (torch.ones(3, 6, 3), torch.ones(6, 3, dtype=torch.long))
    out = collate_fn("seg", ignore_index=255)([a, None, b])
    assert out["images"].shape == (2, 3, 6, 5) and out["masks"].shape == (2, 6, 5) and out["skipped"] == 1
    assert out["masks"][0, 4:].eq(255).all() and out["masks"][1, :, 3:].eq(255).all()
    det = collate_fn("det")([(torch.zeros(3, 4, 4), {"boxes": torch.zeros(0, 4)}), None])
    assert isinstance(det["images"], list) and len(det["targets"]) == 1 and det["skipped"] == 1
    moved = move_to({"images": [torch.ones(1)], "targets": [{"boxes": torch.ones(2)}], "skipped": 0}, "cpu")
    assert moved["targets"][0]["boxes"].device.type == "cpu" and moved["skipped"] == 0


# ----------------------------------------------------------------------------
# torchvision datasets

def _write_idx(path, array, magic):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes())


def test_fashion_mnist_from_local_idx_files(tmp_path, monkeypatch):
    src_dir = tmp_path / "debian"  # laid out like /usr/share/datasets/fashion-mnist
    src_dir.mkdir()
    images = {s: RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 6), ("t10k", 4))}
    labels = {s: np.arange(len(images[s]), dtype=np.uint8) % 10 for s in images}
    for s in images:
        _write_idx(src_dir / f"{s}-images-idx3-ubyte.gz", images[s], 0x803)
        _write_idx(src_dir / f"{s}-labels-idx1-ubyte.gz", labels[s], 0x801)
    monkeypatch.setenv("XLEARNER_CACHE", str(tmp_path / "cache"))
    src = SourceConfig(name="FashionMNIST", task="cls", format="torchvision", root=str(src_dir), image_size=28)
    inplace = tmp_path / "inplace/FashionMNIST/raw"  # torchvision's layout, still gzipped
    inplace.mkdir(parents=True)
    for gz in src_dir.iterdir():
        (inplace / gz.name).write_bytes(gz.read_bytes())
    # a folder of .gz files (Debian's), torchvision's layout unpacked by hand, or still gzipped
    for root in (src_dir, prepare_mnist_like(src_dir, tmp_path / "tv"), tmp_path / "inplace"):
        src.root = str(root)
        train, val = build_dataset(src, "train", train=False), build_dataset(src, "val", train=False)
        assert (len(train), len(val)) == (6, 4) and train.num_classes == 10 and train.classes[0] == "T-shirt/top"
        img, label = val[3]
        assert label == 3 and img.shape == (3, 28, 28)
        pixels = unit(img)
        assert torch.allclose(pixels[0], pixels[2], atol=1e-5)  # gray became 3 equal channels
        assert torch.allclose(pixels[0] * 255, torch.from_numpy(images["t10k"][3]).float(), atol=1e-3)
    assert (tmp_path / "tv/FashionMNIST/raw/train-images-idx3-ubyte").is_file()
    assert (inplace / "t10k-labels-idx1-ubyte").is_file() and any((tmp_path / "cache").rglob("*-ubyte"))
    assert not check_data([src])
    missing = SourceConfig(name="FashionMNIST", format="torchvision", root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="could not be opened"):
        build_dataset(missing, "train", train=True)


DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's fashion-mnist package is not installed "
                    "(the same code path is covered by test_fashion_mnist_from_local_idx_files)")
def test_fashion_mnist_debian_files(tmp_path, monkeypatch):
    monkeypatch.setenv("XLEARNER_CACHE", str(tmp_path))
    src = SourceConfig(name="FashionMNIST", task="cls", format="torchvision", root=str(DEBIAN_FASHION), image_size=32)
    train, val = build_dataset(src, "train", train=True), build_dataset(src, "val", train=False)
    assert (len(train), len(val)) == (60000, 10000)
    img, label = train[(0, 0)]
    assert img.shape == (3, 32, 32) and 0 <= label < 10


def test_voc_from_torchvision(tmp_path):
    voc = tmp_path / "VOCdevkit/VOC2012"
    for d in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    for k in ("a", "b"):
        Image.fromarray(RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(voc / f"JPEGImages/{k}.jpg")
        m = np.zeros((20, 30), np.uint8)
        m[2:6, 3:9], m[0] = 15, 255
        Image.fromarray(m, "L").save(voc / f"SegmentationClass/{k}.png")
        (voc / f"Annotations/{k}.xml").write_text(
            f"<annotation><filename>{k}.jpg</filename><size><width>30</width><height>20</height><depth>3</depth>"
            "</size><object><name>dog</name><difficult>0</difficult><bndbox><xmin>3</xmin><ymin>2</ymin><xmax>9"
            "</xmax><ymax>6</ymax></bndbox></object><object><name>cat</name><difficult>1</difficult><bndbox>"
            "<xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")
    for d in ("Main", "Segmentation"):
        (voc / f"ImageSets/{d}/train.txt").write_text("a\nb\n")
    det = SourceConfig(name="VOCDetection@2012", task="det", format="torchvision", root=str(tmp_path))
    ds = build_dataset(det, "train", train=False)
    img, t = ds[1]
    assert ds.num_classes == 20 and img.shape == (3, 20, 30)
    assert t["boxes"].tolist() == [[2.0, 1.0, 9.0, 6.0]] and ds.classes[int(t["labels"][0]) - 1] == "dog"
    assert len(ds.coco.getAnnIds(iscrowd=True)) == 2  # "difficult" objects: ignored by COCOeval
    seg = SourceConfig(name="VOCSegmentation", task="seg", format="torchvision", root=str(tmp_path), image_size=10)
    img, m = build_dataset(seg, "train", train=False)[0]
    assert img.shape == (3, 10, 10) and set(m.unique().tolist()) <= {0, 15, 255} and (m == 15).any()


def test_voc_segmentation_has_background_and_checks_mask_values(tmp_path):
    """VOC masks are palette PNGs: 0 background, 1..20 the VOC classes, 255 boundary (ignored)."""
    voc = tmp_path / "VOCdevkit/VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    palette = RNG.integers(0, 256, 768, dtype=np.uint8).tolist()
    for k, value in (("a", 20), ("b", 22)):  # 20 = tvmonitor, the last class; 22 is no class
        Image.fromarray(RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(voc / f"JPEGImages/{k}.jpg")
        m = np.zeros((20, 30), np.uint8)
        m[2:6, 3:9], m[0] = value, 255
        mask = Image.fromarray(m, "P")
        mask.putpalette(palette)
        mask.save(voc / f"SegmentationClass/{k}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("a\nb\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("a\n")
    seg = SourceConfig(name="VOCSegmentation", task="seg", format="torchvision", root=str(tmp_path),
                       val_split="val", image_size=10)
    ds = build_dataset(seg, "train", train=False)
    assert ds.num_classes == 21 and ds.classes[0] == "background" and ds.classes[20] == "tvmonitor"
    assert set(ds[0][1].unique().tolist()) == {0, 20, 255}
    bad = (f"VOCSegmentation[1] under {tmp_path} ({voc}/SegmentationClass/b.png): "
           "mask values [22] are outside [0, 21) and not ignore_index 255")
    with pytest.warns(DataWarning, match=re.escape(bad)):
        assert ds[1] is None
    assert check_data([seg]) == [bad]


# ----------------------------------------------------------------------------

def test_bench_loader_runs(tmp_path):
    cfg = Config(sources=[imagefolder(tmp_path / "f"), mask_source(tmp_path / "s")])
    cfg.expand.workers = 0
    res = bench_loader(cfg, steps=4, rounds=1)
    assert (res["bench"], res["steps"], res["rounds"], res["sources"], res["worker_processes"]) == ("loader", 4, 1, 2, 2)
    assert res["images_per_step"] == sum(s.batch_size for s in cfg.sources)
    assert res["multi_images_per_s"] > 0 and res["plain_images_per_s"] > 0


def test_bench_loader_alternates_rounds_and_keeps_the_best_of_each(tmp_path, monkeypatch):
    """Known rates in place of timings: rounds alternate which loader goes first, the best round of each
    counts, and the ratio and the per-step numbers come from the unrounded best rates."""
    from xlearner.tools import bench
    cfg = Config(sources=[imagefolder(tmp_path / "f"), mask_source(tmp_path / "s")])
    cfg.expand.workers = 0
    rates, order = {"multi": iter([90.0, 120.04, 60.0]), "plain": iter([50.0, 40.0, 45.0])}, []

    def fake_images_per_s(stream, steps, warmup):
        kind = "multi" if isinstance(stream, MultiSourceLoader) else "plain"
        order.append(kind)
        return next(rates[kind])
    monkeypatch.setattr(bench, "_images_per_s", fake_images_per_s)
    res = bench.bench_loader(cfg, steps=4, rounds=3)
    assert order == ["multi", "plain", "plain", "multi", "multi", "plain"]
    per_step = sum(s.batch_size for s in cfg.sources)
    assert (res["multi_images_per_s"], res["plain_images_per_s"], res["ratio"]) == (120.0, 50.0, 2.401)
    assert (res["multi_images_per_s_per_worker"], res["plain_images_per_s_per_worker"]) == (60.0, 25.0)
    assert res["loader_step_s"] == round(per_step / 120.04, 3)


def test_batches_are_uint8_and_to_input_makes_the_old_float_tensors_to_the_last_bit(demo_config):
    """The loader sends uint8 (a quarter of the bytes to copy); backbone.to_input, on the device, makes exactly
    the tensors the old CPU transform made (its geometry, then ToDtype and, but for det, Normalize)."""
    from torchvision.transforms import v2
    to_float, norm = v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    for s in demo_config.sources:
        s.batch_size = 2
        S = s.image_size
        old = {("cls", True): [v2.RandomResizedCrop(S, scale=(0.6, 1.0)), v2.RandomHorizontalFlip(), to_float, norm],
               ("cls", False): [v2.Resize(S), v2.CenterCrop(S), to_float, norm],
               ("seg", True): [v2.RandomResizedCrop(S, scale=(0.5, 1.0)), v2.RandomHorizontalFlip(), to_float, norm],
               ("seg", False): [v2.Resize((S, S)), to_float, norm],
               ("det", True): [v2.RandomHorizontalFlip(), to_float], ("det", False): [to_float]}
        for train in (True, False):
            ds, before = build_dataset(s, "train", train=train), v2.Compose([v2.ToImage(), *old[s.task, train]])
            for i, seed in ((0, 11), (1, 12), (2, 13)):
                torch.manual_seed(seed)
                expect = before(ds.reader.load(i)[0])
                img = ds[(i, seed)][0]
                assert img.dtype == torch.uint8
                assert torch.equal(to_input(img, normalize=s.task != "det"), expect), (s.name, train, i)
    datasets = {s.name: build_dataset(s, "train", train=True) for s in demo_config.sources}
    step = next(MultiSourceLoader(demo_config.sources, datasets, workers=0))
    assert all((b["images"].dtype if torch.is_tensor(b["images"]) else b["images"][0].dtype) == torch.uint8
               for b in step.values())
    x = step[demo_config.sources[0].name]["images"]
    assert torch.equal(to_input(x), torch.stack([to_input(im) for im in x])) and to_input(to_input(x)).equal(to_input(x))


def test_demo_world_is_clean_and_loads(demo_config):
    """The demo generator's files pass every check, and one step has the shapes of the contract."""
    assert check_data(demo_config.sources + demo_config.transfer.datasets) == []
    for s in demo_config.sources:
        s.batch_size = 2
    datasets = {s.name: build_dataset(s, "train", train=True) for s in demo_config.sources}
    step = next(MultiSourceLoader(demo_config.sources, datasets, workers=0))
    for s in demo_config.sources:
        b, S = step[s.name], s.image_size
        if s.task == "cls":
            assert b["images"].shape == (2, 3, S, S) and b["labels"].shape == (2,)
        elif s.task == "det":
            assert len(b["images"]) == 2 and all(t["boxes"].shape[1] == 4 and len(t["labels"]) == len(t["boxes"])
                                                 for t in b["targets"])
            assert all(1 <= int(l) <= datasets[s.name].num_classes for t in b["targets"] for l in t["labels"])
        else:
            assert b["images"].shape == (2, 3, S, S) and b["masks"].shape == (2, S, S)
            valid = b["masks"][b["masks"] != s.ignore_index]
            assert valid.min() >= 0 and valid.max() < s.num_classes
