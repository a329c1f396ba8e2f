"""A second real downstream set: Debian's openclipart-png as a small imagefolder of its categories.

The package (public domain; `apt-get install openclipart-png`) holds about 6,900 PNG drawings under
`/usr/share/openclipart/png/<category>/...`, in 22 top-level categories of very different sizes
(3 to 1,797 drawings) and nested sub-folders. `write_clipart` turns it into what the transfer reads,
an imagefolder `OUT/{train,val}/<category>/<n>.png`:

- the categories with at least MIN_PER_CLASS drawings, "unsorted" left out (it is no category);
- a fixed, class-stratified subset: each category's files sorted, shuffled with SEED, VAL_SHARE of
  them for val (at most MAX_VAL) and the rest for train (at most MAX_TRAIN);
- each drawing composited on white (the PNGs are transparent) and fitted into a SIZE x SIZE square.

Files that Pillow refuses (over its decompression-bomb pixel limit, or unreadable) are skipped and
counted, never decoded in full: the counts are returned and written to OUT/clipart.json.
"""
from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

from PIL import Image

DEBIAN_ROOT = "/usr/share/openclipart/png"
MIN_PER_CLASS = 60
VAL_SHARE = 0.25
MAX_VAL = 40
MAX_TRAIN = 120
SIZE = 64
SEED = 0
EXCLUDED = ("unsorted",)


def pick(root: Path) -> dict[str, dict[str, list[Path]]]:
    """{split: {category: [file]}}: the fixed class-stratified subset of `root`'s categories."""
    out: dict[str, dict[str, list[Path]]] = {"train": {}, "val": {}}
    for cat in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in EXCLUDED):
        files = sorted(cat.rglob("*.png"))
        if len(files) < MIN_PER_CLASS:
            continue
        random.Random(f"{SEED}/{cat.name}").shuffle(files)
        n_val = min(round(VAL_SHARE * len(files)), MAX_VAL)
        out["val"][cat.name] = files[:n_val]
        out["train"][cat.name] = files[n_val:n_val + MAX_TRAIN]
    return out


def thumbnail(path: Path, size: int = SIZE) -> Image.Image:
    """The drawing on white, fitted into size x size and centred. Raises Image.DecompressionBombError (a warning
    turned into an error: Pillow only warns between its limit and twice it) or OSError for a file to skip."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im.draft("RGB", (size, size))
            rgba = im.convert("RGBA")
    rgba.thumbnail((size, size))
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(rgba, ((size - rgba.width) // 2, (size - rgba.height) // 2), rgba)
    return canvas


def write_clipart(out: str | Path, root: str | Path = DEBIAN_ROOT) -> dict:
    """Write the imagefolder under `out` (replacing it); {"classes", "train", "val", "skipped": {reason: n}}."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not found (Debian's openclipart-png: apt-get install openclipart-png)")
    shutil.rmtree(out, ignore_errors=True)
    chosen = pick(root)
    counts: dict = {"classes": sorted(chosen["train"]), "train": 0, "val": 0, "skipped": {}}
    for split, cats in chosen.items():
        for cat, files in cats.items():
            (out / split / cat).mkdir(parents=True, exist_ok=True)
            for i, f in enumerate(files):
                try:
                    image = thumbnail(f)
                except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                    counts["skipped"]["over Pillow's pixel limit"] = counts["skipped"].get(
                        "over Pillow's pixel limit", 0) + 1
                    continue
                except OSError:
                    counts["skipped"]["unreadable"] = counts["skipped"].get("unreadable", 0) + 1
                    continue
                image.save(out / split / cat / f"{i:04d}.png")
                counts[split] += 1
    (out / "clipart.json").write_text(json.dumps({**counts, "root": str(root), "size": SIZE}, indent=1) + "\n")
    return counts
