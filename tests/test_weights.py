"""Tests for xlearner/weights.py: a model from a run checkpoint."""
from __future__ import annotations

import copy

import pytest
import torch

from xlearner.config import Config, ModelConfig, SqueezeConfig
from xlearner.expand import XLearnerModel
from xlearner.squeeze import SqueezedModel
from xlearner.weights import model_from_checkpoint

from test_model import NUM_CLASSES, SMALL_DET, SOURCES


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
