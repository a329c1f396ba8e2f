"""Weights in and out: a backbone from any spec, a model from a run checkpoint, a backbone as a state_dict.

Everything the method hands around is a plain torchvision-format ResNet
state_dict (docs/DESIGN.md §5), so each stage's output is usable outside this
project, and any torchvision ResNet can be transferred or start a run:
- `backbone_state_dict`: the exported backbone of an expanded model (one
  branch, or the shared backbone) or of a squeezed student, no fc.*;
- `model_from_checkpoint`: the XLearnerModel or SqueezedModel of a run checkpoint;
- `load_backbone`: what transfer.py evaluates, from a .pth, a run checkpoint
  (optionally one branch with its RL inputs, `load_branch_with_rl`), a
  torchvision weights name, or `random`, with the hash that keys its results;
- `check_weights`: model.pretrained / squeeze.student_init checked before a run
  builds anything, `infer_arch`: a state_dict's ResNet from its block layout.
backbone.py reads a state_dict file and loads one into a Backbone.
"""
from __future__ import annotations

import os

import torch
import torchvision

from .run import dist
from .backbone import backbone_from_state_dict, backbone_state_dict, build_backbone, load_torchvision_state_dict, read_state_dict
from .run.checkpoint import load_checkpoint, sha256_file, sha256_text
from .config import ConfigError
from .expand import load_model
from .heads import MultiSourceModel
from .model import BranchWithRL
from .squeeze import load_student

RANDOM_SEED = 0                    # "random" = "random:0"

# blocks per stage (layer1..layer4) of torchvision's ResNets, and whether the block is a Bottleneck
RESNET_LAYOUTS = {((1, 1, 1, 1), False): "resnet10", ((2, 2, 2, 2), False): "resnet18",
                  ((3, 4, 6, 3), False): "resnet34", ((3, 4, 6, 3), True): "resnet50",
                  ((3, 4, 23, 3), True): "resnet101", ((3, 8, 36, 3), True): "resnet152"}


def infer_arch(state: dict) -> str | None:
    """The torchvision ResNet a state_dict belongs to (from its block counts and block type), or None."""
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{l}.")}) for l in range(1, 5))
    return RESNET_LAYOUTS.get((blocks, "layer1.0.conv3.weight" in state))


def load_backbone(spec: str, arch: str, branch: str | None = None, with_rl: bool = False):
    """Build a backbone.Backbone from `spec`; returns (backbone, info).

    spec: a torchvision-format state_dict (.pth), a run checkpoint (expand or
    squeeze, recognised by its "model" and "meta" keys; `branch` picks an
    expand branch, default the first task; `with_rl`: load_branch_with_rl), a
    torchvision weights name such as
    "ResNet18_Weights.IMAGENET1K_V1" (downloaded only in that case), or
    "random" / "random:SEED". info["hash"] identifies the weights and keys the
    feature cache and the finished results: the file's sha256 (with the branch
    for checkpoints), the weights name's, or the seed's. `arch` (model.arch)
    builds "random"; the other specs say their own architecture (a plain
    state_dict by its block layout), so any ResNet can be evaluated with one config.
    """
    if with_rl:
        return load_branch_with_rl(spec, branch)
    info = {"spec": spec, "arch": arch}
    if spec == "random" or spec.startswith("random:"):
        seed = int(spec.split(":", 1)[1]) if ":" in spec else RANDOM_SEED
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = build_backbone(arch)
        # torch's init code is part of what "random" means: a new version is a new backbone
        info.update(seed=seed, hash=sha256_text(f"random:{arch}:{seed}:torch{torch.__version__}"))
        return backbone, info
    if not os.path.exists(spec) and "_Weights." in spec:
        weights = torchvision.models.get_weight(spec)
        arch = spec.split("_Weights.")[0].lower()  # ResNet50_Weights.X -> resnet50
        for downloader in (True, False):  # rank 0 downloads first; the others then read torch's hub cache
            if dist.is_main_process() == downloader:
                state = weights.get_state_dict(progress=downloader)
            dist.barrier()
        info.update(arch=arch, hash=sha256_text(spec))
    else:
        ckpt = load_checkpoint(spec)  # weights_only, with errors that name the file
        info["file_sha256"] = sha256_file(spec)
        if "model" in ckpt and "meta" in ckpt:
            model = model_from_checkpoint(ckpt)
            state = backbone_state_dict(model, branch)
            arch = ckpt["meta"].get("arch", arch)
            if ckpt["meta"].get("kind") == "expanded" and not model.mcfg.shared_backbone:
                branch = branch or model.tasks[0]  # the default branch, named so that the hash is the same
            info.update(arch=arch, kind=ckpt["meta"].get("kind"), branch=branch,
                        hash=sha256_text(f"{info['file_sha256']}:{branch}"))
        else:
            state = ckpt
            arch = infer_arch(state) or arch
            info.update(arch=arch, hash=info["file_sha256"])
    backbone = build_backbone(arch)
    try:  # strict except fc.* (and num_batches_tracked), with an error that names the file
        load_torchvision_state_dict(backbone, state, spec)
    except (ValueError, RuntimeError) as e:  # RuntimeError: load_state_dict's shape mismatches
        raise ConfigError(f"{e} (model.arch is {arch!r}: set it to the backbone's architecture)") from None
    return backbone, info


def load_branch_with_rl(spec: str, branch: str | None = None):
    """`--with-rl`: branch `branch` (default the first task) of an expand checkpoint *with* its RL inputs
    from the other branches, the network it was trained as (model.BranchWithRL); returns (module, info)."""
    ckpt = load_checkpoint(spec) if os.path.isfile(spec) else None
    if ckpt is None or "model" not in ckpt or "meta" not in ckpt:
        what = "a file" if ckpt is None else "not a plain state_dict"
        raise ConfigError(f"{spec}: --with-rl needs an expand run checkpoint ({what})")
    model = model_from_checkpoint(ckpt)
    kind = ckpt["meta"].get("kind")
    if kind != "expanded" or model.mcfg.shared_backbone:
        raise ConfigError(f"{spec}: --with-rl needs an expand checkpoint with one branch per task, not a "
                          f"{'shared-backbone ' if model.mcfg.shared_backbone else ''}{kind} one")
    branch, arch, file_sha256 = branch or model.tasks[0], ckpt["meta"]["arch"], sha256_file(spec)
    info = {"spec": spec, "arch": arch, "file_sha256": file_sha256, "kind": kind, "branch": branch, "with_rl": True,
            "hash": sha256_text(f"{file_sha256}:{branch}:with-rl")}
    return BranchWithRL(model.backbone, branch, arch).eval(), info


def check_weights(spec: str, arch: str, key: str) -> None:
    """Fail fast on model.pretrained / squeeze.student_init: a torchvision weights name of `arch`, or a
    file holding a torchvision-format state_dict of `arch` (otherwise the model build fails later)."""
    if not os.path.exists(spec) and "_Weights." in spec:
        try:  # resolving the name downloads nothing
            torchvision.models.get_weight(spec)
        except (ValueError, KeyError, AttributeError) as e:
            raise ConfigError(f"{key} = {spec!r}: not a torchvision weights name ({e})") from None
        if spec.split("_Weights.")[0].lower() != arch:
            raise ConfigError(f"{key} = {spec!r}: weights of another architecture than model.arch = {arch!r}")
        return
    if not os.path.isfile(spec):
        raise ConfigError(f"{key} = {spec!r}: no such file (nor a torchvision weights name "
                          "such as 'ResNet50_Weights.IMAGENET1K_V2')")
    try:
        state = read_state_dict(spec)  # ValueError naming the file
        found = infer_arch(state)
        if found not in (None, arch):
            raise ValueError(f"{spec} holds a {found} state_dict, but model.arch = {arch!r}")
        backbone_from_state_dict(arch, state, False, spec)  # any other missing or unexpected key
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def model_from_checkpoint(ckpt: dict) -> MultiSourceModel:
    """Rebuild the model of a run checkpoint {"model", "config", "meta"} and load its weights (eval mode).

    An expand checkpoint gives an XLearnerModel (expand.load_model), a squeeze one a SqueezedModel
    (squeeze.load_student)."""
    for key in ("model", "config", "meta"):
        if key not in ckpt:
            raise ValueError(f"not a run checkpoint: no {key!r} entry (keys: {sorted(ckpt)})")
    loaders = {"expanded": load_model, "squeezed": load_student}
    kind = ckpt["meta"].get("kind")
    if kind not in loaders:
        raise ValueError(f"checkpoint meta.kind: expected 'expanded' or 'squeezed', got {kind!r}")
    return loaders[kind](ckpt)
