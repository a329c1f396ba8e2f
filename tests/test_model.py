"""Tests for xlearner/model.py: the branches, the RL variants, ExpandedNet and BranchWithRL (the RL sum, zero init,
stop-gradient, the other branches' BN statistics). CPU only, small inputs, no downloads."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from xlearner.config import ModelConfig, SourceConfig, SqueezeConfig
from xlearner.expand import XLearnerModel
from xlearner.model import ExpandedNet, HRNetReconcile, RECONCILE, ScalarReconcile
from xlearner.squeeze import SqueezedModel


TASKS = ["cls", "det", "seg"]
# small detection sizes: the torchvision defaults are meant for 800 px images
SMALL_DET = dict(fpn_channels=32, rpn_pre_nms_top_n=100, rpn_post_nms_top_n=50,
                 rpn_batch_size_per_image=32, box_batch_size_per_image=16, box_head_dim=64, seg_channels=16)
SOURCES = [SourceConfig(name="cls_a", task="cls", image_size=64),
           SourceConfig(name="cls_b", task="cls", image_size=64, multi_label=True, weight=0.5),
           SourceConfig(name="det_a", task="det", image_size=64),
           SourceConfig(name="seg_a", task="seg", image_size=64)]
NUM_CLASSES = {"cls_a": 5, "cls_b": 3, "det_a": 4, "seg_a": 6}


def make_model(reconcile="hrnet", detach=True, **kw) -> XLearnerModel:
    return XLearnerModel(ModelConfig(reconcile=reconcile, reconcile_detach=detach, **SMALL_DET, **kw),
                         SOURCES, NUM_CLASSES)


def make_batches(sources=("cls_a", "cls_b", "det_a", "seg_a"), seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {
        "cls_a": {"images": torch.randn(2, 3, 64, 64, generator=g), "labels": torch.tensor([1, 4])},
        "cls_b": {"images": torch.randn(2, 3, 64, 64, generator=g),
                  "labels": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])},
        "det_a": {"images": [torch.rand(3, 60, 64, generator=g), torch.rand(3, 64, 50, generator=g)],
                  "targets": [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
                              {"boxes": torch.tensor([[2.0, 3.0, 30.0, 33.0], [20.0, 10.0, 48.0, 60.0]]),
                               "labels": torch.tensor([2, 4])}]},
        "seg_a": {"images": torch.randn(2, 3, 64, 64, generator=g),
                  "masks": torch.randint(0, 6, (2, 64, 64), generator=g)},
    }
    return {k: out[k] for k in sources}


@pytest.mark.slow
def test_narrow_hrnet_paths_are_cheaper():
    from torch.utils.flop_counter import FlopCounterMode

    def macs(reconcile, width=1.0):
        net = ExpandedNet("resnet50", ["cls", "seg"], reconcile, (1, 2, 3), width=width).to("meta")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net.forward_all(torch.empty(1, 3, 224, 224, device="meta"))
        return counter.get_total_flops() / 2
    base = macs("none")
    full, thin = macs("hrnet") - base, macs("hrnet", 0.0625) - base
    assert 6.7e9 < full < 6.9e9  # every RL path of both branches: more than a whole ResNet-50 (4.1 G)
    assert thin < 0.12 * full    # measured: 0.7 vs 6.8 GMACs at 224 px
    # the narrow chain never convolves at the input's resolution: 3x3/2 straight from c_in to m,
    # and the paths into one target stage share a single widening 1x1 + zero-init BN
    into = ExpandedNet("resnet18", TASKS, "hrnet", (1, 2, 3), width=0.125).reconcile.into["cls"]["layer3"]
    assert sorted(into) == sorted(f"{u}_layer{k}" for u in ("det", "seg") for k in (1, 2, 3)) + ["widen"]
    convs = [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in into["det_layer1"] if isinstance(c, torch.nn.Conv2d)]
    assert convs == [(64, 32, (3, 3), (2, 2)), (32, 32, (3, 3), (2, 2))]
    assert [(c.in_channels, c.out_channels) for c in into["det_layer3"] if isinstance(c, torch.nn.Conv2d)] == [(256, 32)]
    assert (into["widen"][0].in_channels, into["widen"][0].out_channels) == (32, 256)
    assert into["widen"][1].weight.abs().sum() == 0 and into["widen"][1].bias.abs().sum() == 0


def grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------
# expanded backbone

@pytest.mark.parametrize("reconcile,width", [(r, 1.0) for r in sorted(RECONCILE)] + [("hrnet", 0.125)])
def test_zero_init_equals_independent_torchvision_backbones(reconcile, width):
    torch.manual_seed(0)
    net = ExpandedNet("resnet18", TASKS, reconcile, (1, 2, 3), width=width).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        everything = net.forward_all(x)
        for t in TASKS:
            ref = torchvision.models.resnet18(weights=None).eval()
            missing, unexpected = ref.load_state_dict(net.branches[t].state_dict(), strict=False)
            assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
            h = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
            mine = net(x, t)
            for l in range(1, 5):
                h = getattr(ref, f"layer{l}")(h)
                torch.testing.assert_close(mine[f"layer{l}"], h, atol=1e-6, rtol=0)
                torch.testing.assert_close(everything[t][f"layer{l}"], h, atol=1e-6, rtol=0)


@pytest.mark.parametrize("reconcile", ["hrnet", "scalar", "cross_stitch"])
def test_detach_keeps_other_branches_gradient_free(reconcile):
    torch.manual_seed(0)
    model = make_model(reconcile, detach=True)
    model.total_loss(model(make_batches(["cls_a"]))).backward()
    net = model.backbone
    assert grad_norm(net.branches["cls"]) > 0
    for t in ("det", "seg"):
        assert grad_norm(net.branches[t]) == 0
        assert grad_norm(net.reconcile.into[t]) == 0
    # every R feeding cls gets a gradient (at zero init, at least through its last BN / scalar / mix)
    feeding = net.reconcile.into["cls"]
    for name, sub in feeding.items():
        assert grad_norm(sub) > 0, name
    for p in feeding.parameters():
        assert p.grad is not None


@pytest.mark.parametrize("reconcile", ["hrnet", "scalar", "cross_stitch"])
def test_detach_off_lets_gradient_into_other_branches(reconcile):
    torch.manual_seed(0)
    model = make_model(reconcile, detach=False)
    with torch.no_grad():  # at zero init the RL blocks the gradient to its inputs: open it
        for p in model.backbone.reconcile.parameters():
            p.add_(0.1)
    model.total_loss(model(make_batches(["cls_a"]))).backward()
    for t in TASKS:
        assert grad_norm(model.backbone.branches[t]) > 0, t


@pytest.mark.parametrize("reconcile", ["hrnet", "scalar", "cross_stitch"])
def test_one_step_makes_the_rl_matter(reconcile):
    torch.manual_seed(0)
    model = make_model(reconcile)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.total_loss(model(make_batches(["cls_a", "det_a", "seg_a"]))).backward()
    opt.step()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for t in TASKS:
            with_rl = model.backbone(x, t)
            alone = model.backbone.branches[t](x)  # the same branch with no reconciliation
            diffs = [float((with_rl[k] - alone[k]).abs().max()) for k in alone]
            assert max(diffs) > 1e-4, (t, diffs)


def test_other_branches_stop_after_last_reconciled_stage():
    net = ExpandedNet("resnet18", TASKS, "hrnet", (1, 2)).eval()
    calls = []
    for t in TASKS:
        net.branches[t].layer4.register_forward_hook(lambda m, i, o, t=t: calls.append(t))
    with torch.no_grad():
        net(torch.randn(1, 3, 64, 64), "det")
    assert calls == ["det"]


# ----------------------------------------------------------------------------
# heads and the full model

def test_every_trainable_parameter_gets_a_gradient():
    """DDP with find_unused_parameters=False needs every parameter used in the one forward."""
    torch.manual_seed(0)
    model = make_model("hrnet")
    losses = model(make_batches())
    assert set(losses) == set(NUM_CLASSES)
    assert all(torch.isfinite(v) for v in losses.values())
    total = model.total_loss(losses)
    torch.testing.assert_close(total, sum(s.weight * losses[s.name] for s in SOURCES))
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


# ----------------------------------------------------------------------------
# backbones and export


# ----------------------------------------------------------------------------
# squeeze


def test_shared_branch_init_starts_every_branch_from_the_same_weights():
    torch.manual_seed(0)
    shared = make_model("hrnet", branch_init="shared")
    torch.manual_seed(0)
    independent = make_model("hrnet")
    sds = {t: shared.backbone.branches[t].state_dict() for t in TASKS}
    for k, v in sds["cls"].items():  # identical branches at step 0, buffers included
        for t in TASKS[1:]:
            assert torch.equal(v, sds[t][k]), (t, k)
    assert not torch.equal(independent.backbone.branches["cls"].conv1.weight,
                           independent.backbone.branches["det"].conv1.weight)
    # the same random draws as "independent": the first branch, every RL and every head are equal
    for (k, a), b in zip(independent.state_dict().items(), shared.state_dict().values()):
        if not k.startswith(("backbone.branches.det.", "backbone.branches.seg.")):
            assert torch.equal(a, b), k
    # the mean of identical branches is that branch, and it is allowed now
    student = SqueezedModel.from_expanded(shared, "mean", SqueezeConfig(distill_stages=[2, 3, 4]))
    for k, v in student.backbone.state_dict().items():
        assert torch.equal(v, sds["cls"][k]), k
    with pytest.raises(ValueError, match=r"model.branch_init: expected independent\|shared, got 'tied'"):
        make_model("hrnet", branch_init="tied")


@pytest.mark.parametrize("reconcile", ["hrnet", "scalar", "cross_stitch"])
def test_branch_with_rl_trains_only_what_gets_a_gradient(reconcile):
    """A fine-tuned BranchWithRL (transfer --with-rl, trainable backbone) under DDP needs every trainable parameter
    to get a gradient: the branch and the RLs into it are trainable, everything else is frozen."""
    from xlearner.model import BranchWithRL
    torch.manual_seed(0)
    net = make_model(reconcile).backbone
    with torch.no_grad():  # non-zero RLs, so that the paths carry gradient
        for m in net.reconcile.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(0.5)
    wrapped = BranchWithRL(net, "det", "resnet18")
    sum(f.sum() for f in wrapped(torch.randn(2, 3, 64, 64)).values()).backward()
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    got_grad = {n for n, p in wrapped.named_parameters() if p.grad is not None}
    assert trainable == got_grad
    assert all(n.startswith(("net.branches.det.", "net.reconcile.into.det.")) for n in trainable)
    assert any(n.startswith("net.reconcile.into.det.") for n in trainable)

# ----------------------------------------------------------------------------
# The RL variants by hand: rl(t, l, x) with non-zero paths against the sum written out from each path's

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

# ----------------------------------------------------------------------------
# Per-task BN statistics: a branch's running statistics come only from its own task's batches.

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
    with pytest.raises(ValueError, match=r"model.other_branches_bn: expected batch\|running, got 'eval'"):
        ExpandedNet("resnet18", TASKS, other_bn="eval")
