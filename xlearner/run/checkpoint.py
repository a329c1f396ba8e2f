"""Run checkpoints: atomic writes, safe loads, and "resume from the latest".

A run checkpoint (docs/DESIGN.md §5) is one `torch.save`d dict with `model`,
`optimizer`, `scheduler`, `scaler`, `step`, `config`, `loader` and `rng`, plus
`meta` (what kind of model it is and its per-source class counts) so that it
can be rebuilt without the code that wrote it. It holds only tensors and
plain Python values, so every load uses `weights_only=True`.

Writes go to a temporary file in the same directory; only once that file is
complete and fsynced is it renamed over `checkpoint.pt` (the previous one
becomes `checkpoint_prev.pt`). So a crash or a full disk mid-write never costs
the last good checkpoint: a failed write removes its temp file, leaves
`checkpoint.pt` as it was and raises a `CheckpointError` that says how much
space there is and how much a checkpoint needs, on every rank at once.
Temp files of a writer that was killed are removed when the next run starts.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import torch

from .dist import broadcast_object, is_main_process

CKPT = "checkpoint.pt"
PREV = "checkpoint_prev.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _write_complete(obj, path: Path) -> Path:
    """torch.save `obj` to a temp file next to `path`, fsynced; returns the temp path.

    On any write error the temp file is removed and the error re-raised, so a full
    disk never leaves a half-written orphan behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:  # make sure the bytes are on disk before a rename publishes them
            os.fsync(f.fileno())
    except BaseException:  # also a KeyboardInterrupt mid-write: never leave the temp file behind
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def save_atomic(obj, path: str | Path) -> None:
    """torch.save to `path` via a complete, fsynced temp file + rename (rank 0 only)."""
    if not is_main_process():
        return
    path = Path(path)
    os.replace(_write_complete(obj, path), path)


def _tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _write_error(path: Path, state: dict, detail: str) -> str:
    """The one-line message for a checkpoint that could not be written: path, free space, size needed."""
    free = shutil.disk_usage(path.parent).free
    need = path.stat().st_size if path.is_file() else _tensor_bytes(state)  # the last one's size is the best guess
    kept = f"the last good checkpoint {path} is untouched" if path.is_file() else "no earlier checkpoint exists"
    return (f"{path}: could not write the checkpoint ({detail}): {free / 2**20:.0f} MB free on that disk, "
            f"a checkpoint needs about {need / 2**20:.0f} MB; {kept}. Free some space and run the same command "
            "again to resume.")


def save_run_checkpoint(state: dict, out: str | Path) -> Path:
    """Write `out/checkpoint.pt`, keeping the previous one as `checkpoint_prev.pt`.

    Called on every rank; rank 0 writes. The new file is complete on disk before
    the old one is rotated. If the write fails, every rank raises the same
    CheckpointError (rank 0 broadcasts the outcome), so no rank is left waiting
    in a collective for one that has stopped.
    """
    out = Path(out)
    path = out / CKPT
    error = None
    if is_main_process():
        failed = None
        try:
            tmp = _write_complete(state, path)
        except OSError as e:
            failed = e.strerror or str(e)
        except RuntimeError as e:  # torch.save's zip writer reports a short write (ENOSPC) as a RuntimeError
            failed = f"torch.save: {str(e).splitlines()[0]}"
        if failed:  # measured once the exception is gone: its frames hold the deleted temp file open
            error = _write_error(path, state, failed)
        else:
            if path.exists():
                os.replace(path, out / PREV)
            os.replace(tmp, path)
            (out / "config.json").write_text(json.dumps(state.get("config", {}), indent=2))
    error = broadcast_object(error)
    if error:
        raise CheckpointError(error)
    return path


def remove_stale_tmp(out: str | Path) -> list[Path]:
    """Delete temp files left by a checkpoint writer that was killed mid-write (rank 0; at the start of a run)."""
    if not is_main_process():
        return []
    stale = sorted(Path(out).glob(f".{CKPT}.tmp*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


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


# ----------------------------------------------------------------------------
# identities and names of saved weights

def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def strip_prefixes(sd: dict) -> dict:
    """Remove DDP's `module.` and torch.compile's `_orig_mod.` prefixes."""
    out = {}
    for k, v in sd.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out
