"""Preemption: how a run stops on a signal, on every rank after the same step, without losing work.

- The engine's signal handler (`GracefulStop`) calls `request_stop(signum)`;
  `stop_requested()` is this process's flag (checked between evaluation batches),
  `agree_on_stop()` the collective that makes every rank stop after the same step.
- `on_forced_exit(fn)` registers what must still happen when a stop ends the process at
  once (rundir.py's lock).
- Loader workers: they ignore the cluster's group signal and die with their parent
  (`loader_worker_signals`), and are killed before the process exits (`kill_loader_workers`).
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Callable

import torch
import torch.distributed

from . import dist

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

    Every rank must call it at the same point of the loop (the end of each step). The flag is a CPU tensor on
    dist.cpu_group(): reading a GPU tensor back would wait for the GPU to drain its queue every step."""
    if not dist.is_dist():
        return _stop_signal
    flag = torch.tensor([_stop_signal])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=dist.cpu_group())
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

    def should_stop(self) -> int:
        """Collective, asked by the loop at the end of every step: the signal any rank got, or 0 (agree_on_stop)."""
        return agree_on_stop()

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
        if dist.is_main_process():
            os.write(2, f"[{self.stage}] {why}: no checkpoint written for the unfinished step (last checkpoint: "
                        f"{last}); run the same command again to resume\n".encode())
        os._exit(128 + signum)


# ----------------------------------------------------------------------------
# loader workers

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int) -> None:
    """This process gets `sig` when its parent dies (Linux; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def loader_worker_signals() -> None:
    """A loader worker's signals. A cluster signals the whole process group. A worker that died of that
    SIGTERM/SIGINT would make the main process fail ("DataLoader worker ... is killed by signal") before it could
    checkpoint; so workers ignore them and exit when the main process shuts them down, and die with the main
    process if it exits without shutting them down (a second signal, or the grace period for a hung step, ends
    it with os._exit)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)


def kill_loader_workers() -> None:
    """SIGKILL the loader workers still alive: call it before a process exits (atexit does, below).

    At exit, multiprocessing terminate()s (SIGTERM) the daemon children still alive, then joins
    them. Loader workers ignore SIGTERM (below), so that join would wait forever for a loader
    still referenced at exit (a traceback keeps it alive): end them first, with SIGKILL. A
    multiprocessing.Process child (tools/ablate.py's workers) exits without atexit: it calls this."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kill as a worker failure
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()


atexit.register(kill_loader_workers)  # after multiprocessing's own hook (imported by torch): runs before it
