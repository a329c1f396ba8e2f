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
- Stopping: the engine's signal handler (`GracefulStop`) calls
  `request_stop(signum)`; `stop_requested()` is this process's flag (checked
  between evaluation batches), `agree_on_stop()` the collective that makes
  every rank stop after the same step. `on_forced_exit(fn)` registers what
  must still happen when a stop ends the process at once (rundir.py's lock).
- `python -m xlearner.dist ARGS` is `torchrun ARGS`, except that a SIGTERM or
  SIGINT to the launcher ends it with exit 128+signal and one line, where
  torchrun's elastic agent prints a traceback and exits 1 (see `torchrun`).
"""
from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import pickle
import signal
import sys
import threading
import time
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
_STOP_GROUP = None  # under nccl: a gloo group of every rank for the per-step stop flag (`agree_on_stop`)
_TIMEOUT: datetime.timedelta | None = None  # the process group's timeout (`dist_timeout_min`), for that group too


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
    global _STOP_GROUP
    if is_dist():
        dist.destroy_process_group()  # every group, the stop group too
    _STOP_GROUP = None


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


# ----------------------------------------------------------------------------
# stopping: a signal seen by any rank stops every rank after the same step

_stop_signal = 0


def request_stop(signum: int) -> None:
    """Record that this process was asked to stop (0 clears it). Called from a signal handler."""
    global _stop_signal
    _stop_signal = signum


def stop_requested() -> int:
    """The signal that asked this process to stop, or 0. Local: no collective."""
    return _stop_signal


def agree_on_stop() -> int:
    """Collective: the stop signal of any rank (max over ranks), so that all ranks stop together.

    Every rank must call it at the same point of the loop (the end of each step). The flag is a CPU tensor on a
    gloo group: reading a GPU tensor back would wait for the GPU to drain its queue every step."""
    global _STOP_GROUP
    if not is_dist():
        return _stop_signal
    if dist.get_backend() != "gloo" and _STOP_GROUP is None:
        # new_group is collective too: every rank makes it here, at the same step
        _STOP_GROUP = dist.new_group(backend="gloo", timeout=_TIMEOUT)
    flag = torch.tensor([_stop_signal])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_STOP_GROUP)  # None: the default (gloo) group
    return int(flag.item())


GRACE_ENV = "XLEARNER_STOP_GRACE_S"  # seconds a stopped run waits for its step to finish (default 30) ...
STEP_GRACE_FACTOR = 3.0  # ... or this many times its slowest step so far, if longer: a slow step is not a hung one
SAME_STOP_S = 2.0  # signals this close to the first are the same stop (a group signal plus torchrun's forward)

_forced_exit_hooks: list[Callable[[], None]] = []


def on_forced_exit(fn: Callable[[], None]) -> Callable[[], None]:
    """Run `fn` (short, signal-safe) before a stop ends the process with os._exit, where no `finally` runs;
    returns the function that unregisters it."""
    _forced_exit_hooks.append(fn)
    return lambda: _forced_exit_hooks.remove(fn)


class GracefulStop:
    """How a run ends on SIGTERM/SIGINT: a cluster's preemption, Ctrl-C, `kill -TERM -- -PGID`.

    First signal: `request_stop`; the engine's loop finishes the current step, every
    rank agrees on the stop (`agree_on_stop`), one checkpoint is written and
    the run exits 128+signal. An evaluation in progress ends at its next batch
    (data.EvalLoader). A step that cannot finish (a hung loader, a rank waiting on
    a hung one) is ended by a timer thread, without a checkpoint, once the
    signal is `grace()` seconds old: max(XLEARNER_STOP_GRACE_S (default 30),
    STEP_GRACE_FACTOR x the slowest step seen so far, which the engine reports
    with `step_took`). A second signal, SAME_STOP_S or more after the first,
    ends the run at once.
    """

    def __init__(self, stage: str, last_ckpt: int | None):
        self.stage, self.last_ckpt = stage, last_ckpt
        grace = os.environ.get(GRACE_ENV, "30")
        try:
            self.grace_s = float(grace)
        except ValueError:
            raise ValueError(f"{GRACE_ENV}={grace!r}: expected a number of seconds, e.g. 30") from None
        self.slowest_step_s = 0.0
        self._step_done = False
        self._first: float | None = None
        self._timer: threading.Timer | None = None
        self._old = {}

    def step_took(self, seconds: float) -> None:
        """A step of the run took `seconds` (data wait included)."""
        self.slowest_step_s = max(self.slowest_step_s, seconds)

    def grace(self) -> float:
        """How long a stopped run waits for its step: the configured grace, or longer for a run of slow steps."""
        return max(self.grace_s, STEP_GRACE_FACTOR * self.slowest_step_s)

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        self.step_finished()
        for s, h in self._old.items():
            signal.signal(s, h)
        request_stop(0)

    def _handle(self, signum, frame):
        if self._first is None:
            self._first = time.monotonic()
            request_stop(signum)
            self._arm(signum)
        elif time.monotonic() - self._first >= SAME_STOP_S:
            self._exit_now(signum, f"second signal {signum}: stopping at once")

    def _arm(self, signum: int) -> None:
        """Wait out the grace, then end the run; re-read at expiry, as a step that ended just after the signal
        (its time not yet reported when the signal came) may have made it longer."""
        if self._step_done:
            return
        grace = round(self.grace(), 1)
        left = grace - (time.monotonic() - self._first)
        if left > 0:
            self._timer = threading.Timer(left, self._arm, (signum,))
            self._timer.daemon = True
            self._timer.start()
        else:
            self._exit_now(signum, f"the step did not finish within {grace:g} s of signal {signum}")

    def step_finished(self) -> None:
        """The step is over: no need to end it by force (the checkpoint write that follows may take long)."""
        self._step_done = True  # a timer thread re-arming right now must not start another
        if self._timer is not None:
            self._timer.cancel()

    def _exit_now(self, signum: int, why: str) -> None:
        # os._exit: no unwinding through a hung loader or collective, no traceback; loader workers
        # die with this process (data._worker_init). os.write: safe inside a signal handler.
        last = f"step {self.last_ckpt}" if self.last_ckpt is not None else "none yet"
        with contextlib.suppress(RuntimeError, ValueError, OSError):  # a reentrant flush: lose the buffer, not the exit
            sys.stdout.flush()
        for hook in list(_forced_exit_hooks):
            with contextlib.suppress(OSError):  # a hook that fails must not keep a hung run alive
                hook()
        if is_main_process():
            os.write(2, f"[{self.stage}] {why}: no checkpoint written for the unfinished step (last checkpoint: "
                        f"{last}); run the same command again to resume\n".encode())
        os._exit(128 + signum)


def torchrun(argv: list[str] | None = None) -> None:
    """`torchrun` with a clean exit when the launcher itself is signalled (Kubernetes, SLURM, Ctrl-C).

    On SIGTERM/SIGINT torchrun's elastic agent forwards the signal to its workers
    and waits for them (up to --shutdown-timeout, default 30 s), which is what
    lets every rank finish its step and checkpoint; but then it re-raises a
    SignalException from its signal handler, which prints a traceback and exits
    1 whatever the workers did. Here that exception becomes one line and exit
    128+signal, the code the workers exit with. A failed worker (say a full disk)
    is reported by torchrun's failure table alone, without the agent's traceback.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(argv)
    except ChildFailedError as e:
        print(e, file=sys.stderr, flush=True)  # the table: which rank failed first, its exit code
        raise SystemExit(1) from None
    except SignalException as e:
        print(f"torchrun: {e.sigval.name}: sent to the workers, which checkpoint and exit; "
              "run the same command again to resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + int(e.sigval)) from None


if __name__ == "__main__":
    torchrun()
