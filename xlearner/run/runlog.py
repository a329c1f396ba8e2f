"""A run's log: `OUT/log.jsonl` (one JSON object per event, written by rank 0), trimmed on resume, and the facts
the engine records in it (the code's git commit, peak memory)."""
from __future__ import annotations

import json
import resource
import subprocess
from pathlib import Path

import torch

from . import dist


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def max_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def log_event(out: Path, record: dict) -> None:
    if dist.is_main_process():
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def truncate_log(out: Path, step: int) -> None:
    """On resume, drop log lines newer than the checkpoint so no step appears twice."""
    path = out / "log.jsonl"
    if not dist.is_main_process() or not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))
