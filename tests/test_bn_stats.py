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


@pytest.mark.parametrize("reconcile,width", [("hrnet", 1.0), ("hrnet", 0.125), ("scalar", 1.0)])
def test_a_cls_batch_leaves_the_other_branches_statistics_alone(reconcile, width):
    torch.manual_seed(0)
    net = ExpandedNet("resnet18", TASKS, reconcile, (1, 2, 3), width=width).train()
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
    # the other branches ran in eval mode for this forward only
    assert all(m.training for m in net.modules())
