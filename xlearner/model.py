"""The expanded backbone: T task branches run stage by stage, linked by reconciliation layers (RL).

This is the heart of X-Learner's expansion stage (docs/DESIGN.md §1). There is
one backbone branch per task (cls, det, seg), all the same torchvision ResNet
(backbone.py), run stage by stage in lockstep by `ExpandedNet`. After each
stage l in `model.reconcile_stages`, the RL adds to branch t what the other
branches computed at the same or an earlier stage:

    x_t^l <- x_t^l + sum_{u != t} sum_{k <= l} R_{u,k->t,l}( sg(x_u^k) )

which is `Reconcile.forward` of each variant, one expression.

Zero init: the last BN of every path R starts at gamma = beta = 0 (and the
scalar / cross-stitch variants start at alpha = 0 / identity), so at
initialisation the expanded model is exactly T independent single-task
backbones; training decides how much each task borrows from the others.

Stop-gradient: sg (`model.reconcile_detach`) means a branch's weights are moved
only by its own task's losses, limiting task interference, while the RL still
enriches that branch's representation.

Variants (`model.reconcile`, the RECONCILE registry):
    hrnet         every k <= l of every other branch, resampled by an HRNet
                  fuse path (`hrnet_path`); `reconcile_width` < 1 is the cheap
                  form (`narrow_path` + one shared widening per target)
    scalar        same-stage only, alpha * conv1x1, alpha init 0
    cross_stitch  Misra et al. 2016: channel-wise mix of the same-stage
                  features, init identity
    none          independent backbones (the ablation baseline)

`BranchWithRL` is one branch with its RL inputs, the network a branch trained
as (transfer.py's `--with-rl`); expand.XLearnerModel puts task heads on top.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .backbone import backbone_from_state_dict, read_state_dict
from .config import BRANCH_INITS, OTHER_BNS, RECONCILES, Registry, one_of

# Every variant is a module with `.stages` (the stages it acts on) and `.into`
# (a ModuleDict: target task -> the modules that feed that task), called as
#     rl(t, l, x) -> the new x_t^l
# where x[u][k] = x_u^k, the stage-k output of branch u before its own stage-k RL,
# for every branch u and every k <= l. The variant applies sg itself.

def _zero_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    # gamma = beta = 0: the path outputs exactly 0 at init, so the expanded model
    # starts as T independent backbones (each its own single-task expert)
    nn.init.zeros_(bn.weight)
    nn.init.zeros_(bn.bias)
    return bn


def hrnet_path(c_in: int, c_out: int, k: int, l: int) -> nn.Sequential:
    """R_{k->l}, k <= l, as HRNet's fuse layer: same stage 1x1+BN; an earlier stage a 3x3 stride-2 chain.

    (HRNet also fuses lower-resolution inputs, k > l, by upsampling; the
    expanded backbone only looks back, so there is no such path here.)"""
    if k == l:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), _zero_bn(nn.BatchNorm2d(c_out)))
    layers = []
    for i in range(l - k):  # each 3x3 stride-2 conv halves the resolution; ReLU between, not after the last
        last = i == l - k - 1
        layers += [nn.Conv2d(c_in, c_out if last else c_in, 3, stride=2, padding=1, bias=False),
                   _zero_bn(nn.BatchNorm2d(c_out)) if last else nn.BatchNorm2d(c_in)]
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def narrow_path(c_in: int, m: int, k: int, l: int) -> nn.Sequential:
    """The narrow form of R_{k->l} up to its last layer: branch u's stage k to m channels at stage l's resolution.

    A same-stage input: 1x1 conv + BN. A higher-resolution input: the 3x3
    stride-2 chain, straight from c_in to m channels, so no conv runs at the
    input's resolution. The last 1x1 m -> C_out + zero-init BN is shared by
    all the paths into one target (`HRNetReconcile`)."""
    if k == l:
        return nn.Sequential(nn.Conv2d(c_in, m, 1, bias=False), nn.BatchNorm2d(m))
    layers, c = [], c_in
    for _ in range(l - k):  # each 3x3 stride-2 conv halves the resolution
        layers += [nn.Conv2d(c, m, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(m), nn.ReLU(inplace=True)]
        c = m
    return nn.Sequential(*layers)


class Reconcile(nn.Module):
    """Base class: no stages, nothing added (this is also the `none` variant)."""

    def __init__(self, tasks: list[str], channels: dict[str, int], stages, width: float = 1.0, detach: bool = True):
        super().__init__()
        self.tasks, self.detach = list(tasks), detach
        self.stages = tuple(sorted(set(stages))) if len(tasks) > 1 else ()  # one task: nothing to reconcile
        self.into = nn.ModuleDict({t: nn.ModuleDict() for t in tasks})

    def sg(self, x: torch.Tensor) -> torch.Tensor:
        """stopgrad; detach off is the ablation where every task's loss moves every branch."""
        return x.detach() if self.detach else x

    def others(self, t: str) -> list[str]:
        return [u for u in self.tasks if u != t]

    def forward(self, t: str, l: int, x: dict) -> torch.Tensor:
        return x[t][l]


class NoReconcile(Reconcile):
    """`none`: independent task-specific backbones (the ablation baseline)."""

    def __init__(self, tasks, channels, stages, width=1.0, detach=True):
        super().__init__(tasks, channels, (), detach=detach)


class HRNetReconcile(Reconcile):
    """`hrnet`: every earlier-or-same stage of every other branch, resampled to stage l and summed.

    width = 1 (HRNet's fuse layer): each path R_{u,k->t,l} is its own module
    ending in a zero-init BN, and the outputs are summed. width < 1 (the cheap
    form, `model.reconcile_width`): each path runs at m = width * C_l channels,
    the narrow outputs are summed, and one 1x1 m -> C_l + zero-init BN per
    target stage (`widen`) brings the sum to branch t's width. On resnet50
    (cls + seg, 224 px) width 1/16 cuts the RL forward from 6.8 to 0.7 GMACs
    (tests/test_model.py); docs/RESULTS.md, "The demo, benches and the first GPU check", has the step times.
    """

    def __init__(self, tasks, channels, stages, width=1.0, detach=True):
        super().__init__(tasks, channels, stages, detach=detach)
        self.narrow = width < 1.0
        path = narrow_path if self.narrow else hrnet_path
        for t in tasks:
            for l in self.stages:
                c_out = channels[f"layer{l}"]
                m = max(8, int(round(c_out * width))) if self.narrow else c_out  # each path's output width
                paths = {f"{u}_layer{k}": path(channels[f"layer{k}"], m, k, l)
                         for u in tasks if u != t for k in range(1, l + 1)}
                # narrow: one widening conv + BN on the sum, not one per path (half the full-resolution work)
                paths["widen"] = (nn.Sequential(nn.Conv2d(m, c_out, 1, bias=False), _zero_bn(nn.BatchNorm2d(c_out)))
                                  if self.narrow else nn.Identity())
                self.into[t][f"layer{l}"] = nn.ModuleDict(paths)

    def forward(self, t, l, x):
        R = self.into[t][f"layer{l}"]
        return x[t][l] + R["widen"](sum(R[f"{u}_layer{k}"](self.sg(x[u][k])) for u in self.others(t) for k in range(1, l + 1)))


class ScalarPath(nn.Module):
    """alpha * conv1x1(x), alpha a learnable scalar that starts at 0 (zero output at init)."""

    no_weight_decay = ("alpha",)  # a mixing coefficient, not a weight: engine.build_optimizer skips it

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1, bias=False)
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.alpha * self.conv(x)


class ScalarReconcile(Reconcile):
    """`scalar`: same-stage features only, each through a 1x1 conv times a scalar (init 0)."""

    def __init__(self, tasks, channels, stages, width=1.0, detach=True):
        super().__init__(tasks, channels, stages, detach=detach)
        for t in tasks:
            for l in self.stages:
                self.into[t][f"layer{l}"] = nn.ModuleDict(
                    {u: ScalarPath(channels[f"layer{l}"]) for u in tasks if u != t})

    def forward(self, t, l, x):
        R = self.into[t][f"layer{l}"]
        return x[t][l] + sum(R[u](self.sg(x[u][l])) for u in self.others(t))


class CrossStitchUnit(nn.Module):
    """Channel-wise linear mix of the T same-stage features into branch `target`.

    weight[i, c] is the coefficient of task i's channel c; it starts as the
    identity (own row 1, others 0), so at init the branch sees only itself.
    Needs equal channels across branches, which holds: they share the arch."""

    # Mixing coefficients get no weight decay (engine.build_optimizer): decay would pull the
    # identity coefficient towards 0, i.e. pull each branch away from its own features.
    no_weight_decay = ("weight",)

    def __init__(self, tasks: list[str], target: str, c: int):
        super().__init__()
        self.tasks = list(tasks)
        weight = torch.zeros(len(tasks), c)
        weight[self.tasks.index(target)] = 1.0
        self.weight = nn.Parameter(weight)

    def forward(self, xs: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weight[i].view(1, -1, 1, 1) * xs[u] for i, u in enumerate(self.tasks))


class CrossStitchReconcile(Reconcile):
    """`cross_stitch` (Misra et al. 2016): x_t^l <- sum_u a_{t,u} * x_u^l, channel-wise, init identity."""

    def __init__(self, tasks, channels, stages, width=1.0, detach=True):
        super().__init__(tasks, channels, stages, detach=detach)
        for t in tasks:
            for l in self.stages:
                self.into[t][f"layer{l}"] = CrossStitchUnit(tasks, t, channels[f"layer{l}"])

    def forward(self, t, l, x):
        return self.into[t][f"layer{l}"]({u: x[u][l] if u == t else self.sg(x[u][l]) for u in self.tasks})


RECONCILE = Registry("model.reconcile", RECONCILES, hrnet=HRNetReconcile, scalar=ScalarReconcile,
                     cross_stitch=CrossStitchReconcile, none=NoReconcile)


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
    time. The demo measured both (docs/RESULTS.md, "Per-task BN statistics"):
    "running" gave the better teacher, "batch" the better squeezed student."""

    def __init__(self, arch: str, tasks: list[str], reconcile: str = "hrnet", stages=(1, 2, 3),
                 detach: bool = True, pretrained: str = "", frozen_bn: bool = False, width: float = 1.0,
                 other_bn: str = "batch", branch_init: str = "independent"):
        super().__init__()
        one_of(reconcile, "model.reconcile", RECONCILE)
        one_of(other_bn, "model.other_branches_bn", OTHER_BNS)
        one_of(branch_init, "model.branch_init", BRANCH_INITS)
        bad = [l for l in stages if l not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"model.reconcile_stages: stages are 1..4 (layer1..layer4), got {bad}")
        self.tasks, self.detach, self.other_bn = list(tasks), detach, other_bn
        sd = read_state_dict(pretrained)  # read (or download) once for all branches
        self.branches = nn.ModuleDict({t: backbone_from_state_dict(arch, sd, frozen_bn, pretrained) for t in tasks})
        if branch_init == "shared":  # one starting point for every branch (model soups: only then is a mean meaningful);
            # every branch is still drawn above, so the RLs and heads draw the same numbers as with "independent"
            for t in self.tasks[1:]:
                self.branches[t].load_state_dict(self.branches[self.tasks[0]].state_dict())
        self.channels = self.branches[self.tasks[0]].channels
        self.reconcile = RECONCILE[reconcile](self.tasks, self.channels, stages, width, detach)

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
            new = {}  # every target's RL reads the others' stage-l outputs from before their own RL
            for t in plan.running(l):
                if plan.reconciles(t, l):
                    with plan.grad(t):
                        new[t] = self.reconcile(t, l, feats)  # x_t^l + sum_{u != t, k <= l} R(sg(x_u^k))
            for u in plan.running(l):
                feats[u][l] = h[u] = new.get(u, feats[u][l])
        return {u: {f"layer{l}": feats[u][l] for l in range(1, 5)} for u in want}

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
        if net.detach:  # what receives no gradient trains nothing: frozen, so that a fine-tuned BranchWithRL
            # under DDP (find_unused_parameters=False) has no parameter that waits for a gradient
            own = {id(p) for m in (net.branches[task], net.reconcile.into[task]) for p in m.parameters()}
            for p in net.parameters():
                if id(p) not in own:
                    p.requires_grad_(False)

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
