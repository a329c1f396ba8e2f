"""The expansion stage: task-specific backbones linked by reconciliation layers.

X-Learner first *expands*: one backbone per task (cls, det, seg), every image
run through all of them, and reconciliation layers (RL) that let each branch
add what the other branches computed on the same image (docs/DESIGN.md §1). Each
step draws one batch from every source; the loss is `sum_s w_s * L_s`.

This module holds the stage's model and its run:
    XLearnerModel                 below: the expanded backbone (model.ExpandedNet) + one head per task
                                  (heads.py); with `model.shared_backbone`, one plain Backbone for every
                                  task instead (MSMT, hard sharing, the baseline)
    run                           datasets + MultiSourceLoader (data.py), per-source evaluation
                                  (evaluate.py), handed to the shared training engine (engine.py), which owns the loop,
                                  DDP, AMP, checkpoints and logging
Launch with `python cli.py expand` on one
process or `torchrun --nproc_per_node=N cli.py expand` on many.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from . import data, engine

from .run import dist
from .backbone import BACKBONES, Backbone, build_backbone, channels_last, compile_stages, n_params
from .run.checkpoint import CheckpointError, load_checkpoint, strip_prefixes
from .config import Config, ModelConfig, SourceConfig, check_tasks_have_sources
from .configfile import config_from_dict
from .data import build_train_datasets, images_per_step
from .evaluate import make_evaluator
from .heads import MultiSourceModel
from .model import ExpandedNet
from .run.rng import seed_everything
from .run.rundir import locked


# ----------------------------------------------------------------------------
# the expansion stage's model

class XLearnerModel(MultiSourceModel):
    """The expansion-stage model: an ExpandedNet (or one shared Backbone: MSMT, hard sharing) + task heads."""

    def __init__(self, mcfg: ModelConfig, sources: list[SourceConfig], num_classes: dict[str, int]):
        if mcfg.shared_backbone:
            backbone = build_backbone(mcfg.arch, mcfg.pretrained, mcfg.frozen_bn)
        else:
            backbone = ExpandedNet(mcfg.arch, mcfg.tasks, mcfg.reconcile, mcfg.reconcile_stages,
                                   mcfg.reconcile_detach, mcfg.pretrained, mcfg.frozen_bn, mcfg.reconcile_width,
                                   mcfg.other_branches_bn, mcfg.branch_init)
        super().__init__(mcfg, sources, num_classes, backbone.channels)
        self.backbone = backbone
        channels_last(self, mcfg.channels_last)

    def features(self, x: torch.Tensor, task: str) -> dict[str, torch.Tensor]:
        if self.mcfg.shared_backbone:
            return self.backbone(x)
        return self.backbone(x, task)

    def exported_backbone(self, branch: str | None) -> Backbone:
        """Branch `branch` (default: the first task), or the shared backbone (any task's name, or none)."""
        if self.mcfg.shared_backbone:
            if branch and branch not in self.tasks:
                raise ValueError(f"branch {branch!r}: tasks are {self.tasks}")
            return self.backbone
        branches = self.backbone.branches
        branch = branch or self.tasks[0]
        if branch not in branches:
            raise ValueError(f"branch {branch!r}: the expanded model's branches are {list(branches)}")
        return branches[branch]

    def report(self) -> str:
        """Build-time report: parameters per branch / RL / head, and expanded-over-single MACs."""
        m = self.mcfg
        if m.shared_backbone:
            lines = [f"XLearnerModel: one shared {m.arch} for tasks {self.tasks} (hard sharing)",
                     f"  backbone: {n_params(self.backbone)} params"]
        else:
            net = self.backbone
            lines = [f"XLearnerModel: {m.arch} x {len(self.tasks)} branches {self.tasks}, reconcile={m.reconcile} "
                     f"at layers {list(net.reconcile.stages)}, detach={m.reconcile_detach}"]
            for t in self.tasks:
                rl = "; ".join(f"{k} {n_params(v)}" for k, v in net.reconcile.into[t].items()) or "none"
                lines.append(f"  branch {t}: {n_params(net.branches[t])} params; RL into {t}: {rl}")
        lines += self._head_report()
        lines.append(f"  total: {n_params(self)} params")
        lines.append(self._mac_report())
        return "\n".join(lines)

    def _mac_report(self) -> str:
        """MACs of features(x, task) over one plain backbone, per source at its image_size.

        Counted by FlopCounterMode on copies built on the meta device: shapes only, no compute."""
        from torch.utils.flop_counter import FlopCounterMode

        m = self.mcfg
        with torch.device("meta"):
            single = Backbone(BACKBONES[m.arch](weights=None), m.arch).eval()
            expanded = single if m.shared_backbone else ExpandedNet(
                m.arch, m.tasks, m.reconcile, m.reconcile_stages, m.reconcile_detach, width=m.reconcile_width).eval()

        def flops(task, size):
            x = torch.empty(1, 3, size, size, device="meta")
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                single(x) if task is None or m.shared_backbone else expanded(x, task)
            rl = sum(counter.get_flop_counts().get("ExpandedNet.reconcile", {}).values())
            return counter.get_total_flops(), rl

        parts, num, den, rl_num = [], 0.0, 0.0, 0.0
        for s in self.source_list:  # det: a square image at the short side, an approximation of the real shape
            f1, _ = flops(None, s.image_size)
            fe, rl = flops(s.task, s.image_size)
            parts.append(f"{s.name}@{s.image_size}px {fe / f1:.2f}x")
            num, den, rl_num = num + s.batch_size * fe, den + s.batch_size * f1, rl_num + s.batch_size * rl
        return (f"  backbone forward MACs, expanded / single backbone: {num / den:.2f}x per step, of which the RLs "
                f"{rl_num / den:.2f}x (batch-weighted; {', '.join(parts)})")


def load_model(ckpt: dict) -> XLearnerModel:
    """The XLearnerModel of an expand run checkpoint, its weights loaded, in eval mode (weights.model_from_checkpoint
    checks the checkpoint's keys and kind). The weights come from the checkpoint: `pretrained` is not read again."""
    cfg = config_from_dict(ckpt["config"])
    model = XLearnerModel(dataclasses.replace(cfg.model, pretrained=""), cfg.sources, ckpt["meta"]["num_classes"])
    model.load_state_dict(strip_prefixes(ckpt["model"]))
    return model.eval()


# ----------------------------------------------------------------------------
# the run

def load_init(path: str | Path, model: XLearnerModel) -> dict:
    """`expand --init`: load the weights of an expand checkpoint of this same model into `model`; the checkpoint."""
    ckpt = load_checkpoint(path)
    kind = ckpt.get("meta", {}).get("kind")
    if kind != "expanded":
        raise CheckpointError(f"{path}: not an expand checkpoint (meta.kind = {kind!r}); --init takes RUN/checkpoint.pt "
                              "of an `expand` run")
    try:
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError as e:  # a tensor of another shape: another arch, class count or head size
        raise CheckpointError(f"{path}: not a checkpoint of this model ({str(e).splitlines()[-1].strip()}); --init "
                              "needs the same [model] and [[sources]]") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: not a checkpoint of this model ({len(missing)} missing keys, e.g. "
                              f"{missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]}); --init needs "
                              "the same [model] and [[sources]]")
    return ckpt


@locked("expand")  # OUT/.lock for the life of the run
def run(cfg: Config, init: Path | None = None) -> Path:
    """Run (or resume) the expansion stage described by `cfg`; returns the checkpoint path.

    `init` (`expand --init`, "train on"): an expand checkpoint of the same model whose weights (branches, RLs,
    heads) start this run, with a fresh optimiser and schedule, and whose data stream it continues (the loader
    starts where init's stopped, so no batch of init's run is replayed); a resume overrides both. tools/ablate.py's
    "Expand + RL" trains the squeeze's teacher on this way, for the same budget as the squeeze."""
    check_tasks_have_sources(cfg.model, cfg.sources)
    device = dist.init_distributed()
    tc = cfg.expand
    seed_everything(tc.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    datasets, num_classes = build_train_datasets(cfg.sources)
    model = XLearnerModel(cfg.model, cfg.sources, num_classes)  # channels_last already, when configured
    init_ckpt = load_init(init, model) if init is not None else None
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
