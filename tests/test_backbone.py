"""Tests for xlearner/backbone.py: building, loading and exporting torchvision-format backbones."""
from __future__ import annotations

import pytest
import torch
import torchvision

from xlearner.backbone import backbone_state_dict, build_backbone


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
    with pytest.raises(ValueError, match=r"^model.arch: expected resnet10\|resnet18\|resnet34\|resnet50\|resnet101\|resnet152, got 'vgg16'$"):
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
