"""Benchmarks of each stage against its floor (docs/DESIGN.md §7).

Absolute step times on shared machines are noise, so each benchmark measures
a ratio within one run: the stage's real step over the same work done by bare
torchvision modules on the very same (pre-loaded) batches.

- expand floor: for each source batch, a forward and backward of one plain
  torchvision ResNet plus that task's head, and T-1 no-grad plain ResNet forwards
  (the other branches the image must run through), then an optimiser step.
- squeeze floor: the student's plain ResNet forward and backward with its head,
  plus T no-grad plain ResNet forwards standing in for the teacher's branches.

Steps alternate between the stage and its floor, and the medians are compared,
so a noisy neighbour slows both alike. Data loading is excluded from both
(it is `bench loader`'s business: the multi-source loader against plain
DataLoaders over the same files, docs/DESIGN.md §7: >= 0.9x). `bench backbone` times
one bare torchvision classification step, the yardstick of scripts/gpu_check.sh.
With `model.compile = true` the stage and its floor are both compiled
(backbone.compile_stages), so the ratio stays like for like. `bench transfer`
holds a linear transfer against one feature-extraction pass over the same
images (target <= 1.25x).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.models import _utils as tv_utils

from .. import data, engine, transfer

from ..run import dist
from ..backbone import BACKBONES, compile_stages
from ..config import Config, ConfigError
from ..data import build_train_datasets, images_per_step
from ..expand import XLearnerModel
from ..probe import extract_features
from ..run.rng import seed_everything
from ..run.runlog import max_memory_mb
from ..squeeze import Distiller, SqueezedModel, kd_loss, load_teacher, pixels
from ..weights import load_backbone

RETURN_LAYERS = {f"layer{i}": f"layer{i}" for i in range(1, 5)}


def plain_backbone(arch: str) -> nn.Module:
    """A bare torchvision ResNet returning its stage features (IntermediateLayerGetter drops avgpool/fc)."""
    return tv_utils.IntermediateLayerGetter(BACKBONES[arch](), return_layers=RETURN_LAYERS)


def _batches(cfg: Config, tc, n: int, device) -> list:
    datasets, num_classes = build_train_datasets(cfg.sources)
    loader = data.MultiSourceLoader(cfg.sources, datasets, rank=0, world_size=1, seed=tc.seed, workers=tc.workers)
    return [data.move_to(next(loader), device) for _ in range(n)], num_classes


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _alternate(fns: dict, batches: list, steps: int, device, warmup: int = 2) -> dict[str, float]:
    """Median seconds per step of each fn, run alternately on the same batches."""
    times = {k: [] for k in fns}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn(batches[i % len(batches)])
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _train_step(module, loss_fn, opt, tc, device):
    def step(batch):
        with engine.autocast(device, tc.amp):
            loss = loss_fn(module, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _floor_loss(backbones: nn.ModuleDict, heads: nn.ModuleDict, sources, nograd):
    """Sum of w_s * L_s through plain backbones: backbones[task] with grad, then nograd(task) without."""
    def loss_fn(_, batch):
        total = 0.0
        for s in sources:
            head = heads[s.task]
            x, ctx = head.prepare(batch[s.name], s.name)
            loss, _ = head.loss(backbones[s.task](x), ctx, s.name)
            with torch.no_grad():
                for m in nograd(s.task):
                    m(x)
            total = total + s.weight * loss
        return total
    return loss_fn


def _result(name, times, **extra) -> dict:
    return {"bench": name, "step_s": times["stage"], "floor_s": times["floor"],
            "ratio": times["stage"] / times["floor"], **extra}


def bench_expand(cfg: Config, steps: int = 20) -> dict:
    device = dist.init_distributed()
    tc = cfg.expand
    seed_everything(tc.seed)
    batches, num_classes = _batches(cfg, tc, min(steps, 4), device)
    model = XLearnerModel(cfg.model, cfg.sources, num_classes).to(device).train()
    tasks = list(model.heads)
    floor_bb = nn.ModuleDict({t: plain_backbone(cfg.model.arch) for t in tasks}).to(device).train()
    floor_heads = copy.deepcopy(model.heads)
    if cfg.model.channels_last:
        model, floor_bb, floor_heads = (m.to(memory_format=torch.channels_last) for m in (model, floor_bb, floor_heads))
    if cfg.model.compile:
        compile_stages(model)
        compile_stages(floor_bb)
    fns = {
        "stage": _train_step(model, lambda m, b: m.total_loss(m(b)), engine.build_optimizer(model, tc), tc, device),
        "floor": _train_step(None, _floor_loss(floor_bb, floor_heads, cfg.sources,
                                                   lambda t: [floor_bb[u] for u in tasks if u != t]),
                             engine.build_optimizer(nn.ModuleList([floor_bb, floor_heads]), tc), tc, device),
    }
    times = _alternate(fns, batches, steps, device)
    return _result("expand", times, images_per_s=images_per_step(cfg.sources) / times["stage"],
                   max_mem_mb=max_memory_mb(device), device=str(device), arch=cfg.model.arch, amp=tc.amp,
                   compile=cfg.model.compile)


def _squeeze_floor_loss(student_bb, teacher_bbs: nn.ModuleDict, heads: nn.ModuleDict, t_heads: nn.ModuleDict,
                        adapters: nn.ModuleDict, norms: nn.ModuleDict, distiller: Distiller):
    """The squeeze's work with bare modules: per source, the student's plain ResNet and task loss; every teacher
    branch the Distiller distils on that image as a plain ResNet (no RL) under no_grad; each (branch, stage)
    adapter's 1x1 conv against the standardised teacher feature; the KD of every head Distiller.kd_losses reads."""
    sq, feature_loss = distiller.sq, distiller.feature_loss

    def loss_fn(_, batch):
        total = 0.0
        for s in distiller.sources:
            head = heads[s.task]
            x, ctx = head.prepare(batch[s.name], s.name)
            feats = student_bb(x)
            loss, outputs = head.loss(feats, ctx, s.name)
            with torch.no_grad():
                t_feats = {b: teacher_bbs[b](x) for b in distiller.branches(s.task)}
            feat = torch.stack([torch.stack([feature_loss(adapters[b][k](feats[k]), norms[b][k](t[k]))
                                             for k in adapters[b]]).mean() for b, t in t_feats.items()]).mean()
            kd = []
            for o in distiller.sources if sq.distill_targets == "all" else [s] if s.task == "cls" else []:
                if o.task == "cls":
                    s_logits = outputs if o.name == s.name else heads["cls"].logits(feats, o.name)
                    kd.append(kd_loss(s_logits, t_heads["cls"].logits(t_feats["cls"], o.name), sq.kd_temperature,
                                      o.multi_label))
                elif o.task == "seg":
                    s_logits = heads["seg"].predictors[o.name](heads["seg"].decoder(feats))
                    t_logits = t_heads["seg"].predictors[o.name](t_heads["seg"].decoder(t_feats["seg"]))
                    kd.append(kd_loss(pixels(s_logits), pixels(t_logits), sq.kd_temperature, False))
            kd_term = torch.stack(kd).mean() if kd else loss.new_zeros(())
            total = total + s.weight * (sq.lambda_task * loss + sq.lambda_feat * feat + sq.lambda_kd * kd_term)
        return total
    return loss_fn


def squeeze_bench_parts(cfg: Config, device, teacher_path: str | None = None, n_batches: int = 4) -> dict:
    """What bench squeeze times: {"fns": {"stage", "floor"} step functions, "batches", and the modules of
    both sides (the stage's `distiller`; the floor's `teacher_bbs`, `heads`, `t_heads`)}."""
    sq = cfg.squeeze
    seed_everything(sq.seed)
    batches, num_classes = _batches(cfg, sq, n_batches, device)
    if teacher_path:
        teacher, _ = load_teacher(teacher_path, cfg)
    else:
        teacher = XLearnerModel(cfg.model, cfg.sources, num_classes)
    student = SqueezedModel.from_expanded(teacher, sq.student_init, sq)
    distiller = Distiller(student, teacher, cfg.sources, sq).to(device).train()
    # Floor: the same work with bare modules (_squeeze_floor_loss): plain ResNets for the student and for each
    # teacher branch, copies of the student's heads, adapters and standardisations, the teacher's heads.
    student_bb = plain_backbone(teacher.mcfg.arch).to(device)
    teacher_bbs = nn.ModuleDict({t: plain_backbone(teacher.mcfg.arch) for t in teacher.tasks}).to(device).eval()
    floor_heads = copy.deepcopy(student.heads).to(device)
    floor_adapters, floor_norms = copy.deepcopy(student.adapters).to(device), copy.deepcopy(student.norms).to(device)
    t_heads = copy.deepcopy(teacher.heads).to(device).eval().requires_grad_(False)
    teacher_bbs.requires_grad_(False)
    if cfg.model.channels_last:  # both sides in the stage's memory format
        for m in (student_bb, teacher_bbs, floor_heads, floor_adapters, t_heads):
            m.to(memory_format=torch.channels_last)
    if cfg.model.compile:
        compile_stages(distiller)
        compile_stages(distiller.teacher)
        compile_stages(student_bb)
        compile_stages(teacher_bbs)
    floor_loss = _squeeze_floor_loss(student_bb, teacher_bbs, floor_heads, t_heads, floor_adapters, floor_norms,
                                     distiller)
    trainable = nn.ModuleList([student_bb, floor_heads, floor_adapters])
    fns = {
        "stage": _train_step(distiller, lambda m, b: m.total_loss(m(b)), engine.build_optimizer(distiller, sq), sq, device),
        "floor": _train_step(None, floor_loss, engine.build_optimizer(trainable, sq), sq, device),
    }
    return {"fns": fns, "batches": batches, "distiller": distiller, "teacher_bbs": teacher_bbs,
            "heads": floor_heads, "t_heads": t_heads}


def bench_squeeze(cfg: Config, steps: int = 20, teacher_path: str | None = None) -> dict:
    device = dist.init_distributed()
    parts = squeeze_bench_parts(cfg, device, teacher_path, min(steps, 4))
    times = _alternate(parts["fns"], parts["batches"], steps, device)
    sq, arch = cfg.squeeze, parts["distiller"].teacher.mcfg.arch
    return _result("squeeze", times, images_per_s=images_per_step(cfg.sources) / times["stage"],
                   max_mem_mb=max_memory_mb(device), device=str(device), arch=arch,
                   amp=sq.amp, compile=cfg.model.compile)


def bench_backbone(cfg: Config, steps: int = 20) -> dict:
    """One bare torchvision classifier training step (fc + cross-entropy, the expand optimiser) in images/s.

    The yardstick of the GPU check: what the device does on the simplest ResNet step, at the first
    cls source's image_size and batch_size, with expand.amp, model.channels_last and model.compile.
    Random images on the device: no loader, no heads, no reconciliation.
    """
    device = dist.init_distributed()
    tc = cfg.expand
    src = next((s for s in cfg.sources if s.task == "cls"), None)
    if src is None:
        raise ConfigError("bench backbone: needs a cls source (its image_size and batch_size set the step)")
    seed_everything(tc.seed)
    classes = src.num_classes or 1000
    model = BACKBONES[cfg.model.arch](num_classes=classes).to(device).train()
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.model.compile:
        compile_stages(model)
    x = torch.randn(src.batch_size, 3, src.image_size, src.image_size, device=device)
    if cfg.model.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (src.batch_size,), device=device)
    step = _train_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), engine.build_optimizer(model, tc), tc,
                       device)
    step_s = _alternate({"stage": step}, [(x, y)], steps, device)["stage"]
    return {"bench": "backbone", "arch": cfg.model.arch, "batch_size": src.batch_size, "image_size": src.image_size,
            "step_s": step_s, "images_per_s": src.batch_size / step_s, "amp": tc.amp,
            "channels_last": cfg.model.channels_last, "compile": cfg.model.compile,
            "max_mem_mb": max_memory_mb(device), "device": str(device)}


def summarise_run(out: str) -> dict:
    """A training run's last logged window (`out/log.jsonl`) as one line: the GPU check's recipe case.

    Step time, images/s in all and per source (its batch over the step time),
    the fraction of the window spent waiting for data, and peak memory. The last
    window, because the first one includes start-up (workers, cudnn autotuning).
    """
    records = [json.loads(ln) for ln in (Path(out) / "log.jsonl").read_text().splitlines() if ln.strip()]
    start = next(r for r in records if r["event"] == "start")
    last = [r for r in records if r["event"] == "train"][-1]
    scale = start["config"][start["stage"]]["grad_accum"] * start["world_size"]  # images a step, per batch image
    batches = {s["name"]: s["batch_size"] * scale for s in start["config"]["sources"]}
    step_s = sum(batches.values()) / last["images_per_s"]
    return {"case": "recipe", "stage": start["stage"], "step": last["step"], "step_s": round(step_s, 4),
            "images_per_s": round(last["images_per_s"], 1),
            "images_per_s_per_source": {n: round(b / step_s, 1) for n, b in batches.items()},
            "data_wait": round(last["data_wait"], 4), "max_mem_mb": round(last["max_mem_mb"]),
            "workers_per_source": start["config"][start["stage"]]["workers"]}


# ----------------------------------------------------------------------------
# the loader (docs/DESIGN.md §7: >= 0.9x a plain DataLoader)

def _plain_stream(cfg: Config, datasets: dict):
    """The baseline: one plain shuffled DataLoader per source, cycled. Persistent workers make it the
    strongest plain loader (no restart at epoch ends), so the ratio measures our own overhead."""
    workers = cfg.expand.workers
    loaders = {s.name: DataLoader(datasets[s.name], batch_size=s.batch_size, shuffle=True, drop_last=True,
                                  num_workers=workers, persistent_workers=workers > 0,
                                  collate_fn=data.collate_fn(s.task, s.ignore_index),
                                  pin_memory=torch.cuda.is_available())
               for s in cfg.sources}
    iters = {n: iter(dl) for n, dl in loaders.items()}
    while True:
        out = {}
        for n in loaders:
            try:
                out[n] = next(iters[n])
            except StopIteration:
                iters[n] = iter(loaders[n])
                out[n] = next(iters[n])
        yield out


def _images_per_s(stream, steps: int, warmup: int) -> float:
    for _ in range(warmup):  # worker start-up and first decodes are not throughput
        next(stream)
    images, t0 = 0, time.perf_counter()
    for _ in range(steps):
        images += sum(len(b["images"]) for b in next(stream).values())
    return images / (time.perf_counter() - t0)


def bench_loader(cfg: Config, steps: int = 50, rounds: int = 3) -> dict:
    """Images/s of MultiSourceLoader vs plain DataLoaders over the same train datasets, workers and batches.

    Rounds alternate which loader goes first, and the best round of each counts:
    on a shared machine, noise only ever slows a round down. Besides the ratio it
    reports images/s per worker process (`expand.workers` per source) and
    `loader_step_s`, the shortest training step this loader can feed with these
    workers: a GPU step faster than that waits for data (more workers, or faster decoding).
    """
    datasets = {s.name: data.build_dataset(s, "train", train=True) for s in cfg.sources}
    warmup = max(3, steps // 10)
    rates: dict[str, list[float]] = {"multi": [], "plain": []}
    for r in range(rounds):
        for kind in (("multi", "plain") if r % 2 == 0 else ("plain", "multi")):
            if kind == "multi":
                stream = data.MultiSourceLoader(cfg.sources, datasets, seed=cfg.expand.seed,
                                                workers=cfg.expand.workers)
            else:
                stream = _plain_stream(cfg, datasets)
            rates[kind].append(_images_per_s(stream, steps, warmup))
            stream.close()
    m, p = max(rates["multi"]), max(rates["plain"])
    procs = max(1, cfg.expand.workers) * len(cfg.sources)  # workers = 0: the main process decodes
    per_step = images_per_step(cfg.sources)
    return {"bench": "loader", "steps": steps, "rounds": rounds, "workers": cfg.expand.workers,
            "sources": len(cfg.sources), "worker_processes": procs, "cpus": len(os.sched_getaffinity(0)),
            "multi_images_per_s": round(m, 1), "plain_images_per_s": round(p, 1),
            "ratio": round(m / p, 3) if p > 0 else math.nan,
            "multi_images_per_s_per_worker": round(m / procs, 1), "plain_images_per_s_per_worker": round(p / procs, 1),
            "images_per_step": per_step, "loader_step_s": round(per_step / m, 3) if m > 0 else math.nan}


# ----------------------------------------------------------------------------
# transfer (docs/DESIGN.md §7: a linear transfer <= 1.25x one extraction pass)

def _clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and of its reaped children, i.e. DataLoader workers)."""
    import resource
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), time.process_time() + kids.ru_utime + kids.ru_stime


def bench_transfer(cfg: Config, backbone: str = "random", rounds: int = 3) -> dict:
    """Time of one linear transfer over the cls datasets (cold cache) vs one extraction pass (docs/DESIGN.md §7).

    Both include building the datasets and loaders over train + val; the
    transfer also writes the cache and fits the probe over the whole L2 grid
    plus the refit. The two are timed alternately `rounds` times and the best
    of each is kept, so a burst of load on a shared machine does not decide
    the ratio. Target: ratio <= 1.25 (wall clock). `cpu_ratio`, the same with
    CPU seconds, is reported too: on a busy machine it is the steadier number.
    """
    device = dist.init_distributed()
    xfer = cfg.transfer
    cls = [dataclasses.replace(transfer.resolve(d, xfer), protocol="linear") for d in xfer.datasets if d.task == "cls"]
    if not cls:
        raise ConfigError("bench transfer: the config has no cls transfer dataset")
    bb, info = load_backbone(backbone, cfg.model.arch)
    bb.to(device).eval()
    with torch.no_grad():  # one-off costs (thread pools, kernel selection) charged to neither side
        bb(torch.zeros(2, 3, cls[0].image_size, cls[0].image_size, device=device))
    transfer_t, extract_t = [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:  # a cold cache: the transfer extracts too
            start = _clock()
            for d in cls:
                transfer.linear_transfer(bb, info, d, xfer, xfer.seeds[0], device, tmp)
            transfer_t.append([b - a for a, b in zip(start, _clock())])
        start = _clock()
        for d in cls:
            for split in ("train", "val"):
                extract_features(bb, data.build_dataset(d, split, train=False), device,
                                 max(d.batch_size, xfer.batch_size), xfer.workers)
        extract_t.append([b - a for a, b in zip(start, _clock())])
    (tw, tc_), (ew, ec) = (min(t[0] for t in transfer_t), min(t[1] for t in transfer_t)), \
        (min(t[0] for t in extract_t), min(t[1] for t in extract_t))
    return {"bench": "transfer", "backbone": backbone, "datasets": [d.name for d in cls],
            "transfer_s": round(tw, 3), "extract_s": round(ew, 3), "ratio": round(tw / ew, 3),
            "transfer_cpu_s": round(tc_, 3), "extract_cpu_s": round(ec, 3), "cpu_ratio": round(tc_ / ec, 3),
            "rounds_s": {"transfer": [round(t[0], 2) for t in transfer_t], "extract": [round(t[0], 2) for t in extract_t]}}
