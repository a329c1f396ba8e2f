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

from . import data, engine

from .run import dist
from .backbone import compile_stages
from .run.checkpoint import load_checkpoint
from .config import Config, check_tasks_have_sources
from .data import build_train_datasets, images_per_step
from .evaluate import make_evaluator
from .model import XLearnerModel
from .run.rng import seed_everything
from .run.rundir import locked


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
    seed_everything(tc.seed)  # the same initial weights on every rank (DDP also broadcasts them)
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
