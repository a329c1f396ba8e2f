"""Distributed helpers: the one place that knows about process groups.

One code path serves a laptop CPU, one GPU and N GPUs on M nodes:
- `init_distributed()` reads `RANK`/`LOCAL_RANK`/`WORLD_SIZE` (set by torchrun,
  or translated from SLURM's `SLURM_PROCID`/`SLURM_LOCALID`/`SLURM_NTASKS`) and
  starts a process group: nccl on CUDA, gloo on CPU. Without those variables it
  is a single process and starts nothing.
- `get_rank`/`get_world_size`/`is_main_process` work with or without a group.
- `log()` prints on rank 0 only; every file write in the project is guarded by
  `is_main_process()`. `progress()` is every progress bar of the project: a
  tqdm on rank 0 in a terminal, nothing in a log file.
- `from_main(fn)`: rank-0-only work (COCOeval) waited for in the store, not in a
  collective; `cpu_group()`: a gloo group for host-side agreement under nccl.
- SyncBatchNorm, everywhere or only where a forward builds a graph.

Stopping on a signal is preempt.py; `python -m xlearner.run.torchrun` is torchrun.py.
"""
from __future__ import annotations

import datetime
import itertools
import os
import pickle
import sys
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn


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


def progress(iterable=None, **tqdm_kwargs):
    """A tqdm bar, shown on rank 0 when stderr is a terminal; `disable=True` hides it in any case.

    In a log file (`cli.py expand ... 2>log`, a SLURM job) a bar is a stream of
    carriage-return redraws that reads as one endless line: there the periodic
    plain lines (the engine's `log_every`) are the progress report."""
    from tqdm import tqdm

    hidden = tqdm_kwargs.pop("disable", False) or not (is_main_process() and sys.stderr.isatty())
    return tqdm(iterable, disable=hidden, **tqdm_kwargs)


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


_DEVICE: torch.device | None = None  # this rank's device: where collectives put their tensors
_CPU_GROUP = None  # under nccl: a gloo group of every rank, for agreements on CPU tensors (cpu_group)
_TIMEOUT: datetime.timedelta | None = None  # the process group's timeout (`dist_timeout_min`), for the CPU group too


def init_distributed(timeout_min: float = 30.0) -> torch.device:
    """Start the process group if launched by torchrun/SLURM and return this rank's device (CUDA if any).
    `timeout_min`: how long a collective may wait for the slowest rank before the job aborts."""
    global _DEVICE, _TIMEOUT
    _slurm_to_torchrun_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_dist():
        _TIMEOUT = datetime.timedelta(minutes=timeout_min)
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=_TIMEOUT,
            device_id=dev if use_cuda else None,
        )
    _DEVICE = dev
    return dev


class GradSyncBatchNorm(nn.SyncBatchNorm):
    """SyncBatchNorm that synchronises its statistics only in a forward that builds a graph. A BN that runs
    under no_grad (the other branches of an expanded net, which only feed the RLs; the squeeze's teacher) learns
    nothing from the other ranks' images, and each sync costs a collective and a host sync: there it
    normalises with its own batch, as a plain BatchNorm in training mode would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        return nn.modules.batchnorm._BatchNorm.forward(self, x)  # plain BatchNorm: this rank's statistics


def convert_sync_batchnorm(model: nn.Module, no_grad_too: bool = False) -> nn.Module:
    """Every BatchNorm a SyncBatchNorm (`sync_bn`); unless `no_grad_too`, one that syncs only where it learns
    (GradSyncBatchNorm: in forwards that build a graph)."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if not no_grad_too:
        for m in model.modules():
            if type(m) is nn.SyncBatchNorm:  # torch builds nn.SyncBatchNorm itself: the subclass, same state
                m.__class__ = GradSyncBatchNorm
    return model


def cleanup() -> None:
    global _CPU_GROUP
    if is_dist():
        dist.destroy_process_group()  # every group, the CPU group too
    _CPU_GROUP = None


def cpu_group():
    """The group for a collective on CPU tensors: the default one under gloo; under nccl a gloo group of every
    rank, made at the first call (collective too: every rank calls it at the same point). Reading a GPU tensor
    back waits for the GPU to drain its queue; a CPU tensor on gloo does not."""
    global _CPU_GROUP
    if dist.get_backend() != "gloo" and _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo", timeout=_TIMEOUT)
    return _CPU_GROUP


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


def broadcast_tensor(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s values into `t` on every rank, in place."""
    if is_dist():
        dist.broadcast(t, src=src)
    return t


def all_gather_object(obj) -> list:
    """Gather a picklable object from every rank (evaluation results)."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


MAIN_WORK_TIMEOUT = datetime.timedelta(hours=12)  # how long the other ranks wait for rank-0-only work (from_main)
_main_work = itertools.count()


def from_main(fn: Callable[[], object]):
    """fn() on rank 0, its (picklable) result on every rank. The other ranks wait for it in the process group's
    store, not in a collective: a collective waits at most the process group's timeout (NCCL's watchdog, gloo's
    timeout) and would abort the job when rank 0's work outlasts it (COCOeval over Objects365's 80k val images).
    Every rank calls it at the same point, like a collective, so the keys match."""
    if not is_dist():
        return fn()
    key = f"xlearner/from_main/{next(_main_work)}"
    store = dist.distributed_c10d._get_default_store()  # the store torchrun's rendezvous set up for this group
    if is_main_process():
        value = fn()
        store.set(key, pickle.dumps(value))
        return value
    store.wait([key], MAIN_WORK_TIMEOUT)
    return pickle.loads(store.get(key))


def broadcast_object(obj):
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
