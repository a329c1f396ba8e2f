"""The embedded demo world: a small procedural universe of sources and tasks.

X-Learner learns one backbone from many *sources* of several *tasks*, each
source keeping its own label space (docs/DESIGN.md §1). To run the whole method
(expand, squeeze, transfer) on a laptop in minutes with no downloads, this
module draws coloured shapes on patterned backgrounds and writes them in the
real on-disk formats of docs/DESIGN.md §6, so the demo goes through exactly the
readers that a user's data goes through.

    upstream sources (expand / squeeze); shapes: circle cross diamond hexagon ring square star triangle
      shapes-cls   cls  imagefolder  64 px   label = shape of the largest object
      texture-cls  cls  csv          64 px   label = background pattern
      shapes-det   det  coco        128 px   boxes labelled by shape
      colors-det   det  coco        128 px   the same kind of images, boxes labelled by colour
      shapes-seg   seg  masks       128 px   0 = background, 1..8 = shape
    downstream datasets (transfer); shapes never seen upstream: arrow crescent heart pentagon
      novel-cls (imagefolder), count-cls (imagefolder, "1".."5" objects, any shape),
      novel-det (coco), novel-seg (masks, 0 = background, 1..4 = shape)

Like ImageNet, COCO and ADE20K, the sources share the visual world but not
their labels: the setting in which one representation learnt across sources
and tasks should pay off, while the novel shapes test whether it generalises.

Image i of split s of source k draws from its own numpy Generator seeded by
(seed, k, s, i), so the output is byte-identical for a seed whatever the
number of worker processes.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .shapes import COLOR_NAMES, COLORS, NOVEL, PATTERNS, UPSTREAM, background, paint, rasterise
from .worlds import DOWNSTREAM_DATASETS, LAYOUTS, STANDIN_SPECS, UPSTREAM_SOURCES, WORLDS, Spec

SPLITS = ("train", "val")


def _count(spec: Spec, split: str, scale: float, downstream_scale: float = 1.0) -> int:
    if spec.name in DOWNSTREAM_DATASETS:
        scale *= downstream_scale
    n = round((spec.n_train if split == "train" else spec.n_val) * scale)
    if spec.task == "cls":  # a few images per class, so no class folder is ever empty
        return max(n, 3 * len(spec.classes))
    return max(n, 4)


# ----------------------------------------------------------------------------
# one image

def _place(rng: np.random.Generator, spec: Spec, n: int, first: str | None):
    """Drop up to n objects; a candidate is redrawn if it would hide too much of another."""
    (h, w), size = spec.shape_hw, min(spec.shape_hw)  # sizes are fractions of the shorter side
    min_px = 12 * (size / 64) ** 2
    objs: list[dict] = []
    for k in range(n):
        for _attempt in range(40):
            shape = first if (k == 0 and first) else str(rng.choice(spec.shapes))
            lo, hi = spec.radius
            if spec.main and k > 0:  # distractors stay well below the main object's size
                lo, hi = 0.08, 0.13
            r = rng.uniform(lo, hi) * size
            cx, cy = rng.uniform((r + 1, r + 1), (w - r - 1, h - r - 1))
            alpha, region = rasterise(shape, cx, cy, r, rng.uniform(0, 2 * math.pi), w, h)
            mask = np.zeros((h, w), bool)
            mask[region] = alpha >= 0.5
            area = int(mask.sum())
            if area < min_px:
                continue
            ok = all((o["visible"] & ~mask).sum() >= max(min_px, spec.min_visible * o["area"]) for o in objs)
            if ok and spec.main and objs:  # the label is the largest visible object: keep it so
                ok = area < 0.6 * (objs[0]["visible"] & ~mask).sum()
            if ok:
                for o in objs:
                    o["visible"] &= ~mask
                colour = str(rng.choice(COLOR_NAMES))
                objs.append(dict(shape=shape, colour=colour, alpha=alpha, region=region,
                                 mask=mask, visible=mask.copy(), area=area))
                break
    return objs


def render(spec: Spec, rng: np.random.Generator, index: int):
    """-> (RGB image, label map or None, label str or None, objects [(class index, visible mask)])."""
    pattern = PATTERNS[index % len(PATTERNS)] if spec.label == "pattern" else str(rng.choice(PATTERNS))
    first = spec.shapes[index % len(spec.shapes)] if spec.main else None
    if spec.label == "count":
        n = spec.objects[0] + index % len(spec.classes)  # balanced classes
    elif rng.random() < spec.p_empty:
        n = 0
    else:
        n = int(rng.integers(spec.objects[0], spec.objects[1] + 1))
    for _retry in range(20):  # counting needs exactly n objects: redraw the scene until they fit
        objs = _place(rng, spec, n, first)
        if spec.label != "count" or len(objs) == n:
            break
    img = background(rng, pattern, spec.size, spec.shape_hw[0])
    for o in objs:  # later objects are painted over earlier ones
        rgb = np.array(COLORS[o["colour"]], np.float32) + rng.uniform(-15, 15, 3)
        a = o["alpha"][..., None]
        h, w = a.shape[:2]
        img[o["region"]] = img[o["region"]] * (1 - a) + paint(rng, np.clip(rgb, 0, 255), h, w) * a
    image = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")

    def cls_of(o):
        return spec.classes.index(o["shape"] if spec.label == "shape" else o["colour"])

    label = None
    if spec.task == "cls":
        label = {"shape": first, "pattern": pattern, "count": str(len(objs))}[spec.label]
    labels = None
    if spec.task == "seg":
        labels = np.zeros(spec.shape_hw, np.uint8)
        for o in objs:
            labels[o["mask"]] = 1 + cls_of(o)
    objects = [(cls_of(o), o["visible"]) for o in objs] if spec.task == "det" else []
    return image, labels, label, objects


def _image_rng(seed: int, spec_index: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, spec_index, SPLITS.index(split), index])


def _save(image: Image.Image, path: Path) -> None:
    """PNG, or JPEG (quality 90) for .jpg/.JPEG. PIL writes no timestamp in either: byte-identical reruns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, format="JPEG", quality=90)
    else:
        image.save(path, format="PNG")


def _folder(spec: Spec) -> str:
    """The source's folder under the world: its dataset's own name (LAYOUTS), or the source name."""
    return LAYOUTS[spec.layout].folder if spec.layout else spec.name


def _paths(spec: Spec, split: str, i: int, label: str | None) -> tuple[str, str]:
    """(image, label map or "") of image i of a split, relative to the source's folder."""
    if spec.layout:
        layout, s = LAYOUTS[spec.layout], SPLITS.index(split)
        c = layout.class_dir.format(k=spec.classes.index(label), label=label) if spec.task == "cls" else ""
        fields = {"c": c, "n": i + 1, "p": i // 100}
        return layout.images[s].format(**fields), layout.masks[s].format(**fields)
    stem = f"{i:05d}{spec.ext}"
    return {"imagefolder": (f"{split}/{label}/{stem}", ""), "csv": (f"images/{split}/{stem}", ""),
            "coco": (f"{split}/{stem}", ""), "masks": (f"{split}/images/{stem}", f"{split}/masks/{i:05d}.png")}[spec.fmt]


def _ann_path(spec: Spec, split: str) -> str:
    """A coco source's instances JSON, relative to its folder."""
    return LAYOUTS[spec.layout].anns[SPLITS.index(split)] if spec.layout else f"{split}.json"


def _work(job) -> list:
    """Render and write images [start, stop) of one split; return their label records."""
    out, world, spec_index, split, start, stop, seed = job
    spec = WORLDS[world][spec_index]
    root = Path(out) / _folder(spec)
    records = []
    for i in range(start, stop):
        image, labels, label, objects = render(spec, _image_rng(seed, spec_index, split, i), i)
        image_path, mask_path = _paths(spec, split, i, label)
        _save(image, root / image_path)
        if spec.fmt == "imagefolder":
            records.append(label)
        elif spec.fmt == "csv":
            records.append((image_path, label))
        elif spec.fmt == "coco":
            boxes = []
            for c, vis in objects:
                ys, xs = np.nonzero(vis)
                x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
                boxes.append((c, [x0, y0, x1 - x0, y1 - y0], int(vis.sum())))  # w, h >= 1
            records.append((image_path.split("/", 1)[1], boxes))  # file_name: inside the image dir
        else:  # masks, ade20k
            _save(Image.fromarray(labels, "L"), root / mask_path)
            records.append(None)
    return records


def _coco_json(spec: Spec, split: str, records: list) -> dict:
    ids, (height, width) = spec.category_ids, spec.shape_hw
    images, anns = [], []
    for i, (file_name, boxes) in enumerate(records):
        images.append({"id": i + 1, "file_name": file_name, "width": width, "height": height})
        for c, bbox, area in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": ids[c], "bbox": bbox,
                         "area": area, "iscrowd": 0})
    cats = [{"id": ids[c], "name": name, "supercategory": spec.label} for c, name in enumerate(spec.classes)]
    return {"info": {"description": f"X-Learner demo world: {spec.name} {split}"},
            "images": images, "annotations": anns, "categories": cats}


# ----------------------------------------------------------------------------
# the world

def _draw_all(out: Path, world: str, seed: int, scale: float, workers: int,
              downstream_scale: float = 1.0) -> dict[tuple[str, str], list]:
    """Draw and save every image of every split, in chunks over `workers` processes; {(source, split): records}."""
    specs = WORLDS[world]
    jobs, chunk = [], 50 if world == "demo" else 10  # full-size images: smaller chunks balance the workers
    for k, spec in enumerate(specs):
        for split in SPLITS:
            n = _count(spec, split, scale, downstream_scale)
            jobs += [(str(out), world, k, split, a, min(a + chunk, n), seed) for a in range(0, n, chunk)]
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: the caller may hold threads (torch), and fork would copy their locks.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_work, jobs, chunksize=1)
    else:
        results = [_work(j) for j in jobs]
    records: dict[tuple[str, str], list] = {}
    for job, recs in zip(jobs, results):  # jobs are in order, so records are too
        records.setdefault((specs[job[2]].name, job[3]), []).extend(recs)
    return records


def _write_labels(out: Path, world: str, records: dict[tuple[str, str], list]) -> dict:
    """The csv and coco label files of every split; returns the world's summary {source: info}."""
    summary: dict = {}
    for spec in WORLDS[world]:
        height, width = spec.shape_hw
        info = {"task": spec.task, "format": spec.fmt,
                "image_size": spec.size if height == width else f"{width}x{height}", "classes": list(spec.classes),
                "role": "upstream" if world == "standin" or spec.name in UPSTREAM_SOURCES else "downstream"}
        for split in SPLITS:
            recs = records[(spec.name, split)]
            info[split] = len(recs)
            if spec.fmt == "csv":
                lines = ["path,label"] + [f"{p},{lab}" for p, lab in recs]
                (out / spec.name / f"{split}.csv").write_text("\n".join(lines) + "\n")
            elif spec.fmt == "coco":
                coco = _coco_json(spec, split, recs)
                ann = out / _folder(spec) / _ann_path(spec, split)
                ann.parent.mkdir(parents=True, exist_ok=True)
                ann.write_text(json.dumps(coco, sort_keys=True))
                info[f"{split}_boxes"] = len(coco["annotations"])
        if spec.fmt == "coco":
            info["category_ids"] = spec.category_ids
        if spec.task == "seg":  # masks: 0 = background is a class; ade20k: 0 = other is ignored
            info["num_classes"] = len(spec.classes) + (spec.fmt == "masks")
        if spec.layout:
            info["folder"] = _folder(spec)
        summary[spec.name] = info
    return summary


def generate(out: str | Path, seed: int = 0, scale: float = 1.0, workers: int = 2, world: str = "demo",
             downstream_scale: float = 1.0) -> dict:
    """Write a world under `out`; return {source: {task, format, classes, train, val, ...}}.

    `world` is "demo" (SPECS: the small demo world) or "standin" (STANDIN_SPECS:
    the recipe's six sources at full size). `scale` multiplies the number of
    images of every split (each class keeps at least 3); `downstream_scale`
    multiplies that of the downstream datasets again (the ablation's world: the
    same upstream bytes, downstream sets large enough that a metric is read to
    about a point). Any previous world
    under `out` is replaced, source by source, and `out/.complete` is written
    last, so an interrupted run leaves no marker.
    """
    if world not in WORLDS:
        raise ValueError(f"world: expected one of {sorted(WORLDS)}, got {world!r}")
    specs = WORLDS[world]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".complete").unlink(missing_ok=True)
    for spec in specs:
        for folder in sorted({spec.name, _folder(spec)}):  # the stand-in's layouts moved it: clear both
            shutil.rmtree(out / folder, ignore_errors=True)
    summary = _write_labels(out, world, _draw_all(out, world, seed, scale, workers, downstream_scale))
    (out / "world.json").write_text(json.dumps({"seed": seed, "scale": scale, "downstream_scale": downstream_scale,
                                                "sources": summary},
                                               sort_keys=True, indent=1) + "\n")
    (out / "README.txt").write_text(_readme(summary, seed, scale) if world == "demo" else
                                    _standin_readme(summary, seed, scale))
    (out / ".complete").write_text(f"seed={seed} scale={scale} downstream_scale={downstream_scale}\n")
    return summary


def _provenance(what: str, seed: int, scale: float) -> list[str]:
    """The first lines of a world's README.txt: what wrote it, and with which seed."""
    return [f"X-Learner {what}, xlearner/tools/demo.py).",
            f"seed = {seed}, scale = {scale}. Procedural and deterministic: same seed, same bytes."]


def _readme(summary: dict, seed: int, scale: float) -> str:
    lines = _provenance("demo world (written by `python cli.py demo-data`", seed, scale) + [
        "",
        "Images: 1 to 5 coloured shapes (antialiased, random size, rotation, solid/striped/dotted fill)",
        f"on a near-grey background ({', '.join(PATTERNS)}). Colours: {', '.join(COLOR_NAMES)}.",
        "Later objects occlude earlier ones; masks are coverage >= 0.5 of what is visible, and boxes",
        "are the tight box of an object's visible mask (always >= 1 px wide and high).",
        f"Upstream shapes: {', '.join(UPSTREAM)}. Novel (downstream-only) shapes: {', '.join(NOVEL)}.",
        "",
        "source        role        task format       px   train  val  classes",
    ]
    for name, s in summary.items():
        lines.append(f"{name:<13} {s['role']:<11} {s['task']:<4} {s['format']:<12} {s['image_size']:<4} "
                     f"{s['train']:>5} {s['val']:>4}  {' '.join(s['classes'])}")
    lines += [
        "",
        "Formats (docs/DESIGN.md section 6):",
        "  imagefolder: <split>/<class>/<idx>.png. shapes-cls / novel-cls: the class is the shape of",
        "    the one large object (small distractors may surround it); count-cls: the number of objects.",
        "  csv (texture-cls): <split>.csv with header path,label; paths relative to the csv;",
        "    the label is the background pattern.",
        "  coco: <split>/<idx>.png + <split>.json. Category ids are non-contiguous on purpose:",
    ]
    lines += [f"    {n}: {dict(zip(s['classes'], s['category_ids']))}" for n, s in summary.items() if "category_ids" in s]
    lines += [
        "    About 5% of det images have no object (no annotations).",
        "  masks: <split>/images/<idx>.png + <split>/masks/<idx>.png, uint8 label maps:",
        "    0 = background, i = the i-th class listed above (1-based). No ignore (255) pixels.",
        "",
    ]
    return "\n".join(lines)


def _standin_readme(summary: dict, seed: int, scale: float) -> str:
    lines = _provenance("full-size stand-in world (`python cli.py demo-data --world standin`", seed, scale) + [
        "The six sources of configs/xlearner_r50.toml at their real image sizes and file types, in their",
        "datasets' own layouts, drawn by the demo world's painter; `--set data_root=<this folder>`",
        "(configs/standin.sets) points the recipe at them. Not for accuracy: for running the recipe, its",
        "loader and scripts/gpu_check.sh end to end.",
        "",
        "source       folder               task format       size     train  val  classes",
    ]
    for name, s in summary.items():
        shown = s["classes"][:8] + (["..."] if len(s["classes"]) > 8 else [])
        count = s.get("num_classes", len(s["classes"]))
        lines.append(f"{name:<12} {s['folder']:<20} {s['task']:<4} {s['format']:<12} {str(s['image_size']):<8} "
                     f"{s['train']:>5} {s['val']:>4}  {count}: {' '.join(shown)}")
    lines += [""] + [f"{spec.name}: {', '.join(_layout_lines(spec))}" for spec in STANDIN_SPECS] + [
        "",
        "imagenet's class folders are made-up WordNet ids (n00000000 = the first class above); coco and",
        "objects365 pad their categories with never-drawn 'unused-k'; ADE20K maps hold 0 = other, 1..8.",
        "",
    ]
    return "\n".join(lines)


def _layout_lines(spec: Spec) -> list[str]:
    """Where one stand-in source's files are, as format strings ({c}: class folder, {n}: image number)."""
    layout = LAYOUTS[spec.layout]
    return [f"{layout.folder}/{p}" for p in layout.images + layout.masks + layout.anns if p]
