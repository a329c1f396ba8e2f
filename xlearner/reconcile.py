"""Reconciliation layers (RL): how the expanded backbone's task branches share features.

This is the heart of X-Learner's expansion stage (docs/DESIGN.md §1; see model.py
for the overall structure). There is one backbone branch per task, all the
same ResNet arch, run stage by stage in lockstep by `model.ExpandedNet`.
After each stage l in `model.reconcile_stages`, the RL adds to branch t what
the other branches computed at the same or an earlier stage:

    x_t^l <- x_t^l + sum_{u != t, k <= l} R_{u,k->t,l}( stopgrad(x_u^k) )

Zero init: the last BN of every path R starts at gamma = beta = 0 (and the
scalar / cross-stitch variants start at alpha = 0 / identity), so at
initialisation the expanded model is exactly T independent single-task
backbones; training decides how much each task borrows from the others.

Detach: the inputs x_u^k arrive already stop-gradiented (`model.detach`), so
a branch's weights are moved only by its own task's losses, limiting task
interference, while the RL still enriches that branch's representation.

Variants (`model.reconcile`, the RECONCILE registry):
    hrnet         every k <= l of every other branch, resampled by an HRNet
                  fuse path (`hrnet_path`); `reconcile_width` < 1 is the cheap
                  form (`narrow_path` + one shared widening per target)
    scalar        same-stage only, alpha * conv1x1, alpha init 0
    cross_stitch  Misra et al. 2016: channel-wise mix of the same-stage
                  features, init identity
    none          independent backbones (the ablation baseline)
"""
from __future__ import annotations

import torch
import torch.nn as nn

# Every variant is a module with `.stages` (the stages it acts on) and `.into`
# (a ModuleDict: target task -> the modules that feed that task), called as
#     rl(target, l, own, inputs) -> new x_t^l
# where own = x_t^l and inputs[u][k] = x_u^k (already stop-gradiented) for
# every other task u and k <= l.

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

    def __init__(self, tasks: list[str], channels: dict[str, int], stages, width: float = 1.0):
        super().__init__()
        self.tasks = list(tasks)
        self.stages = tuple(sorted(set(stages))) if len(tasks) > 1 else ()  # one task: nothing to reconcile
        self.into = nn.ModuleDict({t: nn.ModuleDict() for t in tasks})

    def forward(self, target: str, l: int, own: torch.Tensor, inputs: dict) -> torch.Tensor:
        return own


class NoReconcile(Reconcile):
    """`none`: independent task-specific backbones (the ablation baseline)."""

    def __init__(self, tasks, channels, stages, width=1.0):
        super().__init__(tasks, channels, ())


class HRNetReconcile(Reconcile):
    """`hrnet`: every earlier-or-same stage of every other branch, resampled to stage l and summed.

    width = 1 (HRNet's fuse layer): each path R_{u,k->t,l} is its own module
    ending in a zero-init BN, and the outputs are summed. width < 1 (the cheap
    form, `model.reconcile_width`): each path runs at m = width * C_l channels,
    the narrow outputs are summed, and one 1x1 m -> C_l + zero-init BN per
    target stage (`widen`) brings the sum to branch t's width. On resnet50
    (cls + seg, 224 px) width 1/16 cuts the RL forward from 6.8 to 0.7 GMACs
    (tests/test_model.py); README "Measured numbers" has the step times.
    """

    def __init__(self, tasks, channels, stages, width=1.0):
        super().__init__(tasks, channels, stages)
        self.narrow = width < 1.0
        path = narrow_path if self.narrow else hrnet_path
        for t in tasks:
            for l in self.stages:
                c_out = channels[f"layer{l}"]
                m = max(8, int(round(c_out * width))) if self.narrow else c_out  # each path's output width
                paths = {f"{u}_layer{k}": path(channels[f"layer{k}"], m, k, l)
                         for u in tasks if u != t for k in range(1, l + 1)}
                if self.narrow:
                    paths["widen"] = nn.Sequential(nn.Conv2d(m, c_out, 1, bias=False), _zero_bn(nn.BatchNorm2d(c_out)))
                self.into[t][f"layer{l}"] = nn.ModuleDict(paths)

    def forward(self, target, l, own, inputs):
        paths = self.into[target][f"layer{l}"]
        total = sum(paths[f"{u}_layer{k}"](inputs[u][k]) for u in inputs for k in range(1, l + 1))
        # narrow: one widening conv + BN on the sum, not one per path (half the full-resolution work)
        return own + (paths["widen"](total) if self.narrow else total)


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

    def __init__(self, tasks, channels, stages, width=1.0):
        super().__init__(tasks, channels, stages)
        for t in tasks:
            for l in self.stages:
                self.into[t][f"layer{l}"] = nn.ModuleDict(
                    {u: ScalarPath(channels[f"layer{l}"]) for u in tasks if u != t})

    def forward(self, target, l, own, inputs):
        paths = self.into[target][f"layer{l}"]
        return own + sum(paths[u](inputs[u][l]) for u in inputs)


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

    def __init__(self, tasks, channels, stages, width=1.0):
        super().__init__(tasks, channels, stages)
        for t in tasks:
            for l in self.stages:
                self.into[t][f"layer{l}"] = CrossStitchUnit(tasks, t, channels[f"layer{l}"])

    def forward(self, target, l, own, inputs):
        return self.into[target][f"layer{l}"]({target: own, **{u: inputs[u][l] for u in inputs}})


RECONCILE = {"hrnet": HRNetReconcile, "scalar": ScalarReconcile,
             "cross_stitch": CrossStitchReconcile, "none": NoReconcile}
