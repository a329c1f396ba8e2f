"""The run directory: one run writes it at a time, and a resume says what changed since its checkpoint.

Every stage writes into one directory (`--out`): expand and squeeze their checkpoints and logs,
transfer its records and table (docs/DESIGN.md §5). Two contracts keep that directory sound:

- **One writer.** `locked(stage)` wraps a stage's `run()`: rank 0 takes `OUT/.lock` (host, pid,
  start time, command) before the stage writes anything, and releases it on every way out (a
  return, an error, a stop signal, the forced exit of a hung step). The lock is an exclusive
  `flock` on that file, so a run killed outright (SIGKILL, a lost node's process on this host)
  leaves no lock the kernel still holds: the next run takes the file over with one warning. A
  file written on another host cannot be checked from here and is refused, saying how to clear it.
  Under torchrun one lock serves the run: rank 0 takes it and broadcasts the outcome, so no rank
  goes on when rank 0 is refused.
- **A resume that knows the config.** `check_resume` compares the checkpoint's config with the
  new one before any weights are loaded, key by key, through one table (`RESUME_KEYS`): keys that
  change what is trained refuse the resume (`ResumeError`, exit 2), keys that keep the run valid
  but break a bit-exact resume give one warning line, schedule and bookkeeping keys one info line.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import fnmatch
import functools
import inspect
import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from . import dist, preempt
from ..config import Config, ConfigError
from ..configfile import config_from_dict

LOCK = ".lock"


class RunDirError(RuntimeError):
    """A run directory that this run cannot use (a file, unwritable, locked by another run); exit 1."""


class ResumeError(ConfigError):
    """A checkpoint whose config trains something else than the new config; exit 2, like any config error."""


# ----------------------------------------------------------------------------
# the lock

def _open_flocked(path: Path) -> int | None:
    """An fd of `path` (created if missing) holding an exclusive flock, or None if another open file holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            ours = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            ours = False
        if ours:
            return fd
        os.close(fd)  # the holder released (unlinked) the file between our open and our flock: take the new one


def _holder(path: Path) -> dict | None:
    """The record in a lock file, or None if it holds none (empty, or cut short by a killed writer)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _describe(h: dict | None) -> str:
    if h is None:
        return "a run that has not written its host and pid yet"
    return f"pid {h.get('pid')} on host {h.get('host')} since {h.get('since')} ({h.get('stage')}: {h.get('command')})"


class RunLock:
    """`OUT/.lock` for the life of one run in this process (rank 0's); a context manager."""

    def __init__(self, out: str | Path, stage: str):
        self.out, self.stage = Path(out), stage
        self.path = self.out / LOCK
        self._fd: int | None = None
        self._created: list[Path] = []
        self._old_sigterm = None
        self._unhook = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise RunDirError naming the reason (a file, unwritable, held) in one line."""
        if self.out.exists() and not self.out.is_dir():
            raise RunDirError(f"{self.out}: exists and is not a directory; --out names a run directory")
        # the directories this run creates, deepest first: a run that fails before writing anything leaves none
        self._created = [p for p in (self.out, *self.out.parents) if not p.exists()]
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = _open_flocked(self.path)
        except OSError as e:
            raise RunDirError(f"{self.out}: cannot write the run directory there ({e.strerror or e})") from None
        if fd is None:
            raise RunDirError(f"{self.out}: another run is using this directory: {_describe(self._wait_for_record())}; "
                              "wait for it to end, or use another --out")
        old, host = _holder(self.path), socket.gethostname()
        if old is not None and old.get("host") != host:
            os.close(fd)
            raise RunDirError(f"{self.path}: locked by {_describe(old)}, another host, which this one cannot check; "
                              f"if no run uses {self.out} any more, delete {self.path} and run again")
        if old is not None:  # we hold the flock: its writer is gone without releasing it (SIGKILL, OOM, power)
            dist.log(f"warning: [{self.stage}] {self.path}: took over the stale lock of {_describe(old)}, "
                     "which is no longer running", file=sys.stderr)
        record = {"host": host, "pid": os.getpid(), "stage": self.stage, "command": shlex.join(sys.argv),
                  "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        self._unhook = preempt.on_forced_exit(self._unlink)
        self._catch_sigterm()

    def _wait_for_record(self, tries: int = 20) -> dict | None:
        # The holder writes its record just after taking the flock: give it a moment to appear.
        for _ in range(tries):
            if (h := _holder(self.path)) is not None:
                return h
            time.sleep(0.05)
        return None

    def _catch_sigterm(self) -> None:
        # A SIGTERM outside the engine's GracefulStop (while datasets load, during transfer) would kill the
        # process with the lock file left behind: remove it first, then die of the signal as before.
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._old_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.release()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def _unlink(self) -> None:
        """Remove the lock file if it is still ours (never a later run's); safe in a signal handler."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)

    def release(self) -> None:
        if self._fd is None:
            return
        self._unlink()
        os.close(self._fd)
        self._fd = None
        for d in self._created:  # rmdir removes only empty directories: a run that wrote anything keeps them
            try:
                d.rmdir()
            except OSError:
                break
        self._unhook()
        if self._old_sigterm is not None and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._old_sigterm)
        self._old_sigterm = None


@contextlib.contextmanager
def hold_lock(out: str | Path, stage: str):
    """RunLock on rank 0, its outcome broadcast: every rank raises the same RunDirError when it is refused."""
    lock, error = None, None
    if dist.is_main_process():
        lock = RunLock(out, stage)
        try:
            lock.acquire()
        except RunDirError as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error:
        raise RunDirError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def locked(stage: str):
    """Decorate a stage's `run(cfg, ...)` to hold its run directory's lock for the call.

    The directory is the call's `out` argument when it has one and it is set, else `cfg.<stage>.out`.
    The process group starts first (dist.init_distributed, which the stage's own call then reuses),
    so that rank 0's outcome reaches every rank."""
    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            out = bound.get("out") or getattr(bound["cfg"], stage).out
            dist.init_distributed(bound["cfg"].dist_timeout_min)
            with hold_lock(out, stage):
                return fn(*args, **kwargs)
        return run
    return decorate


# ----------------------------------------------------------------------------
# what a resume compares

REFUSE, WARN, INFO = "refuse", "warn", "info"

# Every key a resume compares, by fnmatch pattern; the first match decides, a key that none matches
# is WARN (a new key is safe: it is reported, and the run goes on). Keys are the stage's sections of
# the config as dotted names (`model.arch`, `expand.lr`, `sources.NAME.image_size`), plus `sources`
# (the set of source names), `sources.NAME.classes` (the class count read from the data),
# `world_size`, and for squeeze `teacher.sha256` / `teacher.path`. docs/DESIGN.md §5 has this table.
RESUME_KEYS: tuple[tuple[str, str], ...] = (
    # how the same parameters run, not which: the numbers move in the last bits
    ("model.compile", WARN), ("model.channels_last", WARN),
    # what is trained: the checkpoint's weights would not load, or would mean something else
    ("model.*", REFUSE), ("sources", REFUSE), ("sources.*.task", REFUSE), ("sources.*.num_classes", REFUSE),
    ("sources.*.classes", REFUSE), ("teacher.sha256", REFUSE),
    ("squeeze.student_init", REFUSE), ("squeeze.distill_stages", REFUSE), ("squeeze.distill_targets", REFUSE),
    ("squeeze.heads", REFUSE),
    # the optimiser's and the GradScaler's saved state belong to the old choice (fp16 keeps a scaler state)
    ("*.optimizer", REFUSE), ("*.amp", REFUSE),
    # schedule and bookkeeping
    ("*.steps", INFO), ("*.eval_every", INFO), ("*.ckpt_every", INFO), ("*.log_every", INFO), ("*.workers", INFO),
    ("*.out", INFO), ("teacher.path", INFO),
)


def key_class(key: str) -> str:
    """REFUSE, WARN or INFO for a dotted key (RESUME_KEYS; WARN when no pattern matches)."""
    return next((cls for pattern, cls in RESUME_KEYS if fnmatch.fnmatchcase(key, pattern)), WARN)


def resume_view(config: dict, meta: dict, world_size: int, stage: str) -> dict:
    """What a resume compares of a run: its config's `model`, `<stage>` and `sources` as dotted keys, plus
    the world size, the class counts found in the data and the squeeze teacher (from the checkpoint's meta)."""
    view = {"world_size": world_size}
    for section in ("model", stage):
        view.update({f"{section}.{k}": v for k, v in config.get(section, {}).items()})
    sources = {s["name"]: s for s in config.get("sources", [])}
    view["sources"] = sorted(sources)
    view.update({f"sources.{n}.{k}": v for n, s in sources.items() for k, v in s.items() if k != "name"})
    view.update({f"sources.{n}.classes": k for n, k in meta.get("num_classes", {}).items()})
    if "teacher_sha256" in meta:
        view["teacher.sha256"] = meta["teacher_sha256"]
    if "teacher" in meta:
        view["teacher.path"] = meta["teacher"]
    return view


def resume_changes(old: dict, new: dict) -> dict[str, list[str]]:
    """{REFUSE/WARN/INFO: ["key: old -> new", ...]} for the keys both views hold with different values.

    A key only one side holds is not compared: a source only one run has shows in `sources`, and a
    key that the older code did not write has its default once the old config is read back."""
    changes: dict[str, list[str]] = {REFUSE: [], WARN: [], INFO: []}
    for key, value in new.items():
        if key in old and old[key] != value:
            changes[key_class(key)].append(f"{key}: {old[key]!r} -> {value!r}")
    return changes


def _as_written_now(config: dict) -> dict:
    """A checkpoint's config with the keys added since it was written at their defaults (config_from_dict)."""
    try:
        return config_from_dict(config).to_dict()
    except ConfigError:  # a key that this code no longer has: compare what is there
        return config


def check_resume(path: Path, ckpt: dict, config: Config, meta: dict, stage: str) -> None:
    """Before a resume loads `ckpt`: refuse (ResumeError) if it trains something else than `config`;
    else log one warning line for the keys that break an exact resume and one line for the schedule."""
    old = resume_view(_as_written_now(ckpt.get("config", {})), ckpt.get("meta", {}), len(ckpt.get("rng", [0])),
                      stage)
    changes = resume_changes(old, resume_view(config.to_dict(), meta, dist.get_world_size(), stage))
    if changes[REFUSE]:
        raise ResumeError(f"{path}: cannot resume, the config changes what this run trains: "
                          f"{'; '.join(changes[REFUSE])}; resume with the config in {path.parent / 'config.json'}, "
                          "or use another --out for a new run")
    if changes[WARN]:
        dist.log(f"warning: [{stage}] resuming {path} with changed keys (the run goes on, but not bit-exactly "
                 f"as it would have): {'; '.join(changes[WARN])}", file=sys.stderr)
    if changes[INFO]:
        dist.log(f"[{stage}] resuming with a changed schedule or bookkeeping: {'; '.join(changes[INFO])}")
