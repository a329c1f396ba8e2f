"""tools/clipart.py: openclipart-png's categories as a small class-stratified imagefolder, on a tree made here."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from runner import REPO, cli, env
from xlearner.tools import clipart


def _tree(root, counts):
    for cat, n in counts.items():
        sub = root / cat / "nested"  # drawings sit in sub-folders too
        sub.mkdir(parents=True)
        for i in range(n):
            im = Image.new("RGBA", (30, 20), (0, 0, 0, 0))
            im.paste((200, 10, 10, 255), (5, 5, 25, 15))
            im.save(sub / f"{i:03d}.png")


def test_subset_split_and_skips(tmp_path, monkeypatch):
    root = tmp_path / "png"
    _tree(root, {"animals": 64, "food": 100, "unsorted": 80, "buttons": 3})
    # two drawings over Pillow's pixel limit: one past twice the limit (an error), one just past it (a warning)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGBA", (100, 100)).save(root / "food" / "huge.png")
    Image.new("RGBA", (40, 40)).save(root / "food" / "big.png")
    counts = clipart.write_clipart(tmp_path / "out", root)
    again = clipart.write_clipart(tmp_path / "out2", root)
    monkeypatch.undo()
    # animals: 64 -> 16 val, 48 train; food: 102 -> 26 val, the rest (76) train; unsorted and buttons left out
    assert counts["classes"] == ["animals", "food"]
    assert counts["skipped"] == {"over Pillow's pixel limit": 2}
    assert counts["val"] + counts["train"] == 64 + 100
    assert len(list((tmp_path / "out" / "val" / "animals").iterdir())) == 16
    assert len(list((tmp_path / "out" / "train" / "animals").iterdir())) == 48
    im = Image.open(next((tmp_path / "out" / "train" / "food").iterdir()))
    assert im.size == (64, 64) and im.mode == "RGB"
    px = np.asarray(im)
    assert (px[0, 0] == 255).all() and px[32, 32, 0] == 200  # transparent -> white; the drawing kept, centred
    assert json.loads((tmp_path / "out" / "clipart.json").read_text())["skipped"] == counts["skipped"]
    # the same subset every time
    assert sorted(p.name for p in (tmp_path / "out2" / "val" / "food").iterdir()) == sorted(
        p.name for p in (tmp_path / "out" / "val" / "food").iterdir()) and again == counts


@pytest.mark.slow
def test_missing_package_is_one_line(tmp_path):
    import subprocess
    p = subprocess.run(cli("clipart", "--out", str(tmp_path / "o"), "--root", str(tmp_path / "none")), env=env(),
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr == f"Error: {tmp_path / 'none'}: not found (Debian's openclipart-png: apt-get install openclipart-png)\n"
