"""Metrics of evaluate.py against hand-computed values and a direct pycocotools run."""
import contextlib
import io
import json
import math

import pytest
import torch

from xlearner.config import SourceConfig
from xlearner.evaluate import (coco_evaluate, confusion_matrix, detections_to_coco, evaluate,
                               mean_per_class_accuracy, miou_from_confusion, multilabel_map)


# ----------------------------------------------------------------------------- detection

def _gt_dataset():
    # two images, non-contiguous category ids (3, 7), one crowd box that must not count
    images = [{"id": 1, "width": 100, "height": 80, "file_name": "a.jpg"},
              {"id": 5, "width": 64, "height": 64, "file_name": "b.jpg"}]
    boxes = [(1, 3, [10, 10, 30, 20]), (1, 7, [50, 40, 20, 30]), (5, 3, [0, 0, 40, 40]),
             (5, 7, [30, 30, 20, 20])]
    anns = [{"id": i + 1, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i, (im, c, b) in enumerate(boxes)]
    anns.append({"id": 99, "image_id": 5, "category_id": 3, "bbox": [40, 40, 20, 20], "area": 400, "iscrowd": 1})
    cats = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    return {"images": images, "annotations": anns, "categories": cats}


def _load_coco(path):
    from pycocotools.coco import COCO
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


IMPERFECT = [
    {"image_id": 1, "category_id": 3, "bbox": [11, 9, 30, 22], "score": 0.9},   # good
    {"image_id": 1, "category_id": 7, "bbox": [45, 40, 20, 30], "score": 0.8},  # IoU ~0.6
    {"image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10], "score": 0.95},   # false positive
    {"image_id": 5, "category_id": 3, "bbox": [2, 1, 36, 40], "score": 0.7},    # good-ish
    {"image_id": 5, "category_id": 3, "bbox": [41, 41, 19, 19], "score": 0.6},  # on the crowd box: ignored
]


def test_coco_evaluate_matches_direct_cocoeval(tmp_path):
    from pycocotools.cocoeval import COCOeval
    (tmp_path / "gt.json").write_text(json.dumps(_gt_dataset()))
    (tmp_path / "dt.json").write_text(json.dumps(IMPERFECT))
    gt = _load_coco(tmp_path / "gt.json")

    ours = coco_evaluate(gt, IMPERFECT)

    ref_gt = _load_coco(tmp_path / "gt.json")
    with contextlib.redirect_stdout(io.StringIO()):
        ref = COCOeval(ref_gt, ref_gt.loadRes(str(tmp_path / "dt.json")), "bbox")
        ref.evaluate(); ref.accumulate(); ref.summarize()
    assert ours["AP"] == pytest.approx(100 * ref.stats[0])
    assert ours["AP50"] == pytest.approx(100 * ref.stats[1])
    assert ours["AP75"] == pytest.approx(100 * ref.stats[2])
    assert 0 < ours["AP"] < 100  # the example is neither trivial nor perfect
    assert "segmentation" not in IMPERFECT[0]  # the caller's dicts are not modified


def test_coco_evaluate_perfect_and_empty(tmp_path):
    data = _gt_dataset()
    (tmp_path / "gt.json").write_text(json.dumps(data))
    gt = _load_coco(tmp_path / "gt.json")
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in data["annotations"] if not a["iscrowd"]]
    res = coco_evaluate(gt, perfect)
    assert res == {"AP": pytest.approx(100.0), "AP50": pytest.approx(100.0), "AP75": pytest.approx(100.0)}
    assert coco_evaluate(gt, []) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}


def test_detections_to_coco_maps_labels_and_boxes():
    preds = [{"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]]), "scores": torch.tensor([0.5]),
              "labels": torch.tensor([2])}]
    out = detections_to_coco(preds, [{"image_id": torch.tensor(42)}], cat_ids=[3, 7])
    assert out == [{"image_id": 42, "category_id": 7, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.5}]


# ----------------------------------------------------------------------------- segmentation

def test_confusion_matrix_and_miou_by_hand():
    ig = 255
    # 4 classes; class 3 appears in neither prediction nor ground truth
    target = torch.tensor([[0, 0, 1, 1],
                           [2, 2, ig, ig]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 3 - 1, 0]])  # the last two pixels are ignored whatever they say
    conf = confusion_matrix(pred, target, num_classes=4, ignore_index=ig)
    expected = torch.tensor([[1, 1, 0, 0],    # gt 0: one right, one predicted as 1
                             [0, 2, 0, 0],    # gt 1: both right
                             [1, 0, 1, 0],    # gt 2: one right, one predicted as 0
                             [0, 0, 0, 0]])
    assert torch.equal(conf, expected)
    miou, per_class = miou_from_confusion(conf)
    # IoU0 = 1/(2+2-1) = 1/3; IoU1 = 2/(2+3-2) = 2/3; IoU2 = 1/(2+1-1) = 1/2; class 3 undefined
    assert per_class[0] == pytest.approx(100 / 3)
    assert per_class[1] == pytest.approx(200 / 3)
    assert per_class[2] == pytest.approx(50.0)
    assert math.isnan(per_class[3])
    assert miou == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)


# ----------------------------------------------------------------------------- classification

def test_mean_per_class():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7]])
    target = torch.tensor([0, 1, 1, 1])
    pred = logits.argmax(1)  # [0, 1, 0, 2]
    # class 0: 1/1, class 1: 1/3, class 2: no example -> left out
    assert mean_per_class_accuracy(pred, target, num_classes=3) == pytest.approx(100 * (1 + 1 / 3) / 2)


def test_multilabel_map():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2], [0.1, 0.9]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0]])
    # class 0: ranks 1 (hit), 2, 3 (hit) -> (1 + 2/3) / 2; class 1: ranks 1 (miss), 2 (hit) -> 1/2
    assert multilabel_map(scores, targets) == pytest.approx(100 * ((1 + 2 / 3) / 2 + 0.5) / 2)


# ----------------------------------------------------------------------------- the loop (single process)

class _FakeModel(torch.nn.Module):
    """predict() returns what the batch says it should, so the loop's bookkeeping is what is tested."""

    def predict(self, images, source):
        return self.outputs.pop(0)


class _DS:
    def __init__(self, num_classes, cat_ids=None, coco=None):
        self.num_classes, self.cat_ids, self.coco = num_classes, cat_ids, coco


def test_evaluate_loop_cls_and_seg():
    m = _FakeModel()
    m.outputs = [torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[3.0, 1.0]])]
    loader = [{"images": torch.zeros(2, 3, 4, 4), "labels": torch.tensor([0, 0])},
              {"images": torch.zeros(1, 3, 4, 4), "labels": torch.tensor([1])}]
    src = SourceConfig(name="c", task="cls", metric="mean_per_class")
    res = evaluate(m, src, loader, _DS(2), torch.device("cpu"))
    assert res["top1"] == pytest.approx(100 / 3)
    assert res["mean_per_class"] == pytest.approx(25.0)
    assert res["top1_majority"] == pytest.approx(200 / 3)  # labels 0, 0, 1: always "0" is right 2 of 3

    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1] = 1.0  # predicts class 1 everywhere
    m.outputs = [logits]
    masks = torch.tensor([[[1, 1], [0, 255]]])
    res = evaluate(m, SourceConfig(name="s", task="seg"), [{"images": torch.zeros(1, 3, 2, 2), "masks": masks}],
                   _DS(3), torch.device("cpu"))
    # class 1: TP 2, FP 1 -> 2/3; class 0: 0; class 2: absent everywhere -> None
    assert res["per_class_iou"][2] is None
    assert res["mIoU"] == pytest.approx(100 * (0 + 2 / 3) / 2)
    # labelled pixels: 2 of class 1, 1 of class 0; all-class-1 scores IoU 2/3 on class 1, 0 on class 0
    assert res["mIoU_majority"] == pytest.approx(100 * (0 + 2 / 3) / 2)

    # the majority baseline is not the model's score: 3 pixels of class 0, 1 of class 1, model says 1
    m.outputs = [logits]
    res = evaluate(m, SourceConfig(name="s", task="seg"),
                   [{"images": torch.zeros(1, 3, 2, 2), "masks": torch.tensor([[[0, 0], [0, 1]]])}],
                   _DS(3), torch.device("cpu"))
    assert res["mIoU"] == pytest.approx(100 * (0 + 1 / 4) / 2)          # class 1: TP 1, FP 3
    assert res["mIoU_majority"] == pytest.approx(100 * (3 / 4 + 0) / 2)  # all class 0: TP 3, FN 1 on class 1
