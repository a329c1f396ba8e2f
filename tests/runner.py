"""Helpers for tests that run the real CLI (single process or torchrun) on a demo world."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

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
    anchors need room), batches of `cls_batch` for the cls sources and of 2 for det and seg."""
    cls, dense = ("shapes-cls", "texture-cls"), ("shapes-det", "colors-det", "shapes-seg")
    return ([f"sources.{s}.batch_size={cls_batch}" for s in cls] + [f"sources.{s}.batch_size=2" for s in dense] +
            [f"sources.{s}.image_size={64 if s.endswith('-det') else 32}" for s in (*cls, *dense)])


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
