"""Tests for xlearner/model.py and xlearner/heads.py. CPU only, small inputs, no downloads."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torchvision
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from xlearner.backbone import Backbone, build_backbone
from xlearner.config import Config, ConfigError, ModelConfig, SourceConfig, SqueezeConfig
from xlearner.heads import DetHead, SegHead
from xlearner.squeeze import SqueezedModel
from xlearner.expand import XLearnerModel
from xlearner.model import RECONCILE, ExpandedNet
from xlearner.backbone import backbone_state_dict
from xlearner.weights import model_from_checkpoint

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


def test_shared_backbone_and_predict_shapes():
    torch.manual_seed(0)
    model = make_model(shared_backbone=True, channels_last=True)
    assert isinstance(model.backbone, Backbone)
    model.total_loss(model(make_batches())).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    b = make_batches()
    assert model.predict(b["cls_a"]["images"], "cls_a").shape == (2, 5)
    assert model.predict(b["seg_a"]["images"], "seg_a").shape == (2, 6, 64, 64)
    dets = model.predict(b["det_a"]["images"], "det_a")
    assert len(dets) == 2 and set(dets[0]) == {"boxes", "scores", "labels"}
    report = model.report().splitlines()
    assert report[0] == "XLearnerModel: one shared resnet18 for tasks ['cls', 'det', 'seg'] (hard sharing)"
    assert report[1] == f"  backbone: {sum(p.numel() for p in model.backbone.parameters()) / 1e6:.2f}M params"


def test_report_mentions_branches_rls_heads_and_macs():
    text = make_model("hrnet").report()
    for word in ("branch cls", "RL into det", "head seg", "MACs"):
        assert word in text, word


def test_seg_logits_at_input_size_and_ignore_index():
    torch.manual_seed(0)
    src = SourceConfig(name="s", task="seg", image_size=40, ignore_index=255)
    backbone = build_backbone("resnet18")
    for kind in ("fpn", "deeplab"):
        head = SegHead(ModelConfig(**{**SMALL_DET, "seg_head": kind}), [src], {"s": 4}, backbone.channels).eval()
        images = torch.randn(2, 3, 40, 52)  # not a multiple of 32
        masks = torch.randint(0, 4, (2, 40, 52))
        masks[:, :10] = 255
        x, ctx = head.prepare({"images": images, "masks": masks}, "s")
        feats = backbone(x)
        assert head.predict(feats, ctx, "s").shape == (2, 4, 40, 52)
        loss, _ = head.loss(feats, ctx, "s")
        # changing the labels of ignored pixels, or the logits there, does not change the loss
        logits = head.logits(feats, ctx, "s")
        ref = torch.nn.functional.cross_entropy(logits, masks, ignore_index=255)
        torch.testing.assert_close(loss, ref)
        logits2 = logits.clone()
        logits2[:, :, :10] = torch.randn_like(logits2[:, :, :10]) * 10
        ref2 = torch.nn.functional.cross_entropy(logits2, masks, ignore_index=255)
        torch.testing.assert_close(ref, ref2)
        masks2 = masks.clone()
        masks2[:, :10] = 255  # already ignored: same
        loss2, _ = head.loss(feats, {**ctx, "masks": masks2}, "s")
        torch.testing.assert_close(loss, loss2)
        # all ignored: 0, not nan, and still differentiable (DDP sees the parameters used)
        head.train()
        loss3, _ = head.loss(backbone(x), {**ctx, "masks": torch.full_like(masks, 255)}, "s")
        assert loss3.detach().item() == 0.0 and loss3.requires_grad
        loss3.backward()
        assert all(p.grad is not None for p in head.parameters())


def _det_head_from_torchvision(tv, mcfg, src_name):
    """Our Backbone + DetHead carrying the weights of a torchvision Faster R-CNN."""
    sd = tv.state_dict()
    backbone = build_backbone("resnet50")
    backbone.load_state_dict({k[len("backbone.body."):]: v for k, v in sd.items()
                              if k.startswith("backbone.body.")})
    src = SourceConfig(name=src_name, task="det", image_size=tv.transform.min_size[0])
    head = DetHead(mcfg, [src], {src_name: 90}, backbone.channels)
    mapped = {}
    for k, v in sd.items():
        if k.startswith("backbone.fpn."):
            mapped["fpn." + k[len("backbone.fpn."):]] = v
        elif k.startswith("rpn.") or k.startswith("roi_heads.box_head."):
            mapped[k] = v
        elif k.startswith("roi_heads.box_predictor."):
            mapped[f"predictors.{src_name}." + k[len("roi_heads.box_predictor."):]] = v
    head.load_state_dict(mapped)  # strict: every one of our parameters comes from torchvision
    return backbone, head


def test_det_head_equals_torchvision_faster_rcnn():
    torch.manual_seed(0)
    size = 128  # torchvision's ratio max_size = size * 1333 / 800; 800 px would be slow on CPU
    # torchvision's sizes, except fewer proposals and RoIs (the box head dominates the CPU time)
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=size,
                                 max_size=int(size * 1333 / 800), box_score_thresh=0.0,
                                 rpn_pre_nms_top_n_train=600, rpn_pre_nms_top_n_test=300,
                                 rpn_post_nms_top_n_train=300, rpn_post_nms_top_n_test=150,
                                 box_batch_size_per_image=128)
    mcfg = ModelConfig(arch="resnet50", rpn_pre_nms_top_n=600, rpn_post_nms_top_n=300, box_batch_size_per_image=128)
    backbone, head = _det_head_from_torchvision(tv, mcfg, "coco")
    head.roi_heads.score_thresh = 0.0  # random weights: every score is ~1/91, below the 0.05 default
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 120, 150, generator=g), torch.rand(3, 140, 100, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 80.0, 90.0]]), "labels": torch.tensor([3])},
               {"boxes": torch.tensor([[5.0, 5.0, 60.0, 50.0], [30.0, 40.0, 95.0, 130.0]]),
                "labels": torch.tensor([1, 7])}]
    batch = {"images": images, "targets": targets}

    tv.eval(), backbone.eval(), head.eval()
    with torch.no_grad():
        expected = tv(images)
        x, ctx = head.prepare({"images": images}, "coco")
        got = head.predict(backbone(x), ctx, "coco")
    for e, o in zip(expected, got):
        assert len(o["boxes"]) > 0
        torch.testing.assert_close(o["boxes"], e["boxes"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(o["scores"], e["scores"], atol=1e-5, rtol=1e-4)
        assert torch.equal(o["labels"], e["labels"])

    tv.train(), backbone.train(), head.train()
    torch.manual_seed(123)
    expected = tv(images, copy.deepcopy(targets))
    torch.manual_seed(123)
    x, ctx = head.prepare(batch, "coco")
    got = head.loss_dict(backbone(x), ctx, "coco")
    assert list(got) == list(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=1e-4)
    assert targets[0]["boxes"].tolist() == [[10.0, 12.0, 80.0, 90.0]]  # the batch is not modified


# ----------------------------------------------------------------------------
# backbones and export

def test_build_backbone_pretrained_file_and_errors(tmp_path):
    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(tv.state_dict(), path)
    bb = build_backbone("resnet18", str(path), frozen_bn=True)
    assert isinstance(bb.bn1, torchvision.ops.FrozenBatchNorm2d)
    torch.testing.assert_close(bb.layer2[0].bn1.running_var, tv.layer2[0].bn1.running_var)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ValueError, match="r34.pth"):
        build_backbone("resnet18", str(tmp_path / "r34.pth"))
    with pytest.raises(ValueError, match="not a file"):
        build_backbone("resnet18", str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="not a torchvision weights name"):
        build_backbone("resnet18", "ResNet18_Weights.NO_SUCH_WEIGHTS")  # fails before any download
    with pytest.raises(ValueError, match="unknown"):
        build_backbone("vgg16")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("frozen_bn", [False, True])
def test_export_round_trip(arch, frozen_bn):
    torch.manual_seed(0)
    bb = build_backbone(arch, frozen_bn=frozen_bn)
    with torch.no_grad():  # non-trivial BN statistics, so that a lost buffer would show
        for m in bb.modules():
            if hasattr(m, "running_mean"):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    sd = backbone_state_dict(bb)
    ref = getattr(torchvision.models, arch)(weights=None)
    result = ref.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    bb.eval(), ref.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = bb(x)
        ref_l4 = torch.nn.Sequential(*list(ref.children())[:-2])(x)
    for k, v in bb.state_dict().items():  # the export is exact ...
        assert torch.equal(sd[k], v), k
    # ... FrozenBatchNorm2d folds the statistics into one scale and shift, so it rounds differently
    atol = 1e-5 * float(ref_l4.abs().max()) if frozen_bn else 1e-6
    torch.testing.assert_close(feats["layer4"], ref_l4, atol=atol, rtol=0)


def test_export_branches_of_expanded_model():
    model = make_model()
    with pytest.raises(ValueError, match="branch"):
        backbone_state_dict(model, "nope")
    sd = backbone_state_dict(model, "det")
    for k, v in model.backbone.branches["det"].state_dict().items():
        assert torch.equal(sd[k], v)
    first = backbone_state_dict(model)
    assert torch.equal(first["conv1.weight"], model.backbone.branches["cls"].conv1.weight)


# ----------------------------------------------------------------------------
# squeeze

def test_squeezed_model_mean_init_and_api():
    torch.manual_seed(0)
    teacher = make_model("hrnet")
    with torch.no_grad():  # make the branches (weights and BN statistics) differ
        for t in TASKS:
            for name, b in teacher.backbone.branches[t].named_buffers():
                if b.is_floating_point():
                    b.uniform_(0.5, 1.5)
            teacher.backbone.branches[t].layer1[0].bn1.num_batches_tracked.fill_(TASKS.index(t) + 3)
    teacher.mcfg = dataclasses.replace(teacher.mcfg, pretrained="weights.pth")  # branches from the same start
    student = SqueezedModel.from_expanded(teacher, "mean", SqueezeConfig(distill_stages=[2, 3, 4]))
    sds = [teacher.backbone.branches[t].state_dict() for t in TASKS]
    for k, v in student.backbone.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sum(sd[k] for sd in sds) / 3)
    assert int(student.backbone.layer1[0].bn1.num_batches_tracked) == 5
    # heads are copies, not shared
    for (k, a), b in zip(teacher.heads.state_dict().items(), student.heads.state_dict().values()):
        assert torch.equal(a, b), k
    assert student.heads["cls"].predictors["cls_a"].weight is not teacher.heads["cls"].predictors["cls_a"].weight
    # adapters: identity at init
    x = torch.randn(2, 3, 64, 64)
    feats = student.features(x, "cls")
    adapted = {k: a(feats[k]) for k, a in student.adapters["det"].items()}
    assert set(adapted) == {"layer2", "layer3", "layer4"}
    torch.testing.assert_close(adapted["layer3"], feats["layer3"])
    losses = student(make_batches())
    assert set(losses) == set(NUM_CLASSES)
    student.total_loss(losses).backward()


def test_squeezed_model_task_init_scratch_and_path(tmp_path):
    torch.manual_seed(0)
    teacher = make_model("scalar")
    s = SqueezedModel.from_expanded(teacher, "task:seg")
    assert torch.equal(s.backbone.conv1.weight, teacher.backbone.branches["seg"].conv1.weight)
    s = SqueezedModel.from_expanded(teacher)  # default: the first task
    assert torch.equal(s.backbone.conv1.weight, teacher.backbone.branches["cls"].conv1.weight)
    s = SqueezedModel.from_expanded(teacher, "scratch")
    assert not torch.equal(s.backbone.conv1.weight, teacher.backbone.branches["cls"].conv1.weight)
    path = tmp_path / "bb.pth"
    torch.save(backbone_state_dict(teacher, "det"), path)
    s = SqueezedModel.from_expanded(teacher, str(path))
    assert torch.equal(s.backbone.conv1.weight, teacher.backbone.branches["det"].conv1.weight)
    with pytest.raises(ValueError, match="student_init"):
        SqueezedModel.from_expanded(teacher, "task:nope")
    with pytest.raises(ValueError, match="student_init"):
        SqueezedModel.from_expanded(teacher, "bogus")
    shared = make_model(shared_backbone=True)
    s = SqueezedModel.from_expanded(shared, "mean")
    torch.testing.assert_close(s.backbone.conv1.weight, shared.backbone.conv1.weight)
    # independently initialised branches (pretrained = ""): their average is refused, naming the way out
    with pytest.raises(ConfigError, match=r"student_init = 'mean': the teacher's branches started from independent"
                                          r" random weights .* use task:<name>"):
        SqueezedModel.from_expanded(teacher, "mean")


def test_model_from_checkpoint_round_trip():
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(**SMALL_DET), sources=copy.deepcopy(SOURCES))
    model = XLearnerModel(cfg.model, cfg.sources, NUM_CLASSES)
    ckpt = {"model": {"module." + k: v for k, v in model.state_dict().items()}, "config": cfg.to_dict(),
            "meta": {"kind": "expanded", "num_classes": NUM_CLASSES}}
    again = model_from_checkpoint(ckpt)
    assert isinstance(again, XLearnerModel) and not again.training
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    student = SqueezedModel.from_expanded(model, "task:det", SqueezeConfig(distill_stages=[3, 4]))
    ckpt = {"model": student.state_dict(), "config": cfg.to_dict(),
            "meta": {"kind": "squeezed", "num_classes": NUM_CLASSES, "distill_stages": [3, 4]}}
    again = model_from_checkpoint(ckpt)
    assert isinstance(again, SqueezedModel) and set(again.adapters["cls"]) == {"layer3", "layer4"}
    with pytest.raises(ValueError, match="kind"):
        model_from_checkpoint({**ckpt, "meta": {"kind": "what", "num_classes": NUM_CLASSES}})


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
    with pytest.raises(ValueError, match="model.branch_init: expected 'independent' or 'shared', got 'tied'"):
        make_model("hrnet", branch_init="tied")


def test_det_boxes_stay_fp32_under_bf16_autocast():
    """On an 800 x 1088 canvas under bf16 autocast, the RPN's anchors and decoded boxes, and the RoI head's
    predictions, are fp32: they agree with fp32 arithmetic on the same offsets to well under a pixel. torchvision's
    own components, as the head used them before, are off by pixels (measured: 7 px anchors, 17 px boxes)."""
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import AnchorGenerator, concat_box_prediction_layers
    from xlearner.heads import DetHead
    torch.manual_seed(0)
    mcfg = ModelConfig(**SMALL_DET)
    head = DetHead(mcfg, [SOURCES[2]], NUM_CLASSES, {"layer1": 8, "layer2": 8, "layer3": 8, "layer4": 8}).eval()
    images = ImageList(torch.zeros(1, 3, 800, 1088), [(800, 1088)])
    feats = [torch.randn(1, 32, 800 // s, 1088 // s) for s in (4, 8, 16, 32, 64)]

    def decoded(anchor_gen, rpn_head):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            fpn = [f.bfloat16() for f in feats]  # what the FPN's convs return under autocast
            logits, deltas = rpn_head(fpn)
            anchors = anchor_gen(images, fpn)
            _, deltas = concat_box_prediction_layers(logits, deltas)
            boxes = head.rpn.box_coder.decode(deltas, anchors).reshape(-1, 4)
        exact = head.rpn.box_coder.decode(deltas.float(), [a.float() for a in anchors]).reshape(-1, 4)
        return boxes, exact, anchors[0]

    boxes, exact, anchors = decoded(head.rpn.anchor_generator, head.rpn.head)
    assert boxes.dtype == anchors.dtype == torch.float32
    ref_anchors = head.rpn.anchor_generator(images, [f.float() for f in feats])[0]
    assert torch.equal(anchors, ref_anchors)
    assert (boxes - exact).abs().max().item() < 1e-3
    # before: torchvision's AnchorGenerator and RPNHead as they are (same weights)
    plain = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    boxes, exact, anchors = decoded(plain, super(type(head.rpn.head), head.rpn.head).forward)
    assert boxes.dtype == anchors.dtype == torch.bfloat16
    assert (anchors.float() - ref_anchors).abs().max().item() > 4  # bf16 spacing is 4 px in [512, 1024)
    assert (boxes.float() - exact).abs().max().item() > 4
    # the RoI head's predictions reach postprocess_detections (its decode) in fp32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pyramid = {str(i): f[:, :32] for i, f in enumerate(feats[:4])}
        proposals = [torch.tensor([[100.0, 200.0, 900.0, 700.0], [10.0, 10.0, 60.0, 90.0]])]
        seen = {}
        post = head.roi_heads.postprocess_detections
        head.roi_heads.postprocess_detections = lambda c, r, *a: seen.update(c=c.dtype, r=r.dtype) or post(c, r, *a)
        head.roi_heads(pyramid, proposals, [(800, 1088)], None, head.predictors["det_a"])
    assert seen == {"c": torch.float32, "r": torch.float32}


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
