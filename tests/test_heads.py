"""Tests for xlearner/heads.py: the heads, one predictor per source, and MultiSourceModel. CPU only, no downloads."""
from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from xlearner.backbone import Backbone, build_backbone
from xlearner.config import ModelConfig, SourceConfig
from xlearner.expand import XLearnerModel
from xlearner.heads import DetHead, SegHead

from test_model import NUM_CLASSES, SMALL_DET, SOURCES, make_batches, make_model


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

# ----------------------------------------------------------------------------
# The seg loss under DDP: 2 processes x B give the gradients of 1 process x 2B, ignored pixels or not.

IGNORE = 255


def make_seg_model() -> XLearnerModel:
    torch.manual_seed(0)
    mcfg = ModelConfig(arch="resnet18", tasks=["seg"], reconcile="none", seg_channels=16)
    src = SourceConfig(name="seg", task="seg", image_size=32, ignore_index=IGNORE)
    return XLearnerModel(mcfg, [src], {"seg": 3}).eval()


def make_batch() -> dict:
    """4 images; rank 0 gets the first two (1.5 of 2 images labelled), rank 1 the last two (2 of 2 minus a row)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 32, generator=g)
    masks = torch.randint(0, 3, (4, 32, 32), generator=g)
    masks[1, :, :] = IGNORE
    masks[1, :8, :] = 1             # image 1: a quarter labelled
    masks[3, :1, :] = IGNORE        # image 3: one row ignored
    return {"images": images, "masks": masks}


def grads(model: XLearnerModel, module, batch: dict) -> dict[str, torch.Tensor]:
    model.total_loss(module({"seg": batch})).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = make_seg_model()
        half = {k: v[2 * rank: 2 * rank + 2] for k, v in make_batch().items()}
        g = grads(model, DDP(model), half)
        if rank == 0:
            torch.save(g, out)
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_different_ignore_counts_equal_one_process(tmp_path):
    batch = make_batch()
    labelled = [(batch["masks"][2 * r: 2 * r + 2] != IGNORE).sum().item() for r in (0, 1)]
    assert labelled == [1280, 2016]  # the two ranks' pixel counts really differ
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    model = make_seg_model()
    single = grads(model, model, batch)
    assert ddp.keys() == single.keys()
    for n in single:
        torch.testing.assert_close(ddp[n], single[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")
