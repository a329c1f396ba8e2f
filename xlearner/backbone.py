"""The plain backbone: a torchvision ResNet that returns its four stage features.

Everything in X-Learner is built from this one module. The expanded model
(model.ExpandedNet) runs T of them, one branch per task, linked by the
reconciliation layers (model.py); the squeezed student (squeeze.SqueezedModel)
is one of them; transfer.py loads any backbone into one. Because the
submodules keep torchvision's names, weights move in and out as plain
torchvision-format state_dicts (docs/DESIGN.md §5): `load_torchvision_state_dict`
loads one (strict except fc.*), `build_backbone` builds random, from a file or
from a torchvision weights name, `freeze_bn` swaps in FrozenBatchNorm2d, and
`compile_stages` compiles the stages of every ResNet trunk (`model.compile`).
Also here: the images' statistics and `to_input` (uint8 loader images -> what a backbone sees, on the
device), `channels_last`, parameter counts for the reports, and `backbone_state_dict`, the export.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from torchvision.ops import FrozenBatchNorm2d
from torchvision.transforms.v2 import functional as TF

from .config import ARCHS, Registry

# The statistics every backbone's input is normalised with (ImageNet's, as torchvision's weights expect).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_STATS: dict = {}  # (device, dtype) -> (mean, std) as [3, 1, 1] tensors: made once, not copied from the host each step


def to_input(images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Loader images -> what a backbone sees, on the images' own device (the GPU, in training).

    The loaders deliver uint8 images: a quarter of fp32's bytes to pin and to copy. Here they become float in
    [0, 1] and, unless the consumer normalises them itself (the detector's transform), normalised, with the
    operations the CPU transform used (torchvision's to_dtype, then subtract and divide): the same numbers to
    the last bit. Float images are taken as already converted and pass unchanged."""
    if images.dtype != torch.uint8:
        return images
    x = TF.to_dtype(images, torch.float32, scale=True)
    if not normalize:
        return x
    key = (x.device, x.dtype)
    if key not in _STATS:
        _STATS[key] = tuple(torch.tensor(v, dtype=x.dtype, device=x.device).view(-1, 1, 1)
                            for v in (IMAGENET_MEAN, IMAGENET_STD))
    mean, std = _STATS[key]
    return x.sub_(mean).div_(std)


def resnet10(weights=None) -> torchvision.models.ResNet:
    """ResNet-10: torchvision's own ResNet class with one BasicBlock per stage. Not a torchvision model
    name, so there are no weights for it; it makes the miniature ablation affordable on 2 CPU cores.
    An exported backbone loads into `torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1])`."""
    if weights is not None:
        raise ValueError("resnet10 has no pre-trained weights")
    return torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])


BACKBONES = Registry("model.arch", ARCHS, resnet10=resnet10, resnet18=torchvision.models.resnet18,
                     resnet34=torchvision.models.resnet34, resnet50=torchvision.models.resnet50,
                     resnet101=torchvision.models.resnet101, resnet152=torchvision.models.resnet152)


class Backbone(nn.Module):
    """A torchvision ResNet without avgpool/fc, returning its four stage outputs.

    The submodules keep torchvision's names (conv1, bn1, relu, maxpool,
    layer1..layer4), so `state_dict()` keys are torchvision's minus `fc.*`
    and weights move between the two with a plain load_state_dict."""

    def __init__(self, resnet: torchvision.models.ResNet, arch: str):
        super().__init__()
        self.arch = arch
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        expansion = type(resnet.layer1[0]).expansion
        self.channels = {f"layer{l}": 64 * 2 ** (l - 1) * expansion for l in range(1, 5)}

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stage(self, l: int, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"layer{l}")(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats, x = {}, self.stem(x)
        for l in range(1, 5):
            x = feats[f"layer{l}"] = self.stage(l, x)
        return feats


def read_state_dict(pretrained: str) -> dict | None:
    """"" -> None; a file -> its state_dict; "ResNet50_Weights.IMAGENET1K_V2" -> torchvision's (downloads)."""
    if not pretrained:
        return None
    path = Path(pretrained)
    if path.is_file():
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot load a state_dict with weights_only=True ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if not isinstance(sd, dict):
            raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(sd).__name__}")
        return sd
    if "_Weights." in pretrained:
        try:
            weights = torchvision.models.get_weight(pretrained)
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"pretrained={pretrained!r}: not a torchvision weights name ({e})") from None
        return weights.get_state_dict(progress=True)  # downloads only here, when the user asked for it
    raise ValueError(f"pretrained={pretrained!r}: not a file, and not a torchvision weights name "
                     f"such as 'ResNet50_Weights.IMAGENET1K_V2'")


def load_torchvision_state_dict(module: nn.Module, sd: dict, where: str) -> None:
    """Load a torchvision-format ResNet state_dict, strict except fc.* (and num_batches_tracked)."""
    result = module.load_state_dict(sd, strict=False)
    # num_batches_tracked is absent from some old torchvision weights and from FrozenBatchNorm2d
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in result.unexpected_keys if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"{where}: not a state_dict of this architecture: missing keys {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")


def freeze_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d with the same affine params and statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps).to(child.weight.device)
            for k in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, k).copy_(getattr(child, k).detach())
            setattr(module, name, frozen)
        else:
            freeze_bn(child)
    return module


def backbone_from_state_dict(arch: str, sd: dict | None, frozen_bn: bool, where: str) -> Backbone:
    """A Backbone of `arch` holding `sd` (random when None); `where` names the weights in an error."""
    backbone = Backbone(BACKBONES[arch](weights=None), arch)  # never downloads; weights come from `sd`
    if sd is not None:
        load_torchvision_state_dict(backbone, sd, where)
    return freeze_bn(backbone) if frozen_bn else backbone


def build_backbone(arch: str, pretrained: str = "", frozen_bn: bool = False) -> Backbone:
    """A Backbone of `arch`: random (""), from a torchvision-format state_dict file, or a weights name."""
    return backbone_from_state_dict(arch, read_state_dict(pretrained), frozen_bn, pretrained)


def compile_stages(model: nn.Module, **options) -> int:
    """torch.compile, in place, the four stages of every ResNet trunk in `model` (`model.compile = true`).

    ExpandedNet runs its branches stage by stage (`branch.stage(l, x)` calls
    `layer{l}(x)`), never a branch's forward, so the stages are the unit to
    compile: they hold almost all of the compute. `nn.Module.compile()` compiles
    a module's call in place, without the `_orig_mod.` wrapper of
    `torch.compile(module)`, so state_dict keys, checkpoints and exact resume do
    not change. The stem (one conv) and the heads (detection shapes change every
    batch) stay eager. Any module with layer1..layer4 counts as a trunk: our
    Backbone, a torchvision ResNet, or tools/bench.py's plain floors. `options` go to
    torch.compile (default: inductor, static shapes). Returns the number of stages compiled.

    Every compiled stage runs through the one code object of nn.Module._call_impl,
    so to dynamo each stage (and each input shape) is a recompile of the same
    frame: dynamo would soon mark the channel and size dims dynamic (on torch
    2.14.1 inductor then fails on the CPU: "Cannot convert expression to float",
    measured) and stop compiling after `recompile_limit` (8) variants. Hence static
    shapes, and a limit that leaves room for 8 variants per stage. Detection
    inputs change size every batch and recompile per shape: compile suits
    fixed-size inputs (docs/OPERATIONS.md, "Full scale").
    """
    import torch._dynamo  # only when compiling: loading dynamo costs every other run a second

    trunks = [m for m in model.modules() if all(isinstance(getattr(m, f"layer{l}", None), nn.Module)
                                                for l in range(1, 5))]
    options = {"dynamic": False, **options}
    for trunk in trunks:
        for l in range(1, 5):
            getattr(trunk, f"layer{l}").compile(**options)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * 4 * len(trunks))
    return 4 * len(trunks)


# ----------------------------------------------------------------------------
# memory format, reports, export

def channels_last(x, on: bool):
    """A module or an image batch in channels-last memory format when `on` (model.channels_last), else as is."""
    if not on:
        return x
    if isinstance(x, torch.Tensor):
        return x.contiguous(memory_format=torch.channels_last)
    return x.to(memory_format=torch.channels_last)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def format_count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def n_params(module: nn.Module) -> str:
    """A module's parameter count as the build reports print it: 11.18M, 23.4k."""
    return format_count(count_params(module))


def backbone_state_dict(model: nn.Module, branch: str | None = None) -> dict[str, torch.Tensor]:
    """A plain torchvision-format state_dict (no fc.*) of a model's backbone.

    SqueezedModel: the student. XLearnerModel: branch `branch` (default: the
    first task), or the shared backbone. A Backbone is exported as is.
    FrozenBatchNorm2d has no num_batches_tracked; we add it (0) so the keys are
    exactly those of torchvision.models.<arch>() minus fc.weight and fc.bias."""
    model = getattr(model, "module", model)  # DDP
    if hasattr(model, "exported_backbone"):  # heads.MultiSourceModel: XLearnerModel, SqueezedModel
        backbone = model.exported_backbone(branch)
    elif isinstance(model, Backbone):
        backbone = model
    else:
        raise TypeError(f"backbone_state_dict: expected XLearnerModel, SqueezedModel or Backbone, "
                        f"got {type(model).__name__}")
    sd = backbone.state_dict()
    out = {}
    for k, v in sd.items():
        out[k] = v.detach().cpu().clone()
        if k.endswith(".running_var"):
            nbt = k[: -len("running_var")] + "num_batches_tracked"
            if nbt not in sd:
                out[nbt] = torch.tensor(0, dtype=torch.long)
    return out
