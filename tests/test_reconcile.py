"""The RL variants by hand: rl(t, l, x) with non-zero paths against the sum written out from each path's
own weights (conv2d and the eval-mode BN formula), and the stop-gradient with detach on and off.

At init every path ends in a zero BN (or a zero scalar), so rl(t, l, x) == x[t][l] tells nothing about the
sum; here every BN gets known non-zero gamma, beta and running statistics first.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xlearner.model import HRNetReconcile, ScalarReconcile

TASKS = ["cls", "det", "seg"]
CHANNELS = {"layer1": 4, "layer2": 6, "layer3": 8}
SIZES = {1: 16, 2: 8, 3: 4}  # each stage halves the resolution, as in a ResNet


def conv(m: torch.nn.Conv2d, y: torch.Tensor) -> torch.Tensor:
    assert m.bias is None
    return F.conv2d(y, m.weight, stride=m.stride, padding=m.padding)


def bn(m: torch.nn.BatchNorm2d, y: torch.Tensor) -> torch.Tensor:
    """Eval-mode BN: (y - running_mean) / sqrt(running_var + eps) * gamma + beta."""
    def v(t):
        return t.view(1, -1, 1, 1)
    return (y - v(m.running_mean)) / torch.sqrt(v(m.running_var) + m.eps) * v(m.weight) + v(m.bias)


def nonzero(rl: torch.nn.Module) -> torch.nn.Module:
    """Known non-zero values in every BN (gamma, beta, running stats) and every scalar; eval mode."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in rl.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            if hasattr(m, "alpha"):
                m.alpha.fill_(0.25 + torch.rand((), generator=g).item())
    return rl.eval()


def features(seed: int = 1) -> dict[str, dict[int, torch.Tensor]]:
    """x[u][k]: stage k of branch u, leaves that record their gradient."""
    g = torch.Generator().manual_seed(seed)
    return {u: {k: torch.randn(2, CHANNELS[f"layer{k}"], s, s, generator=g).requires_grad_()
                for k, s in SIZES.items()} for u in TASKS}


def hrnet_by_hand(rl: HRNetReconcile, t: str, l: int, x: dict) -> torch.Tensor:
    """x[t][l] + sum_{u != t} sum_{k <= l} R_{u,k->l}(x[u][k]), every layer of every path written out."""
    R = rl.into[t][f"layer{l}"]
    total = 0
    for u in (u for u in TASKS if u != t):
        for k in range(1, l + 1):
            p, y = R[f"{u}_layer{k}"], x[u][k]
            if k == l:       # 1x1 conv + BN
                total = total + bn(p[1], conv(p[0], y))
            elif not rl.narrow:  # (3x3/2 conv + BN + ReLU) x (l - k - 1), then 3x3/2 conv + BN
                for i in range(l - k - 1):
                    y = torch.relu(bn(p[3 * i + 1], conv(p[3 * i], y)))
                total = total + bn(p[-1], conv(p[-2], y))
            else:            # (3x3/2 conv + BN + ReLU) x (l - k), the ReLU after the last one too
                for i in range(l - k):
                    y = torch.relu(bn(p[3 * i + 1], conv(p[3 * i], y)))
                total = total + y
    if rl.narrow:  # one widening 1x1 conv + BN on the narrow sum
        total = bn(R["widen"][1], conv(R["widen"][0], total))
    return x[t][l] + total


@pytest.mark.parametrize("width", [1.0, 0.5])
@pytest.mark.parametrize("t,l", [("cls", 1), ("det", 3), ("seg", 3)])
def test_hrnet_rl_is_the_sum_of_its_paths(width, t, l):
    torch.manual_seed(0)
    rl = nonzero(HRNetReconcile(TASKS, CHANNELS, (1, 3), width=width))
    assert rl.narrow == (width < 1) and sorted(rl.into[t]) == ["layer1", "layer3"]
    x = features()
    with torch.no_grad():
        got, want = rl(t, l, x), hrnet_by_hand(rl, t, l, x)
    assert got.shape == x[t][l].shape
    assert (got - x[t][l]).abs().max() > 0.1  # the paths add something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("l", [1, 3])
def test_scalar_rl_is_alpha_times_a_1x1_conv_of_the_same_stage(l):
    torch.manual_seed(0)
    rl = nonzero(ScalarReconcile(TASKS, CHANNELS, (1, 3)))
    x = features()
    R = rl.into["det"][f"layer{l}"]
    with torch.no_grad():
        want = x["det"][l] + sum(R[u].alpha * conv(R[u].conv, x[u][l]) for u in ("cls", "seg"))
        got = rl("det", l, x)
    assert all(R[u].alpha.item() > 0.25 for u in ("cls", "seg"))
    assert (got - x["det"][l]).abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _grads(rl: torch.nn.Module, t: str, l: int) -> dict[tuple[str, int], float | None]:
    x = features()
    rl(t, l, x).square().sum().backward()
    return {(u, k): None if x[u][k].grad is None else x[u][k].grad.abs().sum().item() for u in TASKS for k in x[u]}


@pytest.mark.parametrize("variant", [HRNetReconcile, ScalarReconcile])
def test_detach_stops_the_gradient_into_other_branches_and_only_there(variant):
    t, l = "det", 3
    read = {("cls", 3), ("seg", 3)} if variant is ScalarReconcile else {(u, k) for u in ("cls", "seg") for k in (1, 2, 3)}
    torch.manual_seed(0)
    on = nonzero(variant(TASKS, CHANNELS, (1, 3), detach=True))
    grads = _grads(on, t, l)
    assert grads[(t, l)] > 0  # the target's own stage l gets its gradient
    assert all(grads[key] is None for key in grads if key != (t, l)), grads
    # the paths themselves still learn from branch t's loss
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in on.into[t]["layer3"].parameters())

    torch.manual_seed(0)
    off = nonzero(variant(TASKS, CHANNELS, (1, 3), detach=False))
    grads = _grads(off, t, l)
    assert all(grads[key] > 0 for key in read | {(t, l)}), grads   # every input the sum reads
    assert all(grads[key] is None for key in grads if key not in read | {(t, l)}), grads  # and nothing else
