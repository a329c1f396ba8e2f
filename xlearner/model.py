"""The expansion stage's model: T task branches linked by reconciliation layers, plus task heads.

X-Learner (docs/DESIGN.md §1) trains in two stages; this module is the first.
There is one backbone branch per task (cls, det, seg), all the same
torchvision ResNet (backbone.py). Every image runs through all T branches
stage by stage; after each stage l in `reconcile_stages` a *reconciliation
layer* (RL, reconcile.py) adds to branch t what the other branches computed:

    x_t^l <- x_t^l + sum_{u != t} sum_{k <= l} R_{u,k->t,l}( stopgrad(x_u^k) )

The last BN of every R starts at gamma = beta = 0, so at initialisation the
expanded model is exactly T independent backbones; training then decides how
much each task borrows from the others. The stop-gradient means a branch's
weights are moved only by its own task's losses (less task interference),
while the RL still enriches its representation. Each task has one head
(heads.py) with one predictor per source. `XLearnerModel` ties this together.

`MultiSourceModel` is what the expanded model shares with the squeeze stage's
student (squeeze.SqueezedModel): heads per task, the per-source loss loop,
predict. `backbone_state_dict` exports either as a plain torchvision
state_dict (docs/DESIGN.md §5); `model_from_checkpoint` rebuilds either.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from .backbone import BACKBONES, Backbone, _build_backbone, _pretrained_state_dict, build_backbone
from .config import ModelConfig, SourceConfig, check_tasks_have_sources, config_from_dict
from .heads import HEADS
from .reconcile import RECONCILE

# ----------------------------------------------------------------------------
# the expanded backbone

class ExpandedNet(nn.Module):
    """T task branches of one ResNet arch, run stage by stage, linked by reconciliation layers.

    `forward(x, task)` returns branch `task`'s features. With `detach` on, the
    other branches run under torch.no_grad(): only branch `task` and the RLs
    feeding it build a graph (the others' activations are not kept, and there is
    no backward through them), and the other branches stop after the last
    reconciled stage since nothing downstream reads them.

    BN statistics are per task: a task-t batch leaves the running statistics of
    the other branches (and of the RLs feeding them) as they were, so branch u's
    statistics describe task u's images only, which is what it normalises when
    it is evaluated, exported, or seeds the squeeze student. How those branches
    normalise task t's images in training is `other_bn`: "batch" (default) with
    the batch's statistics, as a train-mode branch would, or "running" with
    their own running statistics (eval mode), which is what an RL reads at test
    time. The demo measured both (README): "running" gave the better teacher,
    "batch" the better squeezed student."""

    def __init__(self, arch: str, tasks: list[str], reconcile: str = "hrnet", stages=(1, 2, 3),
                 detach: bool = True, pretrained: str = "", frozen_bn: bool = False, width: float = 1.0,
                 other_bn: str = "batch"):
        super().__init__()
        if reconcile not in RECONCILE:
            raise ValueError(f"model.reconcile: unknown {reconcile!r} (choose from {sorted(RECONCILE)})")
        if other_bn not in ("batch", "running"):
            raise ValueError(f"model.other_branches_bn: expected 'batch' or 'running', got {other_bn!r}")
        bad = [l for l in stages if l not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"model.reconcile_stages: stages are 1..4 (layer1..layer4), got {bad}")
        self.tasks, self.detach, self.other_bn = list(tasks), detach, other_bn
        sd = _pretrained_state_dict(pretrained)  # read (or download) once for all branches
        self.branches = nn.ModuleDict({t: _build_backbone(arch, sd, frozen_bn, pretrained) for t in tasks})
        self.channels = self.branches[self.tasks[0]].channels
        self.reconcile = RECONCILE[reconcile](self.tasks, self.channels, stages, width)

    def _run(self, x: torch.Tensor, want: set[str]) -> dict[str, dict[str, torch.Tensor]]:
        """The features of the branches in `want`; the other branches run only as far as an RL reads them."""
        plan = _Plan(self, want)
        feats = {u: {} for u in self.tasks}  # feats[u][l] = x_u^l, branch u's stage-l output
        h = {}  # each running branch's input to its next stage
        for u in plan.running(1):
            with plan.grad(u):
                h[u] = self.branches[u].stem(x)
        for l in range(1, 5):
            for u in plan.running(l):
                with plan.grad(u):
                    feats[u][l] = self.branches[u].stage(l, h[u])
            # x_t^l <- x_t^l + sum_{u != t} sum_{k <= l} R_{u,k->t,l}(stopgrad(x_u^k)) for every target t
            # at once: each reads the others' stage-l outputs from before their own RL
            new = {t: self._reconcile(t, l, feats, plan) for t in plan.running(l) if plan.reconciles(t, l)}
            for u in plan.running(l):
                feats[u][l] = h[u] = new.get(u, feats[u][l])
        return {u: {f"layer{l}": feats[u][l] for l in range(1, 5)} for u in want}

    def _reconcile(self, t: str, l: int, feats: dict, plan: _Plan) -> torch.Tensor:
        """x_t^l + sum_{u != t} sum_{k <= l} R_{u,k->t,l}(stopgrad(x_u^k)); the sum and the R are reconcile.py's."""
        x_u = {u: {k: self._stopgrad(feats[u][k]) for k in range(1, l + 1)} for u in self.tasks if u != t}
        with plan.grad(t):
            return self.reconcile(t, l, feats[t][l], x_u)

    def _stopgrad(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach() if self.detach else x  # detach off: the ablation where every task's loss moves every branch

    @contextlib.contextmanager
    def _others_keep_stats(self, task: str):
        """For one train-mode forward: the BNs of the branches other than `task` (and of the RLs feeding them)
        use batch statistics without tracking them ("batch"), or run in eval mode ("running")."""
        others = [m for u in self.tasks if u != task for m in (self.branches[u], self.reconcile.into[u])]
        bns = [m for other in others for m in other.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
        for m in bns:  # in train mode, track_running_stats=False is torch's "batch statistics, buffers untouched"
            m.track_running_stats, m.training = self.other_bn == "running", self.other_bn == "batch"
        try:
            yield
        finally:
            for m in bns:
                m.track_running_stats, m.training = True, True

    def forward(self, x: torch.Tensor, task: str) -> dict[str, torch.Tensor]:
        if task not in self.branches:
            raise KeyError(f"no branch {task!r}; branches are {self.tasks}")
        with self._others_keep_stats(task):  # their BN statistics stay their own task's (class doc)
            return self._run(x, {task})[task]

    def forward_all(self, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Every branch's features (the squeeze teacher; usually called under no_grad)."""
        out = self._run(x, set(self.tasks))
        return {t: out[t] for t in self.tasks}


class BranchWithRL(nn.Module):
    """Branch `task` of an ExpandedNet *with* its RL inputs: the network the expanded model trained as.

    Transferring an expanded model's branch alone drops what its RLs add from the
    other branches, so it measures a network that never existed in training.
    This wraps the whole ExpandedNet and returns branch `task`'s features as
    `ExpandedNet.forward` computes them (every other branch runs as far as an RL
    reads it). It looks like a Backbone to transfer.py (`arch`, `channels`, a
    dict of stage features); at zero-initialised RLs it equals the branch alone."""

    def __init__(self, net: ExpandedNet, task: str, arch: str):
        super().__init__()
        if task not in net.branches:
            raise ValueError(f"branch {task!r}: the expanded model's branches are {net.tasks}")
        self.net, self.task, self.arch, self.channels = net, task, arch, net.channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(x, self.task)


class _Plan:
    """Which branch runs which stage of one ExpandedNet forward, and with or without a graph.

    Pruning only, no arithmetic: the outputs are those of running every branch
    through every stage with a graph. Branches in `want` run every stage; the
    others run only up to the last reconciled stage (nothing reads them after
    it), and are reconciled only where a later stage reads them. With `detach`
    on, only the wanted branches build a graph: the others' activations are not
    kept and nothing backpropagates into them."""

    def __init__(self, net: ExpandedNet, want: set[str]):
        self.tasks, self.want, self.stages, self.detach = net.tasks, want, net.reconcile.stages, net.detach
        self.last = max(self.stages, default=0)
        self.grad_enabled = torch.is_grad_enabled()

    def running(self, l: int) -> list[str]:
        """The branches that compute stage l (and, for l = 1, the stem before it), in task order."""
        return [u for u in self.tasks if u in self.want or l <= self.last]

    def reconciles(self, t: str, l: int) -> bool:
        return l in self.stages and (t in self.want or l < self.last)

    def grad(self, u: str):
        return torch.set_grad_enabled(self.grad_enabled and (u in self.want or not self.detach))


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
    """What XLearnerModel and squeeze.SqueezedModel share: heads per task, the per-source loss loop, predict."""

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
        """The Backbone that `backbone_state_dict` exports (`branch`: which one, where there is a choice)."""
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
                                   mcfg.other_branches_bn)
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
# export and rebuild

def backbone_state_dict(model: nn.Module, branch: str | None = None) -> dict[str, torch.Tensor]:
    """A plain torchvision-format state_dict (no fc.*) of a model's backbone.

    SqueezedModel: the student. XLearnerModel: branch `branch` (default: the
    first task), or the shared backbone. A Backbone is exported as is.
    FrozenBatchNorm2d has no num_batches_tracked; we add it (0) so the keys are
    exactly those of torchvision.models.<arch>() minus fc.weight and fc.bias."""
    model = getattr(model, "module", model)  # DDP
    if isinstance(model, MultiSourceModel):
        backbone = model.exported_backbone(branch)
    elif isinstance(model, Backbone):
        backbone = model
    else:
        raise TypeError(f"backbone_state_dict: expected XLearnerModel, SqueezedModel or Backbone, "
                        f"got {type(model).__name__}")
    sd = backbone.state_dict()
    out = {}
    for k, v in sd.items():
        out[k] = v.detach().cpu().clone()
        if k.endswith(".running_var"):
            nbt = k[: -len("running_var")] + "num_batches_tracked"
            if nbt not in sd:
                out[nbt] = torch.tensor(0, dtype=torch.long)
    return out


def _strip_prefixes(sd: dict) -> dict:
    """Remove DDP's `module.` and torch.compile's `_orig_mod.` prefixes."""
    out = {}
    for k, v in sd.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def model_from_checkpoint(ckpt: dict) -> MultiSourceModel:
    """Rebuild the model of a run checkpoint {"model", "config", "meta"} and load its weights (eval mode).

    An expand checkpoint gives an XLearnerModel, a squeeze one a squeeze.SqueezedModel."""
    for key in ("model", "config", "meta"):
        if key not in ckpt:
            raise ValueError(f"not a run checkpoint: no {key!r} entry (keys: {sorted(ckpt)})")
    cfg = config_from_dict(ckpt["config"])
    meta = ckpt["meta"]
    # the weights come from the checkpoint: do not read (or download) `pretrained` again
    mcfg = dataclasses.replace(cfg.model, pretrained="")
    kind = meta.get("kind")
    if kind == "expanded":
        model = XLearnerModel(mcfg, cfg.sources, meta["num_classes"])
    elif kind == "squeezed":
        # imported here, not at the top: squeeze.py builds on this module (it imports model.py), so
        # model.py can only reach the student class once both modules are loaded
        from .squeeze import SqueezedModel

        stages = meta.get("distill_stages", cfg.squeeze.distill_stages)
        state = _strip_prefixes(ckpt["model"])  # adapters carry a bias when the teacher's features were standardised
        bias = any(k.startswith("adapters.") and k.endswith(".bias") for k in state)
        model = SqueezedModel(mcfg, cfg.sources, meta["num_classes"], stages, bias)
    else:
        raise ValueError(f"checkpoint meta.kind: expected 'expanded' or 'squeezed', got {kind!r}")
    model.load_state_dict(_strip_prefixes(ckpt["model"]))
    return model.eval()
