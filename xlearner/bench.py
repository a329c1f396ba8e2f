"""Benchmarks of the two training stages against their floors (DESIGN.md §7).

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
(it is `bench loader`'s business).
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn as nn
from torchvision.models import _utils as tv_utils

from . import data, dist, engine
from .config import Config
from .expand import build_train_datasets
from .model import BACKBONES, SqueezedModel, XLearnerModel

STAGES = {f"layer{i}": f"layer{i}" for i in range(1, 5)}


def plain_backbone(arch: str) -> nn.Module:
    """A bare torchvision ResNet returning its stage features (IntermediateLayerGetter drops avgpool/fc)."""
    return tv_utils.IntermediateLayerGetter(BACKBONES[arch](), return_layers=STAGES)


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
    engine.seed_everything(tc.seed)
    batches, num_classes = _batches(cfg, tc, min(steps, 4), device)
    model = XLearnerModel(cfg.model, cfg.sources, num_classes).to(device).train()
    tasks = list(model.heads)
    floor_bb = nn.ModuleDict({t: plain_backbone(cfg.model.arch) for t in tasks}).to(device).train()
    floor_heads = copy.deepcopy(model.heads)
    if cfg.model.channels_last:
        model, floor_bb, floor_heads = (m.to(memory_format=torch.channels_last) for m in (model, floor_bb, floor_heads))
    fns = {
        "stage": _train_step(model, lambda m, b: m.total_loss(m(b)), engine.build_optimizer(model, tc), tc, device),
        "floor": _train_step(None, _floor_loss(floor_bb, floor_heads, cfg.sources,
                                                   lambda t: [floor_bb[u] for u in tasks if u != t]),
                             engine.build_optimizer(nn.ModuleList([floor_bb, floor_heads]), tc), tc, device),
    }
    times = _alternate(fns, batches, steps, device)
    return _result("expand", times, images_per_s=sum(s.batch_size for s in cfg.sources) / times["stage"],
                   max_mem_mb=engine.max_memory_mb(device), device=str(device), arch=cfg.model.arch, amp=tc.amp)


def bench_squeeze(cfg: Config, steps: int = 20, teacher_path: str | None = None) -> dict:
    from .squeeze import Distiller, load_teacher
    device = dist.init_distributed()
    sq = cfg.squeeze
    engine.seed_everything(sq.seed)
    batches, num_classes = _batches(cfg, sq, min(steps, 4), device)
    if teacher_path:
        teacher, _ = load_teacher(teacher_path, cfg)
    else:
        teacher = XLearnerModel(cfg.model, cfg.sources, num_classes)
    student = SqueezedModel.from_expanded(teacher, sq.student_init or f"task:{teacher.tasks[0]}", sq.distill_stages)
    distiller = Distiller(student, teacher, cfg.sources, sq).to(device).train()
    tasks = list(teacher.heads)
    # Floor: the student's plain ResNet (keyed by every task, one module) plus T teacher-branch stand-ins.
    student_bb = plain_backbone(teacher.mcfg.arch)
    teacher_bbs = [plain_backbone(teacher.mcfg.arch).eval() for _ in tasks]
    floor_bb = nn.ModuleDict({t: student_bb for t in tasks}).to(device)
    teacher_bbs = nn.ModuleList(teacher_bbs).to(device)
    floor_heads = copy.deepcopy(student.heads).to(device)
    floor_loss = _floor_loss(floor_bb, floor_heads, cfg.sources, lambda t: list(teacher_bbs))
    fns = {
        "stage": _train_step(distiller, lambda m, b: m.total_loss(m(b)), engine.build_optimizer(distiller, sq), sq, device),
        "floor": _train_step(None, floor_loss, engine.build_optimizer(nn.ModuleList([student_bb, floor_heads]), sq), sq, device),
    }
    times = _alternate(fns, batches, steps, device)
    return _result("squeeze", times, max_mem_mb=engine.max_memory_mb(device), device=str(device), arch=teacher.mcfg.arch)
