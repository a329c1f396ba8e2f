"""The training engine shared by the expand and squeeze stages.

Both stages train "a module whose forward takes one batch from every source and
returns a dict of losses": `XLearnerModel` in expand, the `Distiller` in
squeeze. Everything else is the same and lives here, once:

- DDP with one forward and one backward per step and no unused parameters
  (`find_unused_parameters=False`; the first step checks that every trainable
  parameter received a gradient and names those that did not);
- gradient accumulation with `no_sync()` on the micro-steps that do not sync;
- AMP: bf16 autocast, or fp16 autocast with a GradScaler;
- SGD or AdamW, no weight decay on norms, biases and RL mixing coefficients;
  linear warmup then cosine;
- a stop on a non-finite loss that names the source and the step;
- rank-0 logging: a line every `log_every` steps (plus a tqdm bar in a terminal,
  `dist.progress`), one JSON line per event in `out/log.jsonl`;
- evaluation every `eval_every` steps and at the end, `out/metrics.json`;
- atomic checkpoints every `ckpt_every` steps, at the end and on SIGTERM/SIGINT,
  and an exact resume when the same command is run again on the same `out`
  (evaluation never draws from the training RNG, so a resumed run that skips
  or repeats an evaluation trains on the same random numbers), once rundir.check_resume has vetted the config;
- stops that a cluster can rely on (`preempt.GracefulStop`): a signal to the whole
  process group finishes the step, checkpoints and exits 128+signal; a second
  signal, or a step that cannot finish within the grace period, exits at once.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .run import dist, preempt
from .run.checkpoint import latest_checkpoint, load_checkpoint, remove_stale_tmp, save_run_checkpoint
from .config import Config, TrainConfig
from .data import move_to
from .run.rng import rng_state, seed_everything, set_rng_state
from .run.rundir import check_resume
from .run.runlog import git_sha, log_event, max_memory_mb, truncate_log


class NonFiniteLossError(RuntimeError):
    pass


class UnusedParametersError(RuntimeError):
    pass


# ----------------------------------------------------------------------------
# optimiser and schedule

# Parameters of these modules are scales and shifts of normalised features, not weights to shrink.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)  # _NormBase: BN, SyncBN, IN


def no_weight_decay(module: nn.Module, name: str) -> bool:
    """Whether `module`'s own parameter `name` is exempt from weight decay: by what it is, not its shape.

    Every norm parameter, every bias, and what a module lists in `no_weight_decay`
    (the RL's mixing coefficients, model.py: the cross-stitch matrix is 2-D,
    yet decaying it pulls the identity coefficient towards 0)."""
    return isinstance(module, NORM_TYPES) or name == "bias" or name in getattr(module, "no_weight_decay", ())


def build_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; norms, biases and mixing coefficients (`no_weight_decay`) get no weight decay."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (no_decay if no_weight_decay(module, name) else decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernels update every tensor in one pass instead of a loop of foreach ops: for the
    # demo's 3 x ResNet-18 on 2 CPU cores an AdamW step drops from 92 ms to 15 ms (measured).
    # Call this after model.to(device): torch has fused kernels for CPU and CUDA tensors only.
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=tc.lr, fused=fused)
    return torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, fused=fused)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The one LR schedule (expand, squeeze and transfer's heads): a linear warmup from ~0 to 1 over `warmup`
    steps, then half a cosine down to 0 at `total` (and after)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def autocast(device: torch.device, amp: str):
    """The mixed precision of `amp` (off | bf16 | fp16) for a forward on `device`; training and evaluation use it."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# ----------------------------------------------------------------------------
# the run

@dataclass
class Run:
    """What the engine needs from a stage. Built by expand.py / squeeze.py, never from a CLI namespace."""
    model: nn.Module                      # forward(batch_by_source) -> dict[str, loss]; total_loss(losses)
    loader: object                        # MultiSourceLoader: next() -> dict[source, batch]; state_dict()
    tc: TrainConfig
    config: Config                        # the resolved config, saved with every checkpoint
    device: torch.device
    meta: dict = field(default_factory=dict)  # stored in the checkpoint (model kind, class counts)
    ckpt_module: nn.Module | None = None  # what goes into checkpoint["model"] (default: model)
    evaluate: Callable[[int], dict] | None = None  # step -> {source: {metric: value}}
    images_per_step: int = 0              # per process, for images/s
    report: str = ""                      # model report printed at start
    stage: str = "expand"


def _every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


def _check_all_grads(model: nn.Module) -> None:
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise UnusedParametersError(
            f"{len(missing)} trainable parameters received no gradient in the first step, which DDP with "
            f"find_unused_parameters=False cannot handle: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}. "
            "Does every task in model.tasks have a source, and does every head take part in the loss?")


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel under torchrun/SLURM with more than one process, else `model` itself.

    find_unused_parameters=False: one forward and one backward per step reach
    every trainable parameter (the engine checks it after the first step)."""
    if dist.get_world_size() == 1:
        return model
    return DDP(model, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=False)


def _flat(losses: dict) -> dict[str, torch.Tensor]:
    """{source: loss} as is; the squeeze's {source: {term: loss}} as {"source/term": loss}, for the log."""
    return {f"{k}/{t}" if isinstance(v, dict) else k: x
            for k, v in losses.items() for t, x in (v.items() if isinstance(v, dict) else [(None, v)])}


def _loss_vector(losses: dict) -> tuple[tuple[str, ...], torch.Tensor]:
    """The losses' flat names, and their values as one detached fp32 vector, left on the device (no host sync)."""
    losses = _flat(losses)
    return tuple(losses), torch.stack([v.detach().float() for v in losses.values()])


def _drain_window(s: _State) -> None:
    """Bring the window's losses to the host: one sync, made only where the loop logs, checkpoints or evaluates.

    A non-finite loss stops the run, naming the source and the (1-based) step it appeared at; the check runs
    before every checkpoint and evaluation, so no checkpoint holds the weights it spoiled."""
    w = s.window
    if not w.pending:
        return
    values = iter(torch.cat([v for _, _, micro in w.pending for v in micro]).tolist())
    for step, names, micro in w.pending:
        step_losses: dict[str, float] = {}
        for _ in micro:  # the step's average over its micro-batches
            for name, v in zip(names, values):
                if not math.isfinite(v):
                    raise NonFiniteLossError(f"[{s.run.stage}] non-finite loss {v} for '{name}' at step {step}; "
                                             "lower the lr, enable clip_grad, or check that source's data")
                step_losses[name] = step_losses.get(name, 0.0) + v / len(micro)
        for name, v in step_losses.items():
            w.losses[name] = w.losses.get(name, 0.0) + v
    w.pending.clear()


MAX_PENDING = 256  # steps whose losses may wait on the device for the next log, checkpoint or evaluation


@dataclass
class _Window:
    """The steps since the last log line: their summed losses, time, and time spent waiting for data."""
    t0: float = field(default_factory=time.perf_counter)
    wait: float = 0.0
    losses: dict = field(default_factory=dict)   # name -> summed float, drained from `pending`
    pending: list = field(default_factory=list)  # (step, names, [loss vector per micro-batch]) on the device
    n: int = 0


@dataclass
class _State:
    """What the loop reads and changes: the modules, the optimiser, the position, the stop and the log."""
    run: Run
    out: Path
    model: nn.Module          # run.model on the device (SyncBN where asked); what train() returns
    ckpt_module: nn.Module    # what goes into checkpoint["model"]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    step: int = 0             # optimiser steps done
    eval_pending: bool = False  # the checkpoint was written before (or during) this step's evaluation
    stop: preempt.GracefulStop | None = None
    bar: object = None
    window: _Window = field(default_factory=_Window)


def train(run: Run) -> nn.Module:
    """Train `run.model` for `run.tc.steps` optimiser steps, resuming from `run.tc.out` if it holds a checkpoint.

    The loop, top to bottom: a batch of every source per micro-step (`grad_accum` of them; DDP all-reduces on the
    last), L = model.total_loss, backward; clip, optimise, schedule; then log, evaluate and checkpoint when their
    step comes. A stop signal ends the run after a step, on every rank at once, with a checkpoint (`_stop_run`)."""
    tc = run.tc
    s = _setup(run)           # the output folder, the model on its device, optimiser, schedule, scaler
    resumed = _resume(s)      # weights, optimiser, schedule, loader position and every RNG, if a checkpoint exists
    if not resumed:
        seed_everything(tc.seed + dist.get_rank())
    model = s.model
    train_model = wrap_ddp(model, run.device)
    if not resumed:
        _log_start(s)
    s.stop = preempt.GracefulStop(run.stage, last_ckpt=s.step if resumed else None)
    model.train()
    s.bar = dist.progress(total=tc.steps, initial=s.step, desc=run.stage, dynamic_ncols=True)
    s.window = _Window()  # img/s and data-wait are timed from here: the loop, not the setup
    checked_grads = False
    with s.stop:
        if s.eval_pending:  # the run stopped before (or during) this step's evaluation: do it first
            _evaluate_or_stop(s, pending=True)
        while s.step < tc.steps:
            t_step = time.perf_counter()
            micro_losses = []
            for micro in range(tc.grad_accum):
                t_wait = time.perf_counter()
                batch = move_to(next(run.loader), run.device)
                s.window.wait += time.perf_counter() - t_wait
                # Only the last micro-step all-reduces gradients; the others accumulate locally.
                last = micro == tc.grad_accum - 1
                with contextlib.nullcontext() if train_model is model or last else train_model.no_sync():
                    with autocast(run.device, tc.amp):
                        losses = train_model(batch)
                        total = model.total_loss(losses) / tc.grad_accum
                    s.scaler.scale(total).backward()
                names, vector = _loss_vector(losses)  # stays on the device until the loop logs (_drain_window)
                micro_losses.append(vector)
            if not checked_grads:  # DDP without find_unused_parameters: every trainable parameter needs a grad
                _check_all_grads(model)
                checked_grads = True
            if tc.clip_grad > 0:
                s.scaler.unscale_(s.optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad)
            s.scaler.step(s.optimizer)
            s.scaler.update()
            s.scheduler.step()
            s.optimizer.zero_grad(set_to_none=True)
            s.step += 1
            s.window.pending.append((s.step, names, micro_losses))
            if len(s.window.pending) >= MAX_PENDING:  # a run that never logs still checks, and holds no more
                _drain_window(s)
            _log_window(s)  # every log_every steps: losses averaged over ranks, one line, log.jsonl
            s.stop.step_took(time.perf_counter() - t_step)
            eval_step = _every(s.step, tc.eval_every) and s.step < tc.steps
            if signalled := s.stop.should_stop():  # collective: every rank stops after the same step
                _stop_run(s, signalled, eval_pending=eval_step)
            if eval_step:
                _evaluate_or_stop(s, pending=True)
            if _every(s.step, tc.ckpt_every) or s.step == tc.steps:
                _save(s)
        _evaluate_or_stop(s, pending=False)  # every run evaluates its last step (the final checkpoint exists)
    s.bar.close()
    log_event(s.out, {"event": "end", "step": s.step})
    return model


def _setup(run: Run) -> _State:
    """The output folder (minus a killed write's temp files), the model on its device, optimiser, schedule, scaler."""
    tc, device, out = run.tc, run.device, Path(run.tc.out)
    if dist.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        for tmp in remove_stale_tmp(out):
            dist.log(f"[{run.stage}] removed {tmp}, left by a checkpoint write that was killed")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = tc.cudnn_benchmark
    model = run.model.to(device)
    ckpt_module = run.ckpt_module or model
    if tc.sync_bn and device.type == "cuda" and dist.is_dist():
        model = dist.convert_sync_batchnorm(model, no_grad_too=tc.sync_bn_no_grad)
    optimizer = build_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, tc.warmup_steps, tc.steps))
    scaler = torch.amp.GradScaler(device.type, enabled=tc.amp == "fp16")
    return _State(run, out, model, ckpt_module, optimizer, scheduler, scaler)


def _resume(s: _State) -> bool:
    """Load the latest checkpoint in `out`, if any: weights, optimiser, schedule, loader position, every RNG."""
    path = latest_checkpoint(s.out)
    if path is None:
        return False
    ckpt = load_checkpoint(path)
    check_resume(path, ckpt, s.run.config, s.run.meta, s.run.stage)  # before any weights load
    s.ckpt_module.load_state_dict(ckpt["model"])
    s.optimizer.load_state_dict(ckpt["optimizer"])
    s.scheduler.load_state_dict(ckpt["scheduler"])
    s.scaler.load_state_dict(ckpt["scaler"])
    s.run.loader.load_state_dict(ckpt["loader"])
    rngs = ckpt["rng"]
    set_rng_state(rngs[dist.get_rank()] if len(rngs) == dist.get_world_size() else rngs[0])
    s.step = ckpt["step"]
    s.eval_pending = bool(ckpt.get("eval_pending", False))  # stopped before or during that step's evaluation
    truncate_log(s.out, s.step)
    dist.log(f"[{s.run.stage}] resumed from {path} at step {s.step}")
    return True


def _log_start(s: _State) -> None:
    """A fresh run's first lines: the effective batch per source, the model report, the `start` event."""
    run, world = s.run, dist.get_world_size()
    accum = run.tc.grad_accum
    batches = {src.name: f"{src.batch_size} x {accum} x {world} = {src.batch_size * accum * world}"
               for src in run.config.sources}
    dist.log(f"[{run.stage}] effective batch per source (batch x accum x world): {batches}")
    if run.report:
        dist.log(run.report)
    log_event(s.out, {"event": "start", "stage": run.stage, "step": 0, "git": git_sha(), "world_size": world,
                       "effective_batch": batches, "config": run.config.to_dict(), "report": run.report})


def _log_window(s: _State) -> None:
    """Count the step in the window; every `log_every` steps (and at the last) average it over ranks and log it."""
    run, tc, w = s.run, s.run.tc, s.window
    w.n += 1
    s.bar.update(1)
    if not (_every(s.step, tc.log_every) or s.step == tc.steps):
        return
    _drain_window(s)
    elapsed = time.perf_counter() - w.t0
    images = run.images_per_step * tc.grad_accum * dist.get_world_size() * w.n
    # Collective: every rank reaches this line at the same step.
    mean = dist.all_reduce_mean({k: v / w.n for k, v in w.losses.items()}, run.device)
    record = {"event": "train", "step": s.step, "loss": sum(mean.values()), "losses": mean,
              "lr": s.optimizer.param_groups[0]["lr"], "images_per_s": images / elapsed,
              "data_wait": w.wait / elapsed, "max_mem_mb": max_memory_mb(run.device),
              "skipped_images": dict(getattr(run.loader, "skipped", {}))}
    s.bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}")
    log_event(s.out, record)
    dist.log(f"[{run.stage}] step {s.step}/{tc.steps} loss {record['loss']:.4f} lr {record['lr']:.4g} "
             f"{record['images_per_s']:.0f} img/s data-wait {record['data_wait']:.0%} "
             + " ".join(f"{k}={v:.3f}" for k, v in mean.items()))
    if any(record["skipped_images"].values()):
        dist.log(f"[{run.stage}] skipped undecodable images so far: {record['skipped_images']}")
    s.window = _Window()


def _save(s: _State, eval_pending: bool = False) -> None:
    """Checkpoint the step just finished (atomically; every rank's RNG, so that each resumes its own stream)."""
    _drain_window(s)  # a non-finite loss stops the run before its weights are saved
    rngs = dist.all_gather_object(rng_state())
    save_run_checkpoint({
        "model": s.ckpt_module.state_dict(), "optimizer": s.optimizer.state_dict(),
        "scheduler": s.scheduler.state_dict(), "scaler": s.scaler.state_dict(), "step": s.step,
        "config": s.run.config.to_dict(), "loader": s.run.loader.state_dict(), "rng": rngs,
        "meta": s.run.meta, "stage": s.run.stage, "eval_pending": eval_pending}, s.out)
    s.stop.last_ckpt = s.step


def _evaluate(s: _State) -> int:
    """Evaluate and log; returns 0, or the stop signal that cut the evaluation short (nothing logged then)."""
    run, step = s.run, s.step
    if run.evaluate is None:
        return 0
    _drain_window(s)
    if dist.get_world_size() > 1:  # DDP syncs BN running stats at the start of a forward: after the
        for b in s.model.buffers():   # last step each rank still has its own, so evaluate rank 0's (the
            dist.broadcast_tensor(b)          # checkpointed) ones
    dist.log(f"[{run.stage}] step {step}: evaluating")
    rng = rng_state()  # evaluation must leave the training RNG (RPN/RoI samplers) exactly as it was
    s.model.eval()
    try:
        metrics = run.evaluate(step)
    finally:
        s.model.train()
        set_rng_state(rng)
    signalled = s.stop.should_stop()  # a stopped rank's evaluation is partial: discard it on all ranks
    if signalled:
        return signalled
    dist.log(f"[{run.stage}] step {step} eval: " + "  ".join(
        f"{src}: " + ", ".join(f"{k}={v:.2f}" for k, v in m.items() if isinstance(v, float))
        for src, m in metrics.items()))
    log_event(s.out, {"event": "eval", "step": step, "metrics": metrics})
    if dist.is_main_process():
        (s.out / "metrics.json").write_text(json.dumps({"step": step, "metrics": metrics}, indent=2))
    return 0


def _evaluate_or_stop(s: _State, pending: bool) -> None:
    """Evaluate; if a stop signal cut the evaluation short, checkpoint and exit (`pending`: the checkpoint says the
    evaluation is still to do, and the resumed run does it first)."""
    if signalled := _evaluate(s):
        _stop_run(s, signalled, eval_pending=pending)


def _stop_run(s: _State, signum: int, eval_pending: bool) -> None:
    """Checkpoint the last finished step (unless it already is), say so in one line, exit 128+signal."""
    s.stop.step_finished()
    if s.stop.last_ckpt != s.step:
        _save(s, eval_pending)
    log_event(s.out, {"event": "interrupted", "step": s.step, "signal": signum})
    dist.log(f"[{s.run.stage}] signal {signum}: checkpoint written at step {s.step}; "
             "run the same command again to resume")
    s.bar.close()
    raise SystemExit(128 + signum)
