"""The squeeze loss by hand: feature losses, KD, standardisation, "all" targets, the total, the dev split.

Every number here is worked out on paper (or from the definition, term by term) on a tiny expanded model,
so that the equation in squeeze.py's docstring is checked against the code, not against itself.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from xlearner.config import ModelConfig, SourceConfig, SqueezeConfig
from xlearner.squeeze import SqueezedModel
from xlearner.expand import XLearnerModel
from xlearner.probe import dataset_labels, open_split
from xlearner.squeeze import (Distiller, estimate_teacher_norm, feature_loss_cos_smoothl1, kd_loss, pixels,
                              teacher_features)

SMALL = dict(arch="resnet10", fpn_channels=16, rpn_pre_nms_top_n=50, rpn_post_nms_top_n=20,
             rpn_batch_size_per_image=16, box_batch_size_per_image=8, box_head_dim=32, seg_channels=8)
# a "/" in a source name is legal (only "." is not): the loss must not parse names
SOURCES = [SourceConfig(name="cls/a", task="cls", image_size=32), SourceConfig(name="cls-b", task="cls", image_size=32,
                                                                                weight=0.5),
           SourceConfig(name="det/a", task="det", image_size=32, weight=2.0),
           SourceConfig(name="seg-a", task="seg", image_size=32)]
NUM_CLASSES = {"cls/a": 5, "cls-b": 3, "det/a": 2, "seg-a": 4}
ALL = dict(distill_targets="all", distill_stages=[1, 2, 3, 4], distill_loss="cos_smoothl1")


def teacher() -> XLearnerModel:
    torch.manual_seed(0)
    return XLearnerModel(ModelConfig(**SMALL), SOURCES, NUM_CLASSES).eval()


def batches(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"cls/a": {"images": torch.randn(2, 3, 32, 32, generator=g), "labels": torch.tensor([1, 4])},
            "cls-b": {"images": torch.randn(2, 3, 32, 32, generator=g), "labels": torch.tensor([0, 2])},
            "det/a": {"images": [torch.rand(3, 32, 32, generator=g), torch.rand(3, 32, 28, generator=g)],
                      "targets": [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0]]), "labels": torch.tensor([1])},
                                  {"boxes": torch.tensor([[4.0, 4.0, 16.0, 30.0]]), "labels": torch.tensor([2])}]},
            "seg-a": {"images": torch.randn(2, 3, 32, 32, generator=g),
                      "masks": torch.randint(0, 4, (2, 32, 32), generator=g)}}


def test_cos_smoothl1_by_hand():
    # pixel 1: s = (1, 0), t = (0, 2): cos 0 -> 1; smooth L1 (beta 1) of |1| = 0.5, of |2| = 1.5
    # pixel 2: s = t = (3, 4): 0 and 0.  Means: cosine (1 + 0) / 2 = 0.5, smooth L1 (0.5 + 1.5 + 0 + 0) / 4 = 0.5
    s = torch.tensor([[1.0, 3.0], [0.0, 4.0]]).view(1, 2, 1, 2)
    t = torch.tensor([[0.0, 3.0], [2.0, 4.0]]).view(1, 2, 1, 2)
    assert feature_loss_cos_smoothl1(s, t).item() == pytest.approx(1.0)
    assert feature_loss_cos_smoothl1(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_loss_by_hand():
    # teacher (ln 3, 0) -> p = (3/4, 1/4); student (0, 0) -> q = (1/2, 1/2); KL(p || q) = sum p ln(p / q)
    s, t = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss(s, t, 1.0, False).item() == pytest.approx(kl)  # 0.130812
    # T = 2: p = softmax(ln 3 / 2, 0) = (sqrt 3, 1) / (sqrt 3 + 1), times T^2 = 4
    p = (math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1))
    assert kd_loss(s, t, 2.0, False).item() == pytest.approx(4 * sum(pi * math.log(2 * pi) for pi in p))
    # two rows: batchmean averages them; pixels() turns [B, K, H, W] into rows of K
    logits = torch.arange(12.0).view(1, 3, 2, 2)
    assert pixels(logits).tolist() == [[0.0, 4.0, 8.0], [1.0, 5.0, 9.0], [2.0, 6.0, 10.0], [3.0, 7.0, 11.0]]
    assert kd_loss(torch.cat([s, s]), torch.cat([t, s]), 1.0, False).item() == pytest.approx(kl / 2)


def test_all_targets_branch_t_is_zero_and_the_others_are_not():
    t = teacher()  # fresh: every RL ends in a zero-initialised BN, so branch b with its RL = branch b alone
    sq = SqueezeConfig(**ALL)
    student = SqueezedModel.from_expanded(t, "task:det", sq).eval()  # identity adapters, N = identity
    x = batches()["cls/a"]["images"]
    with torch.no_grad():
        losses = Distiller(student, t, SOURCES, sq).feat_losses(student.features(x), teacher_features(t, x, t.tasks))
    assert set(losses) == {"cls", "det", "seg"}
    assert losses["det"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["cls"].item() > 0.1 and losses["seg"].item() > 0.1
    own = Distiller(student, t, SOURCES, SqueezeConfig(distill_targets="own"))
    assert own.branches("det") == ["det"] and Distiller(student, t, SOURCES, sq).branches("det") == t.tasks


def test_standardisation_statistics_and_adapters():
    t = teacher()
    sq = SqueezeConfig(**ALL, teacher_norm="standardize")
    student = SqueezedModel.from_expanded(t, "task:cls", sq)
    distiller = Distiller(student, t, SOURCES, sq)
    batch = batches()
    estimate_teacher_norm(distiller, iter([batch, batch]), 2, torch.device("cpu"))
    # by the definition: every source's images through every teacher branch, per channel over (N, H, W)
    with torch.no_grad():
        feats = [teacher_features(t, t.heads[s.task].prepare(batch[s.name], s.name)[0], t.tasks) for s in SOURCES]
    for b in t.tasks:
        for k in ("layer1", "layer4"):
            x = torch.cat([f[b][k].double().transpose(0, 1).flatten(1) for f in feats], 1)
            norm = student.norms[b][k]
            torch.testing.assert_close(norm.mean, x.mean(1).float(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(norm.std, (x.var(1, unbiased=False) + 1e-4).sqrt().float(), atol=1e-5,
                                       rtol=1e-5)
            # N(x) = (x - mean) / std per channel, and the adapter restarts as N
            y = torch.randn(2, len(norm.mean), 3, 3)
            expect = (y - norm.mean.view(1, -1, 1, 1)) / norm.std.view(1, -1, 1, 1)
            torch.testing.assert_close(norm(y), expect)
            torch.testing.assert_close(student.adapters[b][k](y), expect, atol=1e-5, rtol=1e-4)


def test_total_loss_and_kd_of_every_head_by_hand():
    t = teacher()
    sq = SqueezeConfig(**ALL, heads="frozen", lambda_task=0.5, lambda_feat=2.0, lambda_kd=3.0, kd_temperature=2.0)
    student = SqueezedModel.from_expanded(t, "task:cls", sq)
    distiller = Distiller(student, t, SOURCES, sq).train()
    losses = distiller(batches())
    assert set(losses) == {"cls/a", "cls-b", "det/a", "seg-a"} and set(losses["det/a"]) == {"task", "feat", "kd"}
    w = {"cls/a": 1.0, "cls-b": 0.5, "det/a": 2.0, "seg-a": 1.0}
    hand = sum(w[s] * (0.5 * L["task"] + 2.0 * L["feat"] + 3.0 * L["kd"]) for s, L in losses.items())
    torch.testing.assert_close(distiller.total_loss(losses), hand)
    constant = {s: {"task": torch.tensor(1.0), "feat": torch.tensor(2.0), "kd": torch.tensor(4.0)} for s in w}
    assert distiller.total_loss(constant).item() == pytest.approx(4.5 * (0.5 + 4.0 + 12.0))
    # KD on a det image ("all"): the mean over both cls heads and the seg head, each by its definition
    out = student.forward_source(batches()["det/a"], "det/a")
    with torch.no_grad():
        tf = teacher_features(t, out.images, t.tasks)
    hs, ht = student.heads, t.heads
    terms = [kd_loss(hs["cls"].logits(out.feats, s), ht["cls"].logits(tf["cls"], s), 2.0, False) for s in ("cls/a", "cls-b")]
    terms.append(kd_loss(pixels(hs["seg"].predictors["seg-a"](hs["seg"].decoder(out.feats))),
                         pixels(ht["seg"].predictors["seg-a"](ht["seg"].decoder(tf["seg"]))), 2.0, False))
    kd = distiller.kd_losses(SOURCES[2], out, tf)
    assert len(kd) == 3
    torch.testing.assert_close(torch.stack(kd).mean(), torch.stack(terms).mean())
    # "own": KD only for a cls source's own logits; a det batch has none
    own = Distiller(student, t, SOURCES, SqueezeConfig(distill_targets="own"))
    assert own.kd_losses(SOURCES[2], out, tf) == []
    # frozen heads: the task and KD losses reach the backbone only
    distiller.total_loss(losses).backward()
    assert all(p.grad is None for p in student.heads.parameters())
    assert student.backbone.conv1.weight.grad.abs().sum() > 0


def test_heads_copy_frozen_fresh():
    t = teacher()
    copied = SqueezedModel.from_expanded(t, "task:cls", SqueezeConfig(heads="copy"))
    frozen = SqueezedModel.from_expanded(t, "task:cls", SqueezeConfig(heads="frozen"))
    fresh = SqueezedModel.from_expanded(t, "task:cls", SqueezeConfig(heads="fresh"))
    w = t.heads["cls"].predictors["cls/a"].weight
    assert torch.equal(copied.heads["cls"].predictors["cls/a"].weight, w)
    assert torch.equal(frozen.heads["cls"].predictors["cls/a"].weight, w)
    assert not torch.equal(fresh.heads["cls"].predictors["cls/a"].weight, w)
    assert all(p.requires_grad for p in copied.heads.parameters()) and all(
        p.requires_grad for p in fresh.heads.parameters())
    assert not any(p.requires_grad for p in frozen.heads.parameters())


def test_dev_split_is_carved_from_train_and_never_opens_val(demo_config):
    src = copy.deepcopy(next(d for d in demo_config.transfer.datasets if d.name == "novel-cls"))
    full = open_split(src, "train", train=False)
    src.dev_fraction, src.val = 0.25, "/nowhere/val"  # val is never read
    tr, dev = open_split(src, "train", train=False), open_split(src, "val", train=False)
    assert sorted(tr.indices + dev.indices) == list(range(len(full))) and not set(tr.indices) & set(dev.indices)
    labels, dev_labels = dataset_labels(full), dataset_labels(dev)
    for c in set(labels):  # class-stratified: a quarter of every class
        assert dev_labels.count(c) == max(1, round(0.25 * labels.count(c)))
    assert dev.indices == open_split(src, "val", train=False).indices  # fixed: the same for every seed and backbone
    det = copy.deepcopy(next(d for d in demo_config.transfer.datasets if d.task == "det"))
    n = len(open_split(det, "train", train=False))
    det.dev_fraction = 0.2
    d_tr, d_dev = open_split(det, "train", train=False), open_split(det, "val", train=False)
    assert len(d_dev) == round(0.2 * n) and len(d_tr) + len(d_dev) == n
