"""The expansion stage: task-specific backbones linked by reconciliation layers.

X-Learner first *expands*: one backbone per task (cls, det, seg), every image
run through all of them, and reconciliation layers (RL) that let each branch
add what the other branches computed on the same image (docs/DESIGN.md §1). Each
step draws one batch from every source; the loss is `sum_s w_s * L_s`.

This module only assembles the pieces:
    datasets + MultiSourceLoader  (data.py)
    XLearnerModel                 (model.py)
    per-source evaluation         (evaluate.py)
and hands them to the shared training engine (engine.py), which owns the loop,
DDP, AMP, checkpoints and logging. Launch with `python cli.py expand` on one
process or `torchrun --nproc_per_node=N cli.py expand` on many.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from . import data, dist, engine
from .checkpoint import load_checkpoint
from .config import Config, SourceConfig, check_tasks_have_sources
from .evaluate import evaluate
from .model import XLearnerModel
from .rundir import locked


def build_train_datasets(sources: list[SourceConfig]) -> tuple[dict, dict[str, int]]:
    """Every source's train split, and its class count (the config's, or what the data says)."""
    datasets = {s.name: data.build_dataset(s, "train", train=True) for s in sources}
    num_classes = {s.name: s.num_classes or datasets[s.name].num_classes for s in sources}
    return datasets, num_classes


def make_evaluator(model: nn.Module, sources: list[SourceConfig], device: torch.device, amp: str,
                   workers: int) -> Callable[[int], dict]:
    """A function step -> {source: metrics} over each source's val split, sharded across ranks.

    The val datasets and loaders are built on first use and then reused, so a
    periodic evaluation costs only the forward passes.
    """
    cache: dict[str, tuple] = {}

    def run_eval(step: int) -> dict:
        results = {}
        for s in sources:
            if not s.val:
                continue
            if s.name not in cache:
                ds = data.build_dataset(s, "val", train=False)
                cache[s.name] = (ds, data.build_eval_loader(s, ds, rank=dist.get_rank(), world_size=dist.get_world_size(),
                                                            batch_size=s.batch_size, workers=workers))
            ds, loader = cache[s.name]
            results[s.name] = evaluate(model, s, loader, ds, device, amp=amp)
        return results

    return run_eval


def images_per_step(sources: list[SourceConfig]) -> int:
    return sum(s.batch_size for s in sources)


def compile_stages(model: nn.Module, **options) -> int:
    """torch.compile, in place, the four stages of every ResNet trunk in `model` (`model.compile = true`).

    ExpandedNet runs its branches stage by stage (`branch.stage(l, x)` calls
    `layer{l}(x)`), never a branch's forward, so the stages are the unit to
    compile: they hold almost all of the compute. `nn.Module.compile()` compiles
    a module's call in place, without the `_orig_mod.` wrapper of
    `torch.compile(module)`, so state_dict keys, checkpoints and exact resume do
    not change. The stem (one conv) and the heads (detection shapes change every
    batch) stay eager. Any module with layer1..layer4 counts as a trunk: our
    Backbone, a torchvision ResNet, or tools/bench.py's plain floors. `options` go to
    torch.compile (default: inductor, static shapes). Returns the number of stages compiled.

    Every compiled stage runs through the one code object of nn.Module._call_impl,
    so to dynamo each stage (and each input shape) is a recompile of the same
    frame: dynamo would soon mark the channel and size dims dynamic (on torch
    2.14.1 inductor then fails on the CPU: "Cannot convert expression to float",
    measured) and stop compiling after `recompile_limit` (8) variants. Hence static
    shapes, and a limit that leaves room for 8 variants per stage. Detection
    inputs change size every batch and recompile per shape: compile suits
    fixed-size inputs (README, "Full scale").
    """
    import torch._dynamo

    trunks = [m for m in model.modules() if all(isinstance(getattr(m, f"layer{l}", None), nn.Module)
                                                for l in range(1, 5))]
    options = {"dynamic": False, **options}
    for trunk in trunks:
        for l in range(1, 5):
            getattr(trunk, f"layer{l}").compile(**options)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * 4 * len(trunks))
    return 4 * len(trunks)


@locked("expand")  # OUT/.lock for the life of the run
def run(cfg: Config, init: Path | None = None) -> Path:
    """Run (or resume) the expansion stage described by `cfg`; returns the checkpoint path.

    `init`: an expand checkpoint of the same model whose weights (branches, RLs, heads) start this run, with a
    fresh optimiser and schedule (tools/ablate.py's "trained on instead of squeezed"), and whose data stream it
    continues (the loader starts where init's stopped, so no batch of init's run is replayed); a resume
    overrides both."""
    check_tasks_have_sources(cfg.model, cfg.sources)
    device = dist.init_distributed()
    tc = cfg.expand
    engine.seed_everything(tc.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    datasets, num_classes = build_train_datasets(cfg.sources)
    model = XLearnerModel(cfg.model, cfg.sources, num_classes)  # channels_last already, when configured
    init_ckpt = load_checkpoint(init) if init is not None else None
    if init_ckpt is not None:
        model.load_state_dict(init_ckpt["model"])
    if cfg.model.compile:
        compile_stages(model)
    loader = data.MultiSourceLoader(cfg.sources, datasets, rank=dist.get_rank(), world_size=dist.get_world_size(),
                                    seed=tc.seed, workers=tc.workers)
    if init_ckpt is not None:
        loader.load_state_dict(init_ckpt["loader"])
    meta = {"kind": "expanded", "num_classes": num_classes, "arch": cfg.model.arch,
            "classes": {k: list(getattr(d, "classes", [])) for k, d in datasets.items()}}
    engine.train(engine.Run(
        model=model, loader=loader, tc=tc, config=cfg, device=device, meta=meta,
        evaluate=make_evaluator(model, cfg.sources, device, tc.amp, tc.workers),
        images_per_step=images_per_step(cfg.sources), report=model.report(), stage="expand"))
    dist.barrier()
    return Path(tc.out) / "checkpoint.pt"
