"""Segmentation readers: label maps stored beside images, as `masks` and as ADE20K and Cityscapes ship.

Readers of files.py's contract (docs/DESIGN.md §6; `load(i) -> (PIL RGB image,
uint8 [H, W] training labels)`, problems collected while indexing, `BadSample` for
one bad image). `LabelMapReader` pairs images with PNG label maps and checks
sizes and values; each format says how a stored map becomes training labels, so
that no one has to convert a dataset (and risk a wrong shift) before the first run:

- `masks`: `<split>/images/<stem>.(jpg|png)` + `<split>/masks/<stem>.png`, stored
  as trained: uint8 values in [0, num_classes) or ignore_index. Without `num_classes`
  in the config it is read from the train masks (a full scan: set it for big sets),
  for both splits: a val mask value beyond it is a bad sample.
- `ade20k`: `train` / `val` name the `ADEChallengeData2016` folder, which holds
  `images/{training,validation}/<stem>.jpg` and `annotations/{training,validation}/<stem>.png`.
  Stored 0 is "other" and 1..150 the classes; trained as 0 -> ignore_index, k -> k - 1
  (mmsegmentation's `reduce_zero_label`).
- `cityscapes`: `root` is what torchvision.datasets.Cityscapes expects
  (`leftImg8bit/<split>/<city>/*_leftImg8bit.png`, `gtFine/<split>/<city>/*_gtFine_labelIds.png`),
  split names `train` / `val` (`test` has no public labels). The 34 label ids become the
  benchmark's 19 train ids through torchvision's own `Cityscapes.classes` table; every
  other id becomes ignore_index.

formats.make_reader picks these readers; every problem names the file.
"""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
from PIL import Image
from torchvision.datasets import Cityscapes

from ..config import FIXED_CLASSES, DataConfig
from .files import BadSample, Reader, image_files, decode_image


@lru_cache(maxsize=None)
def infer_num_classes(masks_dir: str, ignore_index: int) -> int:
    """max label + 1 over every mask of a split (only when the config does not say)."""
    top = -1
    for e in os.scandir(masks_dir):
        if e.name.endswith(".png"):
            try:
                with Image.open(e.path) as m:
                    values = np.unique(np.asarray(m))
            except (OSError, SyntaxError, ValueError):
                continue  # an unreadable mask is reported by load() / check_data, not here
            values = values[values != ignore_index]
            top = max(top, int(values.max()) if values.size else -1)
    return top + 1


def read_label_map(mask_path: str, img: Image.Image, image_path: str) -> np.ndarray:
    """A PNG label map as uint8 [H, W] (a palette image's indices are its labels), the size of `img`."""
    try:
        with Image.open(mask_path) as m:
            if m.mode not in ("L", "P"):
                raise BadSample(mask_path, f"mask must be a uint8 label map (mode L or P), got mode {m.mode}")
            mask = np.array(m)
    except FileNotFoundError:
        raise BadSample(mask_path, "mask file not found") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadSample(mask_path, f"cannot decode mask ({type(e).__name__}: {e})") from None
    if mask.shape != (img.height, img.width):
        raise BadSample(mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} "
                                   f"but image {image_path} is {img.width}x{img.height}")
    return mask


class LabelMapReader(Reader):
    """Base of the seg formats that pair `<stem>.(jpg|png)` images with `<stem>.png` label maps."""

    def __init__(self, ignore_index: int):
        super().__init__()
        self.ignore_index, self.num_classes = ignore_index, 0

    def _dirs_found(self, *dirs: str) -> bool:
        for d in dirs:
            if not os.path.isdir(d):
                self.problem(d, "directory not found")
        return not self.problems

    def _pair(self, img_dir: str, mask_dir: str) -> None:
        """items = (image, mask) pairs matched by stem; an image without a mask, or a mask without an image, is
        a problem."""
        images = {}
        for p in image_files(img_dir):
            stem, ext = os.path.splitext(os.path.basename(p))
            if ext.lower() not in (".jpg", ".jpeg", ".png"):
                continue
            if stem in images:
                self.problem(p, f"two images share the stem {stem!r} ({images[stem]})")
            images[stem] = p
        masks = {os.path.splitext(n)[0] for n in os.listdir(mask_dir) if n.endswith(".png")}
        for stem in sorted(images):
            mask = os.path.join(mask_dir, stem + ".png")
            if stem not in masks:
                self.problem(mask, f"mask file not found for image {images[stem]}")
            else:
                self.items.append((images[stem], mask))
        for stem in sorted(masks - set(images)):
            self.problem(os.path.join(mask_dir, stem + ".png"), "mask without an image")

    def load(self, i):
        path, mask_path = self.items[i]
        img = decode_image(path)
        return img, self.labels(read_label_map(mask_path, img, path), mask_path)

    def labels(self, mask: np.ndarray, mask_path: str) -> np.ndarray:
        """The training labels of a stored map: values in [0, num_classes) or ignore_index (BadSample if not)."""
        bad = (mask >= self.num_classes) & (mask != self.ignore_index)
        if bad.any():
            raise BadSample(mask_path, f"mask values {np.unique(mask[bad])[:8].tolist()} are outside "
                                       f"[0, {self.num_classes}) and not ignore_index {self.ignore_index}")
        return mask


class MaskReader(LabelMapReader):
    """format = "masks": `<split>/images/<stem>.(jpg|png)` + `<split>/masks/<stem>.png`, stored as trained."""

    def __init__(self, split_dir: str, num_classes: int, ignore_index: int, train_dir: str = ""):
        super().__init__(ignore_index)
        img_dir, mask_dir = os.path.join(split_dir, "images"), os.path.join(split_dir, "masks")
        if not self._dirs_found(img_dir, mask_dir):
            return
        if not num_classes:
            train_masks = os.path.join(train_dir or split_dir, "masks")
            if not os.path.isdir(train_masks):
                return self.problem(train_masks, "directory not found (needed to count classes: "
                                                 "or set num_classes)")
            num_classes = infer_num_classes(train_masks, ignore_index)
        self.num_classes = num_classes
        self.classes = [str(k) for k in range(num_classes)]
        self._pair(img_dir, mask_dir)


def _lookup(pairs, ignore_index: int) -> np.ndarray:
    """A uint8 table stored value -> training label from (stored, label) pairs; every other value -> ignore."""
    lut = np.full(256, ignore_index, np.uint8)
    for stored, label in pairs:
        lut[stored] = label
    return lut


class ADE20KReader(LabelMapReader):
    """One split (`training` for train, `validation` for val) of the ADEChallengeData2016 folder `root`."""

    SPLITS = {"train": "training", "val": "validation"}

    def __init__(self, root: str, split: str, ignore_index: int):
        super().__init__(ignore_index)
        self.num_classes = FIXED_CLASSES["ade20k"]
        self.classes = [str(k) for k in range(self.num_classes)]
        self.lut = _lookup([(k, k - 1) for k in range(1, self.num_classes + 1)], ignore_index)  # 0 (other): ignore
        if not os.path.isdir(root):
            return self.problem(root, "ADEChallengeData2016 folder not found")
        img_dir = os.path.join(root, "images", self.SPLITS[split])
        mask_dir = os.path.join(root, "annotations", self.SPLITS[split])
        if self._dirs_found(img_dir, mask_dir):
            self._pair(img_dir, mask_dir)

    def labels(self, mask, mask_path):
        bad = mask > self.num_classes
        if bad.any():
            raise BadSample(mask_path, f"mask values {np.unique(mask[bad])[:8].tolist()} are outside ADE20K's "
                                       f"0 (other) .. {self.num_classes}")
        return self.lut[mask]


def cityscapes_train_ids() -> tuple[list[str], list[tuple[int, int]]]:
    """From torchvision's Cityscapes.classes: the train-id class names (in train-id order) and the
    (label id, train id) pairs of the evaluated classes (train id 255 or -1 is not evaluated)."""
    kept = [c for c in Cityscapes.classes if 0 <= c.train_id < 255 and c.id >= 0]
    names = [c.name for c in sorted(kept, key=lambda c: c.train_id)]
    return names, [(c.id, c.train_id) for c in kept]


class CityscapesReader(LabelMapReader):
    """One split (`src.train_split` / `src.val_split`) of the fine annotations under `src.root`."""

    def __init__(self, src: DataConfig, split: str):
        super().__init__(src.ignore_index)
        self.classes, pairs = cityscapes_train_ids()
        self.num_classes = len(self.classes)
        self.lut = _lookup(pairs, src.ignore_index)
        self.max_id = max(c.id for c in Cityscapes.classes)
        try:
            ds = Cityscapes(src.root, split=split, mode="fine", target_type="semantic")
        except (RuntimeError, ValueError, OSError) as e:  # torchvision's "Dataset not found ...", a bad split
            return self.problem(src.root, f"Cityscapes({split!r}) could not be opened: {e}")
        # torchvision lists the folders in os.listdir order: sort, so that an index means the same image everywhere
        for image, (target,) in sorted(zip(ds.images, ds.targets)):
            if os.path.isfile(target):
                self.items.append((image, target))
            else:
                self.problem(target, f"label map not found for image {image}")

    def labels(self, mask, mask_path):
        bad = mask > self.max_id
        if bad.any():
            raise BadSample(mask_path, f"mask values {np.unique(mask[bad])[:8].tolist()} are not Cityscapes "
                                       f"label ids (0 .. {self.max_id})")
        return self.lut[mask]
