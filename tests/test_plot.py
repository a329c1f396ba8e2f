"""`python cli.py plot RUN [RUN ...]` (xlearner/tools/plot.py): training curves as a PNG.

One tiny real expand run (a two-class imagefolder written here, ResNet-10, 4 steps, two
evaluations) is drawn alone and overlaid with a hand-written squeeze log, whose per-source
losses are "source/term" keys (one source name holds a '/').
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from runner import image_folder
from xlearner import expand
from xlearner.cli import main
from xlearner.configfile import load_config
from xlearner.tools.plot import PANEL_KEY, split_loss_key

TOML = """
[model]
arch = "resnet10"
tasks = ["cls"]
reconcile = "none"

[[sources]]
name = "tiny"
task = "cls"
format = "imagefolder"
train = "tiny/train"
val = "tiny/val"
image_size = 32
batch_size = 4

[expand]
steps = 4
warmup_steps = 1
workers = 0
log_every = 1
eval_every = 2
"""


@pytest.fixture(scope="module")
def expand_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plot")
    image_folder(root / "tiny", {"a": None, "b": None}, {"train": 4, "val": 4}, 40)  # random pixels
    (root / "run.toml").write_text(TOML)
    expand.run(load_config(root / "run.toml", [f'data_root="{root}"', f'expand.out="{root / "expand"}"']))
    return root / "expand"


def panels(png: Path) -> list[str]:
    with Image.open(png) as im:
        im.load()
        return json.loads(im.text[PANEL_KEY])


def squeeze_log(out: Path) -> Path:
    """A squeeze's log as engine.py writes it: losses per source and term; one source name holds '/'."""
    out.mkdir()
    config = {"sources": [{"name": "tiny"}, {"name": "x/y"}]}
    lines = [{"event": "start", "stage": "squeeze", "step": 0, "config": config}]
    for step in (1, 2):
        losses = {f"{s}/{t}": 1.0 / step for s in ("tiny", "x/y") for t in ("task", "feat", "kd")}
        lines.append({"event": "train", "step": step, "loss": sum(losses.values()), "losses": losses, "lr": 0.1,
                      "images_per_s": 10.0, "data_wait": 0.1})
    lines.append({"event": "eval", "step": 2, "metrics": {"x/y": {"mIoU": 5.0, "per_class_iou": [1.0, 9.0]}}})
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return out


def test_plot_a_finished_run(expand_run):
    result = CliRunner().invoke(main, ["plot", str(expand_run)])
    png = expand_run / "curves.png"
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {png}"
    # total loss, the source's loss, lr, images/s, data-wait, and top1 (its majority baseline dotted inside)
    assert panels(png) == ["total loss", "loss: tiny", "learning rate", "images/s", "data-wait (share of time)",
                           "tiny top1"]
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1500, 640)  # 3 columns x 2 rows of 500 x 320 px
        pixels = np.asarray(im.convert("L"))
    ink = [(pixels[r * 320:(r + 1) * 320, c * 500:(c + 1) * 500] < 200).mean() for r in range(2) for c in range(3)]
    assert all(0.02 < k < 0.5 for k in ink), ink  # every cell holds a drawn panel, none is a filled square


def test_plot_overlays_runs_and_their_loss_terms(expand_run, tmp_path):
    squeeze = squeeze_log(tmp_path / "squeeze")
    out = tmp_path / "both.png"
    result = CliRunner().invoke(main, ["plot", str(expand_run), str(squeeze), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert panels(out) == ["total loss", "loss: tiny", "loss: x/y", "learning rate", "images/s",
                           "data-wait (share of time)", "tiny top1", "x/y mIoU"]
    with Image.open(out) as im:
        assert im.size == (1500, 960)
    assert not (squeeze / "curves.png").exists()


def test_loss_keys_split_at_the_source_name():
    sources = ["coco", "x/y"]
    assert split_loss_key("coco", sources) == ("coco", "")
    assert split_loss_key("coco/feat", sources) == ("coco", "feat")
    assert split_loss_key("x/y", sources) == ("x/y", "")
    assert split_loss_key("x/y/kd", sources) == ("x/y", "kd")
    assert split_loss_key("other/task", []) == ("other", "task")  # a log without a start record


def test_without_matplotlib_one_line_and_exit_1(expand_run, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` raises ImportError
    result = CliRunner().invoke(main, ["plot", str(expand_run), "--out", str(expand_run / "none.png")])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "Error: plot needs matplotlib, an optional extra: pip install '.[plots]' (or pip install matplotlib)"]
    assert not (expand_run / "none.png").exists()


def test_not_a_run_directory(tmp_path):
    result = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"Error: {tmp_path / 'log.jsonl'}: not found (is {tmp_path} a run directory of expand or squeeze?)"]
