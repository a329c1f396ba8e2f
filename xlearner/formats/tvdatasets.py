"""The `torchvision` source format: any `torchvision.datasets` class as a reader.

One of the source formats (formats/__init__.py, docs/DESIGN.md §6): with `format =
"torchvision"`, a source (upstream or a transfer dataset) is read by the
`torchvision.datasets` class named by its `name` ("FashionMNIST", "CIFAR10",
"VOCDetection", ...; a suffix after '@' is a tag, and the `year` for VOC).
`TorchvisionReader` adapts that class to files.Reader's contract
(`load(i) -> (PIL RGB image, target)`, problems collected while indexing),
turning VOC XML into det targets (and COCO ground truth for COCOeval) and
label images into seg maps. formats.make_reader picks it.

FashionMNIST (and MNIST/KMNIST) from local files: torchvision reads the
*uncompressed* idx files `<root>/FashionMNIST/raw/{train,t10k}-{images-idx3,
labels-idx1}-ubyte`. `root` may also be a folder holding the four `*-ubyte.gz`
files directly (Debian's `/usr/share/datasets/fashion-mnist`) or in
`<root>/FashionMNIST/raw/`: they are gunzipped once, next to themselves when
writable, else into `$XLEARNER_CACHE` (default ~/.cache/xlearner). To lay a
root out by hand: `prepare_mnist_like("/usr/share/datasets/fashion-mnist",
"data/torchvision")`, then `root = "data/torchvision"`.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import inspect
import io
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..config import DataConfig
from .files import BadSample, Reader

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]


def prepare_mnist_like(src_dir, root, name: str = "FashionMNIST") -> Path:
    """Gunzip the idx files `src_dir/*-ubyte.gz` into `root/<name>/raw/`, torchvision's layout."""
    raw = Path(root) / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in sorted(Path(src_dir).glob("*-ubyte.gz")):
        dest = raw / gz.name[:-3]
        if dest.is_file() and dest.stat().st_mtime >= gz.stat().st_mtime:
            continue
        tmp = dest.with_suffix(f".tmp{os.getpid()}")  # atomic: ranks may race on a shared disk
        with gzip.open(gz, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(tmp, dest)
    return Path(root)


def _mnist_root(cls, root: str) -> str:
    """A root under which torchvision finds the uncompressed idx files (see the module doc)."""
    needed = [os.path.basename(f)[:-3] for f, _ in cls.resources]
    raw = Path(root) / cls.__name__ / "raw"
    if all((raw / n).is_file() for n in needed):
        return root
    for cand in (raw, Path(root)):
        if all((cand / f"{n}.gz").is_file() for n in needed):
            if cand == raw and os.access(raw, os.W_OK):  # unpack in place
                return str(prepare_mnist_like(cand, root, cls.__name__))
            cache = Path(os.environ.get("XLEARNER_CACHE", "~/.cache/xlearner")).expanduser()
            key = hashlib.sha1(str(cand.resolve()).encode()).hexdigest()[:12]
            return str(prepare_mnist_like(cand, cache / "torchvision" / key, cls.__name__))
    return root  # torchvision's own "Dataset not found" names the root


class TorchvisionReader(Reader):
    def __init__(self, src: DataConfig, split: str):
        super().__init__()
        import torchvision.datasets as tvd

        self.task = src.task
        cls_name, _, tag = src.name.partition("@")
        cls = getattr(tvd, cls_name, None) or {n.lower(): getattr(tvd, n) for n in tvd.__all__}.get(cls_name.lower())
        if not inspect.isclass(cls):
            return self.problem(f"sources.{src.name}", f"no torchvision.datasets class named {cls_name!r}")
        self.cls_name, self.ds = cls.__name__, None
        params = inspect.signature(cls.__init__).parameters
        root = src.root
        if issubclass(cls, tvd.MNIST) and all(f.endswith("-ubyte.gz") for f, _ in cls.resources):
            root = _mnist_root(cls, root)
        kwargs = {"root": root}
        if "train" in params:
            kwargs["train"] = split.startswith("train")
        elif "split" in params:
            kwargs["split"] = split
        elif "image_set" in params:
            kwargs["image_set"] = split
        else:
            return self.problem(f"sources.{src.name}", f"{cls.__name__} has no train/split/image_set "
                                                      f"argument, so it has no {split!r} split")
        if "year" in params and tag:
            kwargs["year"] = tag
        if "download" in params:
            kwargs["download"] = src.download
        try:
            self.ds = cls(**kwargs)
        except (RuntimeError, OSError, ValueError) as e:  # torchvision's "Dataset not found ..." etc.
            return self.problem(src.root, f"{cls.__name__}({split!r}) could not be opened: {e}")
        self.items = range(len(self.ds))
        if cls_name.startswith("VOC"):
            # det labels 1..20 (0 is the detector's background); seg maps hold 0 = background, 1..20, 255
            self.classes = VOC_CLASSES if self.task == "det" else ["background"] + VOC_CLASSES
        elif getattr(self.ds, "classes", None):
            self.classes = [str(c) for c in self.ds.classes]
        elif src.num_classes:
            self.classes = [str(k) for k in range(src.num_classes)]
        else:
            self.problem(f"sources.{src.name}", f"{cls.__name__} does not list its classes: set num_classes")
        if self.task == "det" and not isinstance(self.ds, tvd.VOCDetection):
            self.problem(f"sources.{src.name}", "det sources from torchvision must be VOCDetection "
                                                "(use format = 'coco' for COCO)")
        self.cat_ids = list(range(1, len(self.classes) + 1))
        self.ignore_index = src.ignore_index
        self._coco = None

    def load(self, i):
        try:
            img, target = self.ds[i]
        except (OSError, SyntaxError, ValueError, ET.ParseError) as e:
            raise BadSample(f"{self.cls_name}[{i}] under {self.ds.root}", f"{type(e).__name__}: {e}") from None
        img = img.convert("RGB")
        if self.task == "det":
            return img, self._voc_target(target, i)
        if self.task == "seg":
            return img, self._seg_target(target, i)
        return img, int(target)

    def _seg_target(self, target, i) -> np.ndarray:
        """The label map (a palette image's indices are its labels), every value a class or ignore_index."""
        mask = np.array(target)
        bad = (mask >= len(self.classes)) & (mask != self.ignore_index)
        if bad.any():
            files = getattr(self.ds, "masks", None)  # VOCSegmentation's mask paths, in index order
            where = f"{self.cls_name}[{i}] under {self.ds.root}" + (f" ({files[i]})" if isinstance(files, list) else "")
            raise BadSample(where,
                            f"mask values {np.unique(mask[bad])[:8].tolist()} are outside "
                            f"[0, {len(self.classes)}) and not ignore_index {self.ignore_index}")
        return mask

    def _voc_target(self, target, image_id):
        boxes, labels = [], []
        for obj in target["annotation"].get("object", []):
            if int(obj.get("difficult", 0)):
                continue  # VOC's "difficult" is COCO's crowd: scored as ignore, never a target
            b = obj["bndbox"]  # 1-based inclusive pixel coordinates
            boxes.append([float(b["xmin"]) - 1, float(b["ymin"]) - 1, float(b["xmax"]), float(b["ymax"])])
            labels.append(VOC_CLASSES.index(obj["name"]) + 1)
        return {"boxes": np.array(boxes, np.float32).reshape(-1, 4), "labels": np.array(labels, np.int64),
                "image_id": image_id}

    @property
    def coco(self):
        """COCO ground truth built from the VOC XML files (difficult objects as crowd), for COCOeval."""
        if self._coco is None and self.task == "det":
            from pycocotools.coco import COCO

            images, anns = [], []
            for i, xml in enumerate(self.ds.annotations):
                a = self.ds.parse_voc_xml(ET.parse(xml).getroot())["annotation"]
                images.append({"id": i, "file_name": a["filename"],
                               "width": int(a["size"]["width"]), "height": int(a["size"]["height"])})
                t = a.get("object", [])
                for obj in t:
                    b = obj["bndbox"]
                    x, y = float(b["xmin"]) - 1, float(b["ymin"]) - 1
                    w, h = float(b["xmax"]) - x, float(b["ymax"]) - y
                    anns.append({"id": len(anns) + 1, "image_id": i, "category_id": VOC_CLASSES.index(obj["name"]) + 1,
                                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(obj.get("difficult", 0))})
            self._coco = COCO()
            self._coco.dataset = {"images": images, "annotations": anns,
                                  "categories": [{"id": k + 1, "name": n} for k, n in enumerate(VOC_CLASSES)]}
            with contextlib.redirect_stdout(io.StringIO()):
                self._coco.createIndex()
        return self._coco
