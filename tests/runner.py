"""Helpers for tests that run the real CLI (single process or torchrun) on a demo world."""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


# The two cls sources of the demo world at 32 px, batch {bs}: the tiny cls-only configs of the tests.
CLS_SOURCES = """[[sources]]
name = "shapes-cls"
task = "cls"
format = "imagefolder"
train = "{world}/shapes-cls/train"
val = "{world}/shapes-cls/val"
image_size = 32
batch_size = {bs}

[[sources]]
name = "texture-cls"
task = "cls"
format = "csv"
train = "{world}/texture-cls/train.csv"
val = "{world}/texture-cls/val.csv"
image_size = 32
batch_size = {bs}
"""


def demo_toml(world: Path, runs: Path, dest: Path, extra: str = "") -> Path:
    """configs/demo.toml with its data and run paths moved into tmp dirs (plus `extra` TOML appended)."""
    text = (REPO / "configs" / "demo.toml").read_text()
    text = text.replace("data/demo", str(world)).replace("runs/demo", str(runs))
    dest.write_text(text + "\n" + extra)
    return dest


def tiny_sizes(cls_batch: int = 4) -> list[str]:
    """Overrides that shrink configs/demo.toml's sources for CPU tests: images of 32 px (64 for det, whose
    anchors need room), batches of `cls_batch` for the cls sources and of 2 for det and seg; and the squeeze's
    teacher statistics from 2 batches of every source, not 20 (each runs every teacher branch: in a 3-step
    squeeze those 20 batches cost several times the steps)."""
    cls, dense = ("shapes-cls", "texture-cls"), ("shapes-det", "colors-det", "shapes-seg")
    return ([f"sources.{s}.batch_size={cls_batch}" for s in cls] + [f"sources.{s}.batch_size=2" for s in dense] +
            [f"sources.{s}.image_size={64 if s.endswith('-det') else 32}" for s in (*cls, *dense)] +
            ["squeeze.norm_steps=2"])


def image_folder(root: Path, classes: dict[str, tuple[int, int, int] | None], per_split: dict[str, int], size: int,
                 noise: int = 0, seed: int = 0) -> Path:
    """The tiny imagefolders of the tests: root/SPLIT/CLASS/I.png, `per_split[SPLIT]` square images of `size` px
    per class, each its class's RGB colour plus uniform noise in [0, noise] (colour None: random pixels). Seeded:
    the same call writes the same bytes."""
    rng = np.random.default_rng(seed)
    for split, n in per_split.items():
        for c, rgb in classes.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                if rgb is None:
                    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                else:
                    arr = np.clip(np.array(rgb) + rng.integers(0, noise + 1, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


def as_sets(overrides: list[str]) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]: overrides as CLI arguments."""
    return [a for o in overrides for a in ("--set", o)]


def cli(*args: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(REPO / "cli.py"), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(REPO / "cli.py"), *args]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")  # 2 cores: one thread per process keeps timings and results stable
    return e


def run(*args: str, nproc: int = 1, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cli(*args, nproc=nproc), cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {' '.join(args)}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}")
    return p


def run_and_signal(*args: str, log: Path, after_step: int, sig=signal.SIGTERM, timeout: int = 600) -> int:
    """Start the command, send `sig` once log.jsonl shows `after_step`, return the exit code."""
    p = subprocess.Popen(cli(*args), cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            if p.poll() is not None:
                raise AssertionError(f"finished before the signal (exit {p.returncode}):\n{p.stdout.read()[-3000:]}")
            if log.exists() and any(json.loads(l).get("event") == "train" and json.loads(l)["step"] >= after_step
                                    for l in log.read_text().splitlines() if l.strip()):
                p.send_signal(sig)
                break
            time.sleep(0.05)
        out, _ = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode


def model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["model"]


def train_steps(log: Path) -> list[int]:
    return [json.loads(l)["step"] for l in log.read_text().splitlines() if l.strip() and json.loads(l)["event"] == "train"]


def assert_same_state(a: dict, b: dict, rtol: float = 0.0, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if rtol == 0 and atol == 0:
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            torch.testing.assert_close(a[k].double(), b[k].double(), rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


# The tiny expand run of the stop and run-directory tests: ResNet-18, cls sources (plus one det source), 32 px.
EXPAND_CONFIG = """
[model]
arch = "resnet18"
tasks = {tasks}
reconcile = "hrnet"
reconcile_stages = [1, 2]
reconcile_width = 0.125
fpn_channels = 32
rpn_pre_nms_top_n = 100
rpn_post_nms_top_n = 50
box_batch_size_per_image = 32
box_head_dim = 64

{cls_sources}{det}{seg}
[expand]
steps = {steps}
lr = 0.003
optimizer = "adamw"
weight_decay = 0.05
warmup_steps = 2
eval_every = {eval_every}
ckpt_every = 100
log_every = 1
workers = 1
seed = 0
out = "{out}"
"""

EXPAND_DET = """
[[sources]]
name = "shapes-det"
task = "det"
format = "coco"
train = "{world}/shapes-det/train"
train_ann = "{world}/shapes-det/train.json"
val = "{world}/shapes-det/val"
val_ann = "{world}/shapes-det/val.json"
image_size = 64
batch_size = 1
"""


EXPAND_SEG = """
[[sources]]
name = "shapes-seg"
task = "seg"
format = "masks"
train = "{world}/shapes-seg/train"
val = "{world}/shapes-seg/val"
num_classes = 9
image_size = 32
batch_size = {bs}
"""


def write_config(tmp_path: Path, world: Path, name: str, *, steps: int, eval_every: int = 0, det: bool = False,
                 seg: bool = False, bs: int = 4, extra: str = "") -> Path:
    """tmp_path/NAME.toml: the tiny expand run (cls sources of batch `bs`, det and seg sources if asked; the seg
    source's batch is `bs` too), writing to tmp_path/NAME, plus `extra` TOML appended."""
    p = tmp_path / f"{name}.toml"
    tasks = ["cls"] + ["det"] * det + ["seg"] * seg
    p.write_text(EXPAND_CONFIG.format(world=world, out=tmp_path / name, steps=steps, eval_every=eval_every,
                                      tasks=str(tasks).replace("'", '"'), cls_sources=CLS_SOURCES.format(world=world, bs=bs),
                                      det=EXPAND_DET.format(world=world) if det else "",
                                      seg=EXPAND_SEG.format(world=world, bs=bs) if seg else "") + extra)
    return p


class Proc:
    """A command in its own session (its own process group, as under a cluster's job step); output read by a thread."""

    def __init__(self, cmd: list[str], extra_env: dict | None = None):
        self.p = subprocess.Popen(cmd, cwd=REPO, env={**env(), **(extra_env or {})}, start_new_session=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(ln) for ln in self.p.stdout], daemon=True).start()

    def wait_for(self, pattern: re.Pattern, timeout: float = 240) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.p.poll() is None, f"exited {self.p.returncode} before {pattern.pattern!r}:\n{self.output}"
                continue
            self.seen.append(line)
            if m := pattern.search(line):
                return m
        os.killpg(self.p.pid, signal.SIGKILL)
        raise AssertionError(f"no {pattern.pattern!r} within {timeout} s:\n{self.output}")

    def signal_group(self, sig=signal.SIGTERM) -> None:
        os.killpg(self.p.pid, sig)

    def finish(self, timeout: float = 240) -> int:
        try:
            code = self.p.wait(timeout=timeout)
        finally:
            if self.p.poll() is None:
                os.killpg(self.p.pid, signal.SIGKILL)
        time.sleep(0.2)  # let the reader thread drain the pipe
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code

    @property
    def output(self) -> str:
        return "".join(self.seen)
