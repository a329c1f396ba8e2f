"""Readers: the base class, and one class per on-disk format of labelled images and boxes.

X-Learner trains on many sources at once, each in its own format and label
space (docs/DESIGN.md §6). A reader turns one split of one source into an indexed
list of raw samples: `reader.load(i) -> (PIL RGB image, target)` with
- cls: an int label (or a list of ints for a multi-label csv source),
- det: {"boxes": float32 [N, 4] xyxy pixels, "labels": int64 [N] in 1..K,
  "image_id": int}, crowd (and VOC "difficult") boxes already left out,
- seg: a uint8 [H, W] label map (numpy).
formats/__init__.py maps a config's `format` to its reader; transforms, batching and
the multi-source loader live in data.py.

Formats (a config's `format`), this module's first:
- `imagefolder`: `<split>/<class>/<image>`; classes sorted by name; val must
  have the train class set.
- `csv`: header `path,label`, paths relative to the CSV; multi-label sources
  separate labels with ';'. Classes are the train CSV's labels; a val label
  outside them is a problem.
- `coco`: an image dir plus an instances JSON (pycocotools.COCO). Category ids
  may be non-contiguous: label i+1 is category `cat_ids[i]`; val must have the
  train JSON's categories (ids and names).
- `masks`, `ade20k`, `cityscapes` (seglayouts.py): label maps beside images.
- `torchvision` (tvdatasets.py): `name` is a `torchvision.datasets` class ("FashionMNIST",
  "CIFAR10", "VOCDetection", ...); a suffix after '@' is a tag so two sources
  can share a class, and is the `year` for VOC ("VOCSegmentation@2007").
  The split goes to the class's own argument: `train=` (split starting with
  "train"), `split=` or `image_set=`. `download` stays false unless asked.

FashionMNIST (and MNIST/KMNIST) from local files, and everything else about
the `torchvision` format: tvdatasets.py.

Bad input: while indexing, each reader collects structural problems (missing
files, malformed JSON, unknown category ids, degenerate boxes, empty class
folders, ...) as "path: reason" strings in `reader.problems`; data.build_dataset
refuses a split that has any. Per-image problems (undecodable image, mask of the
wrong size or with out-of-range values) raise `BadSample` from `load()`: the
training loader skips and counts that sample, and formats.check_data lists them all.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS



class DataError(ValueError):
    """Data that cannot be used as configured; the message names the file and the reason."""


class BadSample(Exception):
    """One sample that cannot be loaded (the rest of the split is fine)."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")


def decode_image(path) -> Image.Image:
    """Fully decode an image to RGB (gray and palette images get 3 channels)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() forces the whole decode: truncation shows here
    except FileNotFoundError:
        raise BadSample(path, "image file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadSample(path, f"cannot decode image ({type(e).__name__}: {e})") from None


class Reader:
    """Base class: an indexed split plus the problems found while indexing it."""

    def __init__(self):
        self.problems: list[str] = []
        self.classes: list[str] = []
        self.items: list = []

    def problem(self, path, reason: str) -> None:
        self.problems.append(f"{path}: {reason}")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int):
        raise NotImplementedError

    def check(self, i: int) -> list[str]:
        """Everything that is wrong with sample i (a full decode); [] if nothing."""
        try:
            self.load(i)
        except BadSample as e:
            return [str(e)]
        return []


def image_files(folder: str) -> list[str]:
    return sorted(e.path for e in os.scandir(folder)
                  if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) and not e.name.startswith("."))


def _class_dirs(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


class ImageFolderReader(Reader):
    def __init__(self, split_dir: str, train_dir: str = ""):
        super().__init__()
        if not os.path.isdir(split_dir):
            return self.problem(split_dir, "split directory not found")
        classes = _class_dirs(split_dir)
        if not classes:
            return self.problem(split_dir, "no class folders")
        self.classes = classes
        if train_dir and os.path.abspath(train_dir) != os.path.abspath(split_dir) and os.path.isdir(train_dir):
            train_classes = _class_dirs(train_dir)
            if set(train_classes) != set(classes):
                missing, extra = sorted(set(train_classes) - set(classes)), sorted(set(classes) - set(train_classes))
                self.problem(split_dir, f"class set differs from the train split {train_dir}: "
                                        f"missing {missing}, extra {extra}")
            self.classes = train_classes  # labels must mean the same thing in both splits
        label = {c: i for i, c in enumerate(self.classes)}
        for c in classes:
            files = image_files(os.path.join(split_dir, c))
            if not files:
                self.problem(os.path.join(split_dir, c), "empty class folder (no image files)")
            if c in label:
                self.items += [(f, label[c]) for f in files]

    def load(self, i):
        path, label = self.items[i]
        return decode_image(path), label


def _sorted_labels(labels: set[str]) -> list[str]:
    # "2" < "10" when every label is an integer; names otherwise
    return sorted(labels, key=int) if all(s.lstrip("-").isdigit() for s in labels) else sorted(labels)


class CsvReader(Reader):
    def __init__(self, csv_path: str, train_csv: str = "", multi_label: bool = False):
        super().__init__()
        rows = self._rows(csv_path, multi_label)
        if train_csv and os.path.abspath(train_csv) != os.path.abspath(csv_path):
            train_rows = self._rows(train_csv, multi_label, record=False)
            self.classes = _sorted_labels({lab for _, _, labs in train_rows for lab in labs})
        else:
            self.classes = _sorted_labels({lab for _, _, labs in rows for lab in labs})
        label = {c: i for i, c in enumerate(self.classes)}
        base = os.path.dirname(csv_path)
        for line, rel, labs in rows:
            unknown = [lab for lab in labs if lab not in label]
            path = os.path.join(base, rel)
            if unknown:
                self.problem(f"{csv_path}:{line}", f"label(s) {unknown} not in the train split's classes")
            elif not os.path.isfile(path):
                self.problem(path, f"image file not found (listed in {csv_path}:{line})")
            else:
                ids = [label[lab] for lab in labs]
                self.items.append((path, ids if multi_label else ids[0]))

    def _rows(self, csv_path, multi_label, record=True):
        report = self.problem if record else (lambda *a: None)
        if not os.path.isfile(csv_path):
            report(csv_path, "CSV file not found")
            return []
        rows = []
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
                report(csv_path, f"expected a header 'path,label', got {reader.fieldnames}")
                return []
            for line, row in enumerate(reader, start=2):
                rel, lab = (row["path"] or "").strip(), (row["label"] or "").strip()
                labs = [s.strip() for s in lab.split(";") if s.strip()] if multi_label else [lab]
                if not rel or not lab:
                    report(f"{csv_path}:{line}", "empty path or label")
                    continue
                rows.append((line, rel, labs))
        return rows

    def load(self, i):
        path, label = self.items[i]
        return decode_image(path), label


def _box_problem(bbox, width, height) -> str | None:
    """Why a COCO [x, y, w, h] box is unusable, or None."""
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        return f"bbox {bbox!r} is not [x, y, w, h]"
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return f"bbox {bbox} is not finite"
    if w <= 0 or h <= 0:
        return f"bbox {bbox} has zero or negative {'width' if w <= 0 else 'height'}"
    if width and height and (min(x + w, width) <= max(x, 0) or min(y + h, height) <= max(y, 0)):
        return f"bbox {bbox} lies outside the {width}x{height} image"
    return None


def _categories(data: dict) -> list[tuple[int, str]]:
    """A COCO dict's categories as (id, name) pairs sorted by id: label i+1 is the i-th pair."""
    return [(c["id"], str(c.get("name", c["id"]))) for c in sorted(data["categories"], key=lambda c: c["id"])]


# (path, size, mtime) -> its categories: the val reader compares with the train JSON's, which the train
# reader has usually just parsed (a full COCO train JSON is ~0.5 GB: parse it once, not twice)
_CATEGORIES: dict[tuple, list[tuple[int, str]]] = {}


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def coco_categories(ann_path: str) -> list[tuple[int, str]] | None:
    """The (id, name) categories of a COCO JSON, or None if it cannot be read (its own reader says why)."""
    try:
        key = _file_key(ann_path)
        if key not in _CATEGORIES:
            with open(ann_path) as f:
                _CATEGORIES[key] = _categories(json.load(f))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        return None
    return _CATEGORIES[key]


class CocoReader(Reader):
    """COCO detection JSON. `coco` is the pycocotools.COCO of the split (for COCOeval), built on first use.

    With `train_ann` (a val split), the categories must be the train JSON's,
    ids and names: label i+1 must mean the same category in both splits.

    What stays in memory is compact: per image (path, image id, width, height,
    first box, end box) and every box of the split in one float32 array with
    one label array. The parsed JSON is dropped after reading, and no
    pycocotools index is built unless `coco` is asked for (evaluation of a val
    split): an Objects365-size train JSON (1.7 M images, 25 M boxes) is tens of
    GB as Python objects, in every rank and, page by page, every loader worker
    (docs/RESULTS.md)."""

    def __init__(self, image_dir: str, ann_path: str, train_ann: str = ""):
        super().__init__()
        self.ann_path, self._coco, self._parsed, self.cat_ids = ann_path, None, False, []
        if not os.path.isfile(ann_path):
            return self.problem(ann_path, "annotation JSON not found")
        try:
            with open(ann_path) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self.problem(ann_path, f"malformed JSON ({e})")
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                                  for k in ("images", "annotations", "categories")):
            return self.problem(ann_path, "expected a COCO dict with 'images', 'annotations', 'categories' lists")
        try:
            cats = _categories(data)
            images = {img["id"]: img for img in data["images"]}
            anns = [(a["id"], a["image_id"], a["category_id"], a.get("bbox"), a.get("iscrowd", 0))
                    for a in data["annotations"]]
        except (KeyError, TypeError) as e:
            return self.problem(ann_path, f"malformed COCO entry (missing key {e})")
        self.cat_ids = [cid for cid, _ in cats]
        self.classes = [name for _, name in cats]
        _CATEGORIES[_file_key(ann_path)] = cats
        label = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        if len(label) != len(cats):
            self.problem(ann_path, "duplicate category ids")
        if train_ann and os.path.abspath(train_ann) != os.path.abspath(ann_path):
            self._same_categories_as(train_ann, cats)
        boxes = {img_id: [] for img_id in images}
        for aid, img_id, cid, bbox, crowd in anns:
            img = images.get(img_id)
            if img is None:
                self.problem(ann_path, f"annotation {aid} refers to unknown image id {img_id}")
                continue
            where = f"annotation {aid} (image {img.get('file_name')})"
            if cid not in label:
                self.problem(ann_path, f"{where} has unknown category id {cid} (known: {self.cat_ids})")
                continue
            why = _box_problem(bbox, img.get("width"), img.get("height"))
            if why:
                self.problem(ann_path, f"{where}: {why}")
                continue
            if not crowd:  # crowd regions are for COCOeval only, never training targets
                x, y, w, h = bbox
                W, H = img.get("width") or math.inf, img.get("height") or math.inf
                boxes[img_id].append(([max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)], label[cid]))
        del data, anns  # the parsed JSON: from here on only the compact form below
        self._keep(image_dir, images, boxes)

    def _keep(self, image_dir: str, images: dict, boxes: dict) -> None:
        """items (path, image id, width, height, first box, end box) of the images on disk, every box in one array."""
        box_list, label_list = [], []
        for img_id in sorted(images):
            img = images[img_id]
            path = os.path.join(image_dir, str(img.get("file_name", "")))
            if not os.path.isfile(path):
                self.problem(path, f"image file not found (listed in {self.ann_path})")
            else:
                start = len(box_list)
                box_list += [b for b, _ in boxes[img_id]]
                label_list += [c for _, c in boxes[img_id]]
                self.items.append((path, img_id, img.get("width"), img.get("height"), start, len(box_list)))
        self.boxes = np.array(box_list, np.float32).reshape(-1, 4)
        self.labels = np.array(label_list, np.int64)
        self._parsed = True

    @property
    def coco(self):
        """The split's pycocotools.COCO (read from the JSON on first use: evaluation only), or None if unreadable."""
        if self._coco is None and self._parsed:
            from pycocotools.coco import COCO
            with contextlib.redirect_stdout(io.StringIO()):  # no progress prints
                self._coco = COCO(self.ann_path)
        return self._coco

    def _same_categories_as(self, train_ann: str, cats: list[tuple[int, str]]) -> None:
        train = coco_categories(train_ann)
        if train is not None and train != cats:  # an unreadable train JSON is reported by the train reader
            missing, extra = [c for c in train if c not in cats], [c for c in cats if c not in train]
            self.problem(self.ann_path, f"categories differ from the train split's {train_ann} "
                                        f"(labels would mean different classes): (id, name) missing {missing}, "
                                        f"extra {extra}")

    def load(self, i):
        path, img_id, W, H, start, end = self.items[i]
        img = decode_image(path)
        if (W and W != img.width) or (H and H != img.height):
            raise BadSample(path, f"image is {img.width}x{img.height} but {self.ann_path} says {W}x{H}")
        return img, {"boxes": self.boxes[start:end].copy(), "labels": self.labels[start:end].copy(),
                     "image_id": img_id}
