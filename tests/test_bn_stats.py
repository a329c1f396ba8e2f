"""Per-task BN statistics: a branch's running statistics come only from its own task's batches.

In the expanded model every batch runs through the other branches too (they
feed the reconciliation layers). Those branches, and the RLs that feed them,
must leave their BN buffers (running mean / var and num_batches_tracked)
exactly as they were; the target branch updates its own as usual.
"""
from __future__ import annotations

import pytest
import torch

from xlearner.model import ExpandedNet

TASKS = ["cls", "det", "seg"]


def buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.named_buffers()}


@pytest.mark.parametrize("reconcile,width,other_bn", [("hrnet", 1.0, "batch"), ("hrnet", 0.125, "batch"),
                                                      ("hrnet", 0.125, "running"), ("scalar", 1.0, "batch")])
def test_a_cls_batch_leaves_the_other_branches_statistics_alone(reconcile, width, other_bn):
    torch.manual_seed(0)
    net = ExpandedNet("resnet18", TASKS, reconcile, (1, 2, 3), width=width, other_bn=other_bn).train()
    parts = {f"{kind} {t}": m for t in TASKS
             for kind, m in (("branch", net.branches[t]), ("RL into", net.reconcile.into[t]))}
    before = {name: buffers(m) for name, m in parts.items()}
    assert len(before["branch det"]) == 60  # 20 BNs x (mean, var, num_batches_tracked)
    net(torch.randn(2, 3, 32, 32) * 3 + 1, "cls")
    for name, m in parts.items():
        after = buffers(m)
        changed = [k for k in after if not torch.equal(after[k], before[name][k])]
        if name.endswith("cls"):  # the target branch and its RLs learn their statistics from this batch
            assert len(changed) == len(after), (name, sorted(set(after) - set(changed)))
        else:
            assert changed == [], name
    # the other branches' BN modes were changed for this forward only
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.training and m.track_running_stats for m in bns)


def test_batch_and_running_statistics_feed_the_rl_differently():
    """The two `other_bn` modes differ only in how det/seg normalise a cls batch (as RL inputs)."""
    out = {}
    for other_bn in ("batch", "running"):
        torch.manual_seed(0)
        net = ExpandedNet("resnet18", TASKS, "hrnet", (1, 2, 3), width=0.125, other_bn=other_bn).train()
        with torch.no_grad():  # at zero init the RLs output 0 whatever their inputs: open them
            for p in net.reconcile.parameters():
                p.add_(0.1)
        torch.manual_seed(1)
        out[other_bn] = net(torch.randn(2, 3, 32, 32) * 3 + 1, "cls")["layer4"]
    assert not torch.allclose(out["batch"], out["running"])
    with pytest.raises(ValueError, match="model.other_branches_bn: expected 'batch' or 'running', got 'eval'"):
        ExpandedNet("resnet18", TASKS, other_bn="eval")
