"""Task heads: one per task, with a shared neck and one predictor per source.

In X-Learner (docs/DESIGN.md §1) every source keeps its own label space: ImageNet
and Places are both `cls` sources, but their classes are never merged. So each
task has one head whose *neck* (pooling, FPN + RPN + RoI box head, or the
segmentation decoder) is shared by all of that task's sources and trained by
all of them, and a small *predictor* per source (a linear layer, a FastRCNN
predictor, a 1x1 classifier) that maps the neck's output to that source's
classes.

Every head has the same three-call interface, used by XLearnerModel
(expand.py) and SqueezedModel (squeeze.py):

    images, ctx = head.prepare(batch, source)   # what the backbone sees (B,3,H,W, float) + what the head needs
    loss, outputs = head.loss(feats, ctx, source)   # feats = backbone stage dict; outputs: cls logits else None
    head.predict(feats, ctx, source)             # cls logits | det boxes in input coords | seg logits at input size

The detection head is built from torchvision's Faster R-CNN components only
(GeneralizedRCNNTransform, FeaturePyramidNetwork, RegionProposalNetwork,
MultiScaleRoIAlign, TwoMLPHead, FastRCNNPredictor), so its train losses and
its post-processed detections are exactly torchvision's (a test checks this).

`MultiSourceModel` (at the end) is a backbone and these heads as one model: the per-source loss loop
`forward(batch_by_source) -> {source: L_s}`, `total_loss` = sum_s w_s L_s, and `predict`; XLearnerModel and
SqueezedModel are its two backbones.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.segmentation.deeplabv3 import ASPP
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .run import dist
from .backbone import IMAGENET_MEAN, IMAGENET_STD, Backbone, channels_last, count_params, format_count, n_params, to_input
from .config import SEG_HEADS, ModelConfig, Registry, SourceConfig, check_tasks_have_sources

STAGES = ("layer1", "layer2", "layer3", "layer4")


class Head(nn.Module):
    """What every head shares: its sources and a per-source predictor table."""

    def __init__(self, sources: list[SourceConfig]):
        super().__init__()
        for s in sources:
            if "." in s.name or not s.name:
                # nn.ModuleDict keys cannot contain '.', and the key is the source name
                raise ValueError(f"source name {s.name!r}: must be non-empty and contain no '.'")
        self.sources = {s.name: s for s in sources}
        self.predictors = nn.ModuleDict()

    def _source(self, source: str) -> SourceConfig:
        if source not in self.sources:
            raise KeyError(f"{type(self).__name__} has no source {source!r}; it has {sorted(self.sources)}")
        return self.sources[source]


# ----------------------------------------------------------------------------
# classification

class ClsHead(Head):
    """Global average pool on layer4, then one nn.Linear per source.

    Loss: softmax cross-entropy, or BCE-with-logits for a `multi_label` source
    (labels are then a float [B, K] multi-hot tensor)."""

    def __init__(self, mcfg: ModelConfig, sources: list[SourceConfig], num_classes: dict[str, int],
                 channels: dict[str, int]):
        super().__init__(sources)
        for s in sources:
            self.predictors[s.name] = nn.Linear(channels["layer4"], num_classes[s.name])

    def prepare(self, batch: dict, source: str):
        return to_input(batch["images"]), {"labels": batch.get("labels")}

    def logits(self, feats: dict, source: str) -> torch.Tensor:
        return self.predictors[source](torch.flatten(F.adaptive_avg_pool2d(feats["layer4"], 1), 1))

    def loss(self, feats: dict, ctx: dict, source: str):
        src = self._source(source)
        logits = self.logits(feats, source)
        labels = ctx["labels"]
        if src.multi_label:
            loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        else:
            loss = F.cross_entropy(logits, labels)
        return loss, logits

    def predict(self, feats: dict, ctx: dict, source: str) -> torch.Tensor:
        self._source(source)
        return self.logits(feats, source)


# ----------------------------------------------------------------------------
# detection

# Boxes in fp32 under bf16 autocast. torchvision builds anchors in the features' dtype, and BoxCoder.decode computes
# in the dtype of the predicted offsets: bf16 keeps 8 bits of mantissa, so a box centre at x = 900 px rounds to 4 px
# (measured: 17 px at worst on an 800 x 1088 canvas, docs/RESULTS.md). The convolutions and linear layers stay in
# the autocast dtype; what they predict, the anchors, the decoding, NMS and the losses' box arithmetic are fp32.

class FP32Anchors(AnchorGenerator):
    """torchvision's AnchorGenerator, its anchors in fp32 whatever the features' dtype (it reads only their sizes)."""

    def forward(self, image_list, feature_maps):
        return super().forward(image_list, [torch.empty(f.shape[-2:], device=f.device) for f in feature_maps])


class FP32RPNHead(RPNHead):
    """torchvision's RPNHead (its convs in the autocast dtype), its objectness and box offsets returned in fp32."""

    def forward(self, x):
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class PerSourceRoIHeads(RoIHeads):
    """torchvision's RoIHeads (box branch only) with the box predictor passed in per call.

    RoIHeads holds a single `box_predictor`; we need one per source but a single
    forward over all sources (DDP). Passing the predictor as an argument keeps
    the module graph static: no attribute swapping between calls. Sampling,
    the loss and post-processing are RoIHeads' own methods, unchanged."""

    def forward(self, features, proposals, image_shapes, targets=None, box_predictor=None):
        if box_predictor is None:
            raise ValueError("PerSourceRoIHeads needs the source's box_predictor")
        if self.training:
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = (t.float() for t in box_predictor(box_features))  # fp32 boxes (above)
        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        return [{"boxes": b, "labels": c, "scores": s} for b, s, c in zip(boxes, scores, labels)], {}


class DetHead(Head):
    """Faster R-CNN with FPN, assembled from torchvision's components.

    Shared by the task (class-agnostic): the FPN over layer1..layer4 (+ max-pool
    level, as torchvision's BackboneWithFPN), the RPN and the RoI box head.
    Per source: the resize/normalise transform (it depends on the source's
    image_size; no parameters) and a FastRCNNPredictor with K+1 classes
    (index 0 = background). Sizes come from ModelConfig; the defaults there
    equal torchvision's Faster R-CNN's."""

    def __init__(self, mcfg: ModelConfig, sources: list[SourceConfig], num_classes: dict[str, int],
                 channels: dict[str, int]):
        super().__init__(sources)
        c = mcfg.fpn_channels
        self.transforms = nn.ModuleDict({
            s.name: GeneralizedRCNNTransform(min_size=s.image_size, max_size=int(s.image_size * 1333 / 800),
                                             image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
            for s in sources})
        self.fpn = FeaturePyramidNetwork([channels[k] for k in STAGES], c, extra_blocks=LastLevelMaxPool())
        anchors = FP32Anchors(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
        # torchvision convention: eval keeps half the proposals of training
        self.rpn = RegionProposalNetwork(
            anchors, FP32RPNHead(c, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3,
            batch_size_per_image=mcfg.rpn_batch_size_per_image, positive_fraction=0.5,
            pre_nms_top_n=dict(training=mcfg.rpn_pre_nms_top_n, testing=mcfg.rpn_pre_nms_top_n // 2),
            post_nms_top_n=dict(training=mcfg.rpn_post_nms_top_n, testing=mcfg.rpn_post_nms_top_n // 2),
            nms_thresh=0.7, score_thresh=0.0)
        self.roi_heads = PerSourceRoIHeads(
            MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2),
            TwoMLPHead(c * 7 * 7, mcfg.box_head_dim), None,
            fg_iou_thresh=0.5, bg_iou_thresh=0.5,
            batch_size_per_image=mcfg.box_batch_size_per_image, positive_fraction=0.25,
            bbox_reg_weights=None, score_thresh=0.05, nms_thresh=0.5,
            detections_per_img=mcfg.box_detections_per_img)
        for s in sources:
            self.predictors[s.name] = FastRCNNPredictor(mcfg.box_head_dim, num_classes[s.name] + 1)

    def prepare(self, batch: dict, source: str):
        """Resize + normalise + pad a list of images (and their targets) as torchvision does."""
        self._source(source)
        images = [to_input(img, normalize=False) for img in batch["images"]]  # [0, 1]: the transform normalises
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets = self.transforms[source](images, batch.get("targets"))
        return image_list.tensors, {"image_list": image_list, "targets": targets,
                                    "original_sizes": original_sizes}

    def _pyramid(self, feats: dict) -> OrderedDict:
        # torchvision names the FPN inputs "0".."3" (IntermediateLayerGetter), outputs "0".."3","pool"
        return self.fpn(OrderedDict((str(i), feats[k]) for i, k in enumerate(STAGES)))

    def loss_dict(self, feats: dict, ctx: dict, source: str) -> dict[str, torch.Tensor]:
        """torchvision's Faster R-CNN loss dict (loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg)."""
        self._source(source)
        if not self.training:
            raise RuntimeError("DetHead losses need train mode (torchvision samples proposals only in training)")
        if ctx["targets"] is None:
            raise ValueError(f"det source {source!r}: the batch has no 'targets'")
        pyramid = self._pyramid(feats)
        proposals, rpn_losses = self.rpn(ctx["image_list"], pyramid, ctx["targets"])
        _, roi_losses = self.roi_heads(pyramid, proposals, ctx["image_list"].image_sizes, ctx["targets"],
                                       self.predictors[source])
        return {**roi_losses, **rpn_losses}  # same order as GeneralizedRCNN

    def loss(self, feats: dict, ctx: dict, source: str):
        return sum(self.loss_dict(feats, ctx, source).values()), None

    def predict(self, feats: dict, ctx: dict, source: str) -> list[dict[str, torch.Tensor]]:
        """Post-processed detections in the coordinates of the input images (call in eval mode)."""
        self._source(source)
        if self.training:
            raise RuntimeError("DetHead.predict needs eval mode (call model.eval())")
        pyramid = self._pyramid(feats)
        image_sizes = ctx["image_list"].image_sizes
        proposals, _ = self.rpn(ctx["image_list"], pyramid)
        detections, _ = self.roi_heads(pyramid, proposals, image_sizes, None, self.predictors[source])
        return self.transforms[source].postprocess(detections, image_sizes, ctx["original_sizes"])


# ----------------------------------------------------------------------------
# segmentation

class FPNDecoder(nn.Module):
    """FPN-style fusion: 1x1 laterals to `width`, top-down nearest-upsample sum, 3x3 conv+BN+ReLU.

    Output at layer1 resolution (stride 4), `width` channels."""

    def __init__(self, channels: dict[str, int], width: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(channels[k], width, 1) for k in STAGES)
        self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))

    def forward(self, feats: dict) -> torch.Tensor:
        x = self.lateral[-1](feats["layer4"])
        for lateral, k in zip(reversed(self.lateral[:-1]), reversed(STAGES[:-1])):
            f = feats[k]
            x = lateral(f) + F.interpolate(x, size=f.shape[-2:], mode="nearest")
        return self.fuse(x)


class DeepLabDecoder(nn.Sequential):
    """torchvision's DeepLabHead on layer4 minus its final classifier conv, `width` channels wide.

    DeepLabHead(in, K) is ASPP(in, [12, 24, 36]) -> 3x3 conv -> BN -> ReLU -> 1x1 conv to K.
    We keep everything but that last conv (the per-source classifiers replace it)
    and use `width` instead of ASPP's fixed 256. Our backbone is the standard
    stride-32 ResNet (no dilation), so layer4 is at 1/32. ASPP's image-pooling
    branch has a BN on a 1x1 map: train batches need >= 2 images."""

    def __init__(self, channels: dict[str, int], width: int):
        super().__init__(ASPP(channels["layer4"], [12, 24, 36], width),
                         nn.Conv2d(width, width, 3, padding=1, bias=False),
                         nn.BatchNorm2d(width), nn.ReLU(inplace=True))

    def forward(self, feats: dict) -> torch.Tensor:
        return super().forward(feats["layer4"])


SEG_DECODERS = Registry("model.seg_head", SEG_HEADS, fpn=FPNDecoder, deeplab=DeepLabDecoder)


class SegHead(Head):
    """A shared decoder (`seg_head`: fpn | deeplab) + a 1x1 classifier per source.

    Logits are upsampled (bilinear) to the input size; the loss is cross-entropy
    with the source's ignore_index, averaged over the non-ignored pixels of the
    *global* batch (all ranks), so that N processes x B equal 1 process x NB
    whatever each rank's share of ignored pixels. A batch where every pixel is
    ignored gives a loss of exactly 0 (torch's mean reduction would give nan),
    still connected to the graph so that DDP sees every parameter used."""

    def __init__(self, mcfg: ModelConfig, sources: list[SourceConfig], num_classes: dict[str, int],
                 channels: dict[str, int]):
        super().__init__(sources)
        self.decoder = SEG_DECODERS[mcfg.seg_head](channels, mcfg.seg_channels)
        for s in sources:
            self.predictors[s.name] = nn.Conv2d(mcfg.seg_channels, num_classes[s.name], 1)

    def prepare(self, batch: dict, source: str):
        images = to_input(batch["images"])
        return images, {"masks": batch.get("masks"), "size": tuple(images.shape[-2:])}

    def logits(self, feats: dict, ctx: dict, source: str) -> torch.Tensor:
        logits = self.predictors[source](self.decoder(feats))
        return F.interpolate(logits, size=ctx["size"], mode="bilinear", align_corners=False)

    def loss(self, feats: dict, ctx: dict, source: str):
        src = self._source(source)
        logits = self.logits(feats, ctx, source)
        masks = ctx["masks"]
        # sum / count instead of reduction="mean": identical when some pixel is labelled, 0 (not nan) otherwise
        total = F.cross_entropy(logits, masks, ignore_index=src.ignore_index, reduction="sum")
        # divide by (all ranks' labelled pixels) / world size: DDP averages the ranks' gradients, so this is the
        # gradient of the global pixel mean (a rank's own count would weight its pixels by 1 / that count)
        labelled = dist.all_reduce_sum_tensor((masks != src.ignore_index).sum())  # an integer: no gradient
        return total * dist.get_world_size() / labelled.clamp(min=1), None

    def predict(self, feats: dict, ctx: dict, source: str) -> torch.Tensor:
        self._source(source)
        return self.logits(feats, ctx, source)


HEADS = {"cls": ClsHead, "det": DetHead, "seg": SegHead}


# ----------------------------------------------------------------------------
# a backbone and the task heads: one model, a loss per source

class SourceOutput(NamedTuple):
    """One source batch through a model: what the squeeze distiller needs besides the loss."""
    loss: torch.Tensor                 # unweighted task loss
    outputs: Optional[torch.Tensor]    # cls logits, else None
    feats: dict                        # backbone features (stage -> Tensor)
    images: torch.Tensor               # the tensor the backbone saw (det: resized, normalised, padded)
    ctx: dict                          # what the head's prepare() passed on (labels, targets, sizes)


class MultiSourceModel(nn.Module):
    """What XLearnerModel and SqueezedModel share: heads per task, the per-source loss loop, predict."""

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
        """The Backbone that backbone.backbone_state_dict exports (`branch`: which one, where there is a choice)."""
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
        """Inference on `images` as a batch holds them (Tensor for cls/seg, list of images for det; uint8 as the
        loaders deliver them, or float already converted)."""
        task = self.sources[source].task
        head = self.heads[task]
        x, ctx = head.prepare({"images": images}, source)
        return head.predict(self.features(self._images(x), task), ctx, source)

    def _head_report(self) -> list[str]:
        lines = []
        for t, head in self.heads.items():
            preds = ", ".join(f"{s} {n_params(p)}" for s, p in head.predictors.items())
            lines.append(f"  head {t}: neck {format_count(count_params(head) - count_params(head.predictors))}; "
                         f"predictors: {preds}")
        return lines
