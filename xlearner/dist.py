"""Distributed helpers: the one place that knows about process groups.

One code path serves a laptop CPU, one GPU and N GPUs on M nodes:
- `init_distributed()` reads `RANK`/`LOCAL_RANK`/`WORLD_SIZE` (set by torchrun,
  or translated from SLURM's `SLURM_PROCID`/`SLURM_LOCALID`/`SLURM_NTASKS`) and
  starts a process group: nccl on CUDA, gloo on CPU. Without those variables it
  is a single process and starts nothing.
- `get_rank`/`get_world_size`/`is_main_process` work with or without a group.
- `log()` prints on rank 0 only; every file write in the project is guarded by
  `is_main_process()`.
"""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def log(*args, **kwargs) -> None:
    """print() on rank 0 only (tqdm-safe: it writes above any progress bar)."""
    if is_main_process():
        from tqdm import tqdm

        tqdm.write(" ".join(str(a) for a in args), file=kwargs.pop("file", sys.stdout))


def _slurm_to_torchrun_env() -> None:
    # `srun python cli.py expand` sets SLURM_* but not the torchrun variables.
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in os.environ:
            nodes = os.environ.get("SLURM_STEP_NODELIST", os.environ.get("SLURM_NODELIST", "127.0.0.1"))
            os.environ["MASTER_ADDR"] = nodes.split(",")[0].split("[")[0]


def init_distributed(device: str = "auto") -> torch.device:
    """Start the process group if launched by torchrun/SLURM and return this rank's device."""
    _slurm_to_torchrun_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_dist():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=30),
            device_id=dev if use_cuda else None,
        )
    return dev


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device | None = None) -> dict[str, float]:
    """Average a dict of Python floats over ranks (one collective for the whole dict)."""
    if not is_dist() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= get_world_size()
    return dict(zip(keys, t.tolist()))


def all_reduce_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t)
    return t


def all_gather_object(obj) -> list:
    """Gather a picklable object from every rank (evaluation results)."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
