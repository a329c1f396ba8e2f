"""Run checkpoints: atomic writes, safe loads, and "resume from the latest".

A run checkpoint (DESIGN.md §5) is one `torch.save`d dict with `model`,
`optimizer`, `scheduler`, `scaler`, `step`, `config`, `loader` and `rng`, plus
`meta` (what kind of model it is and its per-source class counts) so that it
can be rebuilt without the code that wrote it. It holds only tensors and
plain Python values, so every load uses `weights_only=True`.

Writes go to a temporary file in the same directory and are then renamed over
`checkpoint.pt`, so a crash mid-write never leaves a half-written checkpoint
under the real name. The previous checkpoint is kept as `checkpoint_prev.pt`.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import torch

from .dist import is_main_process

CKPT = "checkpoint.pt"
PREV = "checkpoint_prev.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def save_atomic(obj, path: str | Path) -> None:
    """torch.save to `path` via a temp file + rename (rank 0 only)."""
    if not is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:  # make sure the bytes are on disk before the rename publishes them
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_run_checkpoint(state: dict, out: str | Path) -> Path:
    """Write `out/checkpoint.pt`, keeping the previous one as `checkpoint_prev.pt`."""
    out = Path(out)
    path = out / CKPT
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        if path.exists():
            os.replace(path, out / PREV)
        save_atomic(state, path)
        (out / "config.json").write_text(json.dumps(state.get("config", {}), indent=2))
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """torch.load(weights_only=True) with errors that name the file and say why."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint is empty (0 bytes); the write was probably interrupted")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut one loses its directory
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint (not a complete torch.save archive)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: it needs pickled code, which weights_only=True does not allow "
            f"(only tensors and plain Python values are accepted). Detail: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def latest_checkpoint(out: str | Path) -> Path | None:
    """The checkpoint a re-run should resume from, or None for a fresh run.

    Falls back to `checkpoint_prev.pt` only if `checkpoint.pt` is missing, which
    happens if a run died between the two renames of `save_run_checkpoint`.
    """
    out = Path(out)
    for name in (CKPT, PREV):
        if (out / name).is_file():
            return out / name
    return None
