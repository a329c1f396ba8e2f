"""Which reader reads which format: `format` of a source or transfer dataset -> a Reader of one split, and the data check.

The readers themselves live by kind (docs/DESIGN.md §6): files.py (the base
class, `imagefolder`, `csv`, `coco`), seglayouts.py (`masks`, `ade20k`,
`cityscapes`) and tvdatasets.py (`torchvision`). This module is the one place
that knows them all, so none of them imports another's module but the base's.
`make_reader` is what data.build_dataset and `cli.py check-data` open a split with.
"""
from __future__ import annotations

from ..run import dist
from ..config import DataConfig
from .files import CocoReader, CsvReader, DataError, ImageFolderReader, Reader
from .seglayouts import ADE20KReader, CityscapesReader, MaskReader
from .tvdatasets import TorchvisionReader


def _missing(key: str, reason: str) -> Reader:
    reader = Reader()  # an empty split whose one problem says what the config lacks
    reader.problem(key, reason)
    return reader


def _coco(src: DataConfig, split: str, path: str) -> Reader:
    ann = src.train_ann if split == "train" else src.val_ann
    if not ann:
        return _missing(f"sources.{src.name}.{split}_ann", "coco sources need an instances JSON")
    return CocoReader(path, ann, train_ann=src.train_ann)


# formats whose split is a path (`train` / `val`): format -> reader(src, split, path)
PATH_READERS = {
    "imagefolder": lambda src, split, path: ImageFolderReader(path, train_dir=src.train),
    "csv": lambda src, split, path: CsvReader(path, train_csv=src.train, multi_label=src.multi_label),
    "coco": _coco,
    "masks": lambda src, split, path: MaskReader(path, src.num_classes, src.ignore_index, train_dir=src.train),
    "ade20k": lambda src, split, path: ADE20KReader(path, split, src.ignore_index),
}
# formats under one `root` whose splits are names (`train_split` / `val_split`): format -> reader(src, split name)
ROOT_READERS = {"cityscapes": CityscapesReader, "torchvision": TorchvisionReader}


# formats whose one folder holds every split (as mmsegmentation users write it): `root` may name it for both
FOLDER_OF_SPLITS = ("ade20k",)


def make_reader(src: DataConfig, split: str) -> Reader:
    """The reader of one split ("train" or "val") of a source; problems are collected, not raised."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if src.format in ROOT_READERS:
        return ROOT_READERS[src.format](src, src.train_split if split == "train" else src.val_split)
    if src.format not in PATH_READERS:
        raise DataError(f"sources.{src.name}.format: unknown format {src.format!r}")
    path = src.train if split == "train" else src.val
    if not path and src.format in FOLDER_OF_SPLITS:  # ADEChallengeData2016 holds both splits: `root` names it once
        path = src.root
    if not path:
        return _missing(f"sources.{src.name}.{split}", "not set in the config")
    return PATH_READERS[src.format](src, split, path)


def check_data(sources: list[DataConfig], progress: bool = False) -> list[str]:
    """Every problem of every split of every source (each image fully decoded), as "path: reason"."""
    problems: list[str] = []
    for src in sources:
        for split in ("train", "val"):
            reader = make_reader(src, split)
            problems += reader.problems
            for i in dist.progress(range(len(reader)), desc=f"{src.name}/{split}", disable=not progress, leave=False):
                problems += reader.check(i)
    return list(dict.fromkeys(problems))  # same problem seen from two splits: once
