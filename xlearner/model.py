"""The two models of the method: the expanded model (stage 1) and the squeezed student (stage 2).

X-Learner (docs/DESIGN.md §1) trains in two stages. `XLearnerModel` is the
first's: the expanded backbone (reconcile.ExpandedNet: one torchvision ResNet
branch per task, linked by reconciliation layers) with one head per task
(heads.py), one predictor per source. With `model.shared_backbone` it is one
plain Backbone for every task instead (MSMT, hard sharing, the baseline).

`SqueezedModel` is the second's: ONE plain Backbone of the branches' arch, the
adapters and standardisations the distillation reads it through, and the task
heads; squeeze.py trains it against the frozen expanded model.

`MultiSourceModel` is what both share: heads per task, the per-source loss loop,
predict. weights.py exports either's backbone as a plain torchvision state_dict
(docs/DESIGN.md §5) and rebuilds either from a run checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from .backbone import BACKBONES, Backbone, build_backbone, load_torchvision_state_dict, read_state_dict
from .config import (ConfigError, ModelConfig, SourceConfig, SqueezeConfig, branches_share_start,
                     check_tasks_have_sources)
from .heads import HEADS
from .reconcile import ExpandedNet

# ----------------------------------------------------------------------------
# the models

class SourceOutput(NamedTuple):
    """One source batch through a model: what the squeeze distiller needs besides the loss."""
    loss: torch.Tensor                 # unweighted task loss
    outputs: Optional[torch.Tensor]    # cls logits, else None
    feats: dict                        # backbone features (stage -> Tensor)
    images: torch.Tensor               # the tensor the backbone saw (det: resized, normalised, padded)
    ctx: dict                          # what the head's prepare() passed on (labels, targets, sizes)


def channels_last(x, on: bool):
    """A module or an image batch in channels-last memory format when `on` (model.channels_last), else as is."""
    if not on:
        return x
    if isinstance(x, torch.Tensor):
        return x.contiguous(memory_format=torch.channels_last)
    return x.to(memory_format=torch.channels_last)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _fmt(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def n_params(module: nn.Module) -> str:
    """A module's parameter count as the build reports print it: 11.18M, 23.4k."""
    return _fmt(_count(module))


class MultiSourceModel(nn.Module):
    """What XLearnerModel and SqueezedModel share: heads per task, the per-source loss loop, predict."""

    def __init__(self, mcfg: ModelConfig, sources: list[SourceConfig], num_classes: dict[str, int],
                 channels: dict[str, int]):
        super().__init__()
        self.mcfg = mcfg
        self.source_list = list(sources)
        self.sources = {s.name: s for s in sources}
        missing = [s.name for s in sources if s.name not in num_classes]
        if missing:
            raise ValueError(f"num_classes: no class count for sources {missing}")
        self.num_classes = {s.name: int(num_classes[s.name]) for s in sources}
        self.tasks = list(mcfg.tasks)
        check_tasks_have_sources(mcfg, sources)
        self.heads = nn.ModuleDict({
            t: HEADS[t](mcfg, [s for s in sources if s.task == t], self.num_classes, channels) for t in self.tasks})

    def features(self, x: torch.Tensor, task: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def exported_backbone(self, branch: str | None) -> Backbone:
        """The Backbone that weights.backbone_state_dict exports (`branch`: which one, where there is a choice)."""
        raise NotImplementedError

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        return channels_last(x, self.mcfg.channels_last)

    def forward_source(self, batch: dict, source: str) -> SourceOutput:
        task = self.sources[source].task
        head = self.heads[task]
        images, ctx = head.prepare(batch, source)
        images = self._images(images)
        feats = self.features(images, task)
        loss, outputs = head.loss(feats, ctx, source)
        return SourceOutput(loss, outputs, feats, images, ctx)

    def forward(self, batch_by_source: dict[str, dict]) -> dict[str, torch.Tensor]:
        """Unweighted loss per source. Call once per step with a batch of every source (one DDP forward)."""
        unknown = sorted(set(batch_by_source) - set(self.sources))
        if unknown:
            raise KeyError(f"batches for unknown sources {unknown}; sources are {sorted(self.sources)}")
        return {name: self.forward_source(batch, name).loss for name, batch in batch_by_source.items()}

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """L = sum_s w_s * L_s."""
        if not losses:
            raise ValueError("total_loss: no losses")
        return sum(self.sources[s].weight * loss for s, loss in losses.items())

    @torch.no_grad()
    def predict(self, images, source: str):
        """Inference on `images` as a batch holds them (Tensor for cls/seg, list of [0,1] images for det)."""
        task = self.sources[source].task
        head = self.heads[task]
        x, ctx = head.prepare({"images": images}, source)
        return head.predict(self.features(self._images(x), task), ctx, source)

    def _head_report(self) -> list[str]:
        lines = []
        for t, head in self.heads.items():
            preds = ", ".join(f"{s} {n_params(p)}" for s, p in head.predictors.items())
            lines.append(f"  head {t}: neck {_fmt(_count(head) - _count(head.predictors))}; predictors: {preds}")
        return lines


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


# ----------------------------------------------------------------------------
# the squeeze stage's student (squeeze.py trains it)

class Standardize(nn.Module):
    """N_{b,l}: per-channel (x - mean) / std of one teacher feature map; identity until `set` is called."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def set(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.view(1, -1, 1, 1).to(x.dtype)) / self.std.view(1, -1, 1, 1).to(x.dtype)


class SqueezedModel(MultiSourceModel):
    """The squeeze-stage student: one Backbone, adapters A and standardisations N per (branch, stage), task heads.

    adapters[b][f"layer{l}"] maps the student's stage-l feature into teacher
    branch b's (standardised) space. It starts as N_{b,l} itself (the identity
    when nothing is standardised; `bias` only then), so a student equal to branch
    b starts at zero distillation loss for b, instead of first having to undo a
    random projection. Neither A nor N is exported (weights.backbone_state_dict)."""

    def __init__(self, mcfg: ModelConfig, sources: list[SourceConfig], num_classes: dict[str, int],
                 distill_stages=(2, 3, 4), adapter_bias: bool = False):
        backbone = build_backbone(mcfg.arch, "", mcfg.frozen_bn)  # weights come from the teacher or a checkpoint
        super().__init__(mcfg, sources, num_classes, backbone.channels)
        self.backbone = backbone
        self.distill_stages = [int(l) for l in distill_stages]
        bad = [l for l in self.distill_stages if l not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"squeeze.distill_stages: stages are 1..4 (layer1..layer4), got {bad}")
        layers = {f"layer{l}": backbone.channels[f"layer{l}"] for l in self.distill_stages}
        self.adapters = nn.ModuleDict({t: nn.ModuleDict({k: nn.Conv2d(c, c, 1, bias=adapter_bias)
                                                         for k, c in layers.items()}) for t in self.tasks})
        self.norms = nn.ModuleDict({t: nn.ModuleDict({k: Standardize(c) for k, c in layers.items()})
                                    for t in self.tasks})
        self.reset_adapters()
        channels_last(self, mcfg.channels_last)

    @torch.no_grad()
    def reset_adapters(self) -> None:
        """A_{b,l} := N_{b,l} (weight diag(1/std), bias -mean/std; the identity for N = identity)."""
        for t, convs in self.adapters.items():
            for k, conv in convs.items():
                norm = self.norms[t][k]
                conv.weight.copy_(torch.diag(1 / norm.std).view(*conv.weight.shape))
                if conv.bias is not None:
                    conv.bias.copy_(-norm.mean / norm.std)

    def features(self, x: torch.Tensor, task: str | None = None) -> dict[str, torch.Tensor]:
        return self.backbone(x)  # one backbone for every task

    def exported_backbone(self, branch: str | None) -> nn.Module:
        if branch:
            raise ValueError("a squeezed model has a single backbone; branch applies to expanded checkpoints only")
        return self.backbone

    def report(self, init: str = "", heads: str = "copy") -> str:
        """Build-time report: the one backbone, the adapters (discarded after squeeze), the heads."""
        lines = [f"SqueezedModel: one {self.mcfg.arch}" + (f", init {init}" if init else "") + f", heads {heads}",
                 f"  backbone: {n_params(self.backbone)} params",
                 f"  adapters: {n_params(self.adapters)} params (distillation only, not exported)"]
        lines += self._head_report()
        lines.append(f"  total: {n_params(self)} params")
        return "\n".join(lines)

    @classmethod
    def from_expanded(cls, teacher: XLearnerModel, student_init: str = "",
                      sq: SqueezeConfig | None = None) -> "SqueezedModel":
        """A student for `teacher`: heads per `sq.heads`, backbone per `student_init` (`init_student_backbone`)."""
        teacher = getattr(teacher, "module", teacher)  # accept a DDP-wrapped teacher
        sq = sq or SqueezeConfig()
        model = cls(teacher.mcfg, teacher.source_list, teacher.num_classes, sq.distill_stages,
                    adapter_bias=sq.teacher_norm == "standardize")
        if sq.heads != "fresh":
            model.heads.load_state_dict(teacher.heads.state_dict())
        model.heads.requires_grad_(sq.heads != "frozen")
        init_student_backbone(model.backbone, teacher, student_init or resolve_student_init("", teacher))
        device = next(teacher.parameters()).device
        return model.to(device)


def resolve_student_init(student_init: str, teacher: XLearnerModel) -> str:
    """`squeeze.student_init` with its default: "" is `task:<first task>`, a copy of the first branch."""
    return student_init or f"task:{teacher.tasks[0]}"


def init_student_backbone(backbone: nn.Module, teacher: XLearnerModel, init: str) -> None:
    """Load the student's starting weights: task:<name> (that branch), mean (of the branches), scratch, or a file."""
    if teacher.mcfg.shared_backbone:
        branches = {t: teacher.backbone for t in teacher.tasks}
    else:
        branches = dict(teacher.backbone.branches.items())
    if init.startswith("task:"):
        name = init[len("task:"):]
        if name not in branches:
            raise ValueError(f"squeeze.student_init={init!r}: no branch {name!r}; branches are {list(branches)}")
        backbone.load_state_dict(branches[name].state_dict())
    elif init == "mean":
        if not branches_share_start(teacher.mcfg):  # unrelated networks: no common starting point to average around
            raise ConfigError("squeeze.student_init = 'mean': the teacher's branches started from independent random "
                              "weights (its model.branch_init is 'independent' and model.pretrained is empty), so "
                              "their average is meaningless; use task:<name>")
        sds = [b.state_dict() for b in branches.values()]
        # floats (weights, BN statistics): w_1 + mean_b (w_b - w_1), the mean, written so that branches that are
        # still identical give exactly w_1; the integer BN step counter takes the max
        backbone.load_state_dict({k: sds[0][k] + torch.stack([sd[k] - sds[0][k] for sd in sds]).mean(0)
                                  if sds[0][k].is_floating_point() else torch.stack([sd[k] for sd in sds]).max(0).values
                                  for k in sds[0]})
    elif init == "scratch":
        pass
    elif Path(init).is_file():
        load_torchvision_state_dict(backbone, read_state_dict(init), init)
    else:
        raise ValueError(f"squeeze.student_init={init!r}: expected task:<name>, mean, scratch, "
                         f"or the path of a torchvision-format state_dict")
