"""Two segmentation datasets read in the layouts they ship in: `ade20k` and `cityscapes`.

Readers of datasets.py's contract (docs/DESIGN.md §6; `load(i) -> (PIL RGB image,
uint8 [H, W] training labels)`, problems collected while indexing, `BadSample` for
one bad image) whose stored label maps are not the training labels, so that no
one has to convert a dataset (and risk a wrong shift) before the first run:

- `ade20k`: `train` / `val` name the `ADEChallengeData2016` folder, which holds
  `images/{training,validation}/<stem>.jpg` and `annotations/{training,validation}/<stem>.png`.
  Stored 0 is "other" and 1..150 the classes; trained as 0 -> ignore_index, k -> k - 1
  (mmsegmentation's `reduce_zero_label`).
- `cityscapes`: `root` is what torchvision.datasets.Cityscapes expects
  (`leftImg8bit/<split>/<city>/*_leftImg8bit.png`, `gtFine/<split>/<city>/*_gtFine_labelIds.png`),
  split names `train` / `val` (`test` has no public labels). The 34 label ids become the
  benchmark's 19 train ids through torchvision's own `Cityscapes.classes` table; every
  other id becomes ignore_index.

datasets.make_reader picks these readers; the masks are checked like `masks` (pairs,
sizes, values), every problem naming the file.
"""
from __future__ import annotations

import os

import numpy as np
from torchvision.datasets import Cityscapes

from .config import FIXED_CLASSES, SourceConfig
from .datasets import BadSample, LabelMapReader


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

    def __init__(self, src: SourceConfig, split: str):
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
