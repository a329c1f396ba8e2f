"""Evaluation: the metrics every stage reports, and one distributed loop for all tasks.

Where it sits in the method: the expansion and squeeze trainers call
`evaluate()` on each source's val split to watch training, and the transfer
evaluator (transfer.py) calls it to score a backbone downstream. One loop,
one set of metric functions, so a number means the same thing everywhere.

Metrics (all returned in percent, the unit of the paper's "+3.0 points"):
- cls: top-1 accuracy; mean per-class accuracy (the convention of Pets, Flowers,
  Caltech-101 and Aircraft); mAP for multi-label sources.
- det: COCO AP, AP50, AP75 from pycocotools' COCOeval, the reference
  implementation, rather than a re-implementation that could drift from it.
- seg: mean IoU over classes from a pixel confusion matrix; `ignore_index`
  pixels carry no vote, and a class absent from both prediction and ground
  truth is undefined (NaN) and left out of the mean rather than counted as 0
  or 100.

Distribution: each rank evaluates its shard of val (data.build_eval_loader has
no repeats and no padding duplicates, so nothing is counted twice). Then cls
gathers predictions, seg sums confusion matrices, and det gathers detections
so that rank 0 can run COCOeval once and broadcast the numbers.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
from typing import Callable

import torch
import torch.nn as nn

from . import data

from .run import dist
from .config import DataConfig, SourceConfig
from .engine import autocast


# ----------------------------------------------------------------------------
# classification

def mean_per_class_accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean over classes (present in `target`) of the per-class recall, in percent.

    `pred` holds class indices. Classes with no val example are left out: their
    accuracy is undefined, and counting them as 0 would punish the backbone for
    a property of the split.
    """
    target = target.long().view(-1)
    pred = pred.long().view(-1)
    total = torch.bincount(target, minlength=num_classes).double()
    correct = torch.bincount(target[pred == target], minlength=num_classes).double()
    present = total > 0
    if not present.any():
        return float("nan")
    return 100.0 * (correct[present] / total[present]).mean().item()


def multilabel_map(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over classes with at least one positive of the average precision, in percent.

    AP of a class = the mean, over its positives, of the precision at that
    positive's rank (no interpolation: the same as sklearn's
    average_precision_score). Ties in score are broken by a stable sort.
    """
    scores = scores.double()
    targets = (targets > 0.5).double()
    aps = []
    for c in range(scores.shape[1]):
        pos = targets[:, c]
        n_pos = pos.sum()
        if n_pos == 0:
            continue
        order = torch.sort(scores[:, c], descending=True, stable=True).indices
        hits = pos[order]
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
        aps.append((precision * hits).sum() / n_pos)
    if not aps:
        return float("nan")
    return 100.0 * torch.stack(aps).mean().item()


# ----------------------------------------------------------------------------
# segmentation

def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """LongTensor[K, K]: entry (g, p) counts pixels of ground truth g predicted as p.

    Pixels whose target is `ignore_index` (or otherwise outside [0, K)) are dropped.
    One bincount over g*K + p instead of a Python loop over classes.
    """
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    idx = target[keep] * num_classes + pred[keep]
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou_from_confusion(conf: torch.Tensor) -> tuple[float, list[float]]:
    """(mean IoU, per-class IoU), in percent.

    IoU_c = TP / (TP + FP + FN). A class absent from both prediction and ground
    truth has an empty union: its IoU is NaN and it is left out of the mean.
    """
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    valid = ~torch.isnan(iou)
    miou = 100.0 * iou[valid].mean().item() if valid.any() else float("nan")
    return miou, [100.0 * v for v in iou.tolist()]


# ----------------------------------------------------------------------------
# detection

def coco_evaluate(coco_gt, detections: list[dict], img_ids: list[int] | None = None) -> dict[str, float]:
    """COCO box AP, AP50, AP75 (percent) of `detections` against `coco_gt`.

    `detections` are in COCO result format: {"image_id", "category_id" (the
    dataset's ORIGINAL id), "bbox": [x, y, w, h], "score"}. `img_ids` restricts
    the evaluation to the images that were actually run (e.g. a capped val
    pass); by default every image of `coco_gt` counts, so a missed image costs
    recall as it should.

    COCOeval's progress prints are swallowed, but its numbers are used as is.
    No detections at all is a legitimate outcome (an untrained head): AP is 0,
    not a crash (pycocotools' loadRes cannot take an empty list).
    """
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        # loadRes adds keys to the dicts it is given: hand it copies
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if img_ids is not None:
            ev.params.imgIds = sorted(set(int(i) for i in img_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # stats[i] == -1 means "no ground truth to evaluate": undefined, not zero
    ap, ap50, ap75 = (float(s) for s in ev.stats[:3])
    return {k: (100.0 * v if v >= 0 else float("nan")) for k, v in (("AP", ap), ("AP50", ap50), ("AP75", ap75))}


def detections_to_coco(preds: list[dict], targets: list[dict], cat_ids: list[int]) -> list[dict]:
    """Model outputs (xyxy boxes, labels 1..K) -> COCO results (xywh, original category ids)."""
    out = []
    for p, t in zip(preds, targets):
        image_id = int(t["image_id"])
        boxes = p["boxes"].detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, score, label in zip(xywh, p["scores"].tolist(), p["labels"].tolist()):
            out.append({"image_id": image_id, "category_id": int(cat_ids[int(label) - 1]),
                        "bbox": [round(v, 3) for v in box], "score": float(score)})
    return out


# ----------------------------------------------------------------------------
# the loop

@torch.no_grad()
def evaluate(model, src: DataConfig, loader, dataset, device: torch.device, amp: str = "off") -> dict[str, float]:
    """Score `model.predict(images, src.name)` on this rank's `loader`, combined over ranks.

    `loader` is this rank's shard (data.build_eval_loader), run to its end.
    Returns percent: cls {"top1"} (+ "mean_per_class" when `src.metric` asks
    for it, "mAP" for multi-label), det {"AP", "AP50", "AP75"},
    seg {"mIoU", "per_class_iou": [...]}. Single-label cls and seg also get the
    trivial baseline a run must beat, "top1_majority" / "mIoU_majority": the
    score of always predicting the val split's most frequent class (for det it
    is 0 AP, so there is no key).
    """
    was_training = model.training
    model.eval()
    num_classes = src.num_classes or dataset.num_classes
    logits_all, labels_all, detections, img_ids = [], [], [], []
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    try:
        for batch in loader:
            batch = data.move_to(batch, device)
            with autocast(device, amp):
                out = model.predict(batch["images"], src.name)
            if src.task == "cls":
                logits_all.append(out.float().cpu())
                labels_all.append(batch["labels"].cpu())
            elif src.task == "det":
                detections += detections_to_coco(out, batch["targets"], dataset.cat_ids)
                img_ids += [int(t["image_id"]) for t in batch["targets"]]
            else:
                pred = out.argmax(1)
                conf += confusion_matrix(pred, batch["masks"], num_classes, src.ignore_index)
    finally:
        model.train(was_training)

    if src.task == "cls":
        return _combine_cls(src, logits_all, labels_all, num_classes)
    if src.task == "det":
        return _combine_det(dataset, detections, img_ids)
    return _combine_seg(conf)


def _combine_cls(src: DataConfig, logits_all: list, labels_all: list, num_classes: int) -> dict[str, float]:
    logits = torch.cat(logits_all) if logits_all else torch.zeros(0, num_classes)
    labels = torch.cat(labels_all) if labels_all else torch.zeros(0, dtype=torch.long)
    # gather only what the metrics need: scores for mAP, argmax otherwise
    if src.multi_label:
        parts = dist.all_gather_object((logits, labels))
        scores = torch.cat([p[0] for p in parts])
        return {"mAP": multilabel_map(scores, torch.cat([p[1] for p in parts]))}
    parts = dist.all_gather_object((logits.argmax(1) if len(logits) else labels, labels))
    pred, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    n = len(labels)
    res = {"top1": 100.0 * (pred == labels).double().mean().item() if n else float("nan"),
           "top1_majority": 100.0 * torch.bincount(labels).max().item() / n if n else float("nan")}
    if src.metric == "mean_per_class":
        res["mean_per_class"] = mean_per_class_accuracy(pred, labels, num_classes)
    return res


def _combine_det(dataset, detections: list[dict], img_ids: list[int]) -> dict[str, float]:
    parts = dist.all_gather_object((detections, img_ids))

    def score() -> dict[str, float]:  # rank 0 alone, for as long as COCOeval takes (dist.from_main: no collective)
        all_dets = [d for p in parts for d in p[0]]
        all_ids = [i for p in parts for i in p[1]]
        subset = getattr(dataset, "indices", None) is not None  # a dev split or val_subset
        return coco_evaluate(dataset.coco, all_dets, img_ids=all_ids if subset else None)
    return dist.from_main(score)


def _combine_seg(conf: torch.Tensor) -> dict:
    dist.all_reduce_sum_tensor(conf)
    conf = conf.cpu()
    miou, per_class = miou_from_confusion(conf)
    per_class_pixels = conf.sum(1)
    majority = torch.zeros_like(conf)  # every labelled pixel predicted as the most frequent class
    majority[:, per_class_pixels.argmax()] = per_class_pixels
    return {"mIoU": miou, "per_class_iou": [None if math.isnan(v) else v for v in per_class],
            "mIoU_majority": miou_from_confusion(majority)[0]}


def make_evaluator(model: nn.Module, sources: list[SourceConfig], device: torch.device, amp: str,
                   workers: int) -> Callable[[int], dict]:
    """A function step -> {source: metrics} over each source's val split, sharded across ranks.

    The val datasets and loaders are built on first use and then reused, so a
    periodic evaluation costs only the forward passes.
    """
    cache: dict[str, tuple] = {}

    def run_eval(step: int) -> dict:
        results = {}
        for s in sources:
            if not s.val:
                continue
            if s.name not in cache:
                ds = data.build_dataset(s, "val", train=False)
                cache[s.name] = (ds, data.build_eval_loader(s, ds, rank=dist.get_rank(), world_size=dist.get_world_size(),
                                                            batch_size=s.batch_size, workers=workers))
            ds, loader = cache[s.name]
            results[s.name] = evaluate(model, s, loader, ds, device, amp=amp)
        return results

    return run_eval
