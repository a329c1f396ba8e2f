"""Run configuration: one TOML file describes a whole X-Learner run.

The file has a `[model]` table, one `[[sources]]` table per upstream source,
`[expand]` and `[squeeze]` tables for the two training stages, and a
`[transfer]` table with its `[[transfer.datasets]]` (DESIGN.md §3). It is read
with the standard library's `tomllib` into the dataclasses below, so every
key, its type and its default is written down in exactly one place.

Unknown keys and wrong types fail at load time with the dotted key named;
`--set expand.steps=50` overrides any key with the same type checks. The
resolved config is saved as JSON next to every checkpoint (`to_dict`).
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

TASKS = ("cls", "det", "seg")
FORMATS = ("imagefolder", "csv", "coco", "masks", "torchvision")


class ConfigError(ValueError):
    """A config problem; the message always names the file or the key."""


@dataclass
class ModelConfig:
    arch: str = "resnet18"              # torchvision ResNet name (resnet18/34/50/101/152)
    pretrained: str = ""                # "", a state_dict path, or a torchvision weights name
    tasks: list[str] = field(default_factory=lambda: ["cls", "det", "seg"])
    reconcile: str = "hrnet"            # hrnet | scalar | cross_stitch | none
    reconcile_stages: list[int] = field(default_factory=lambda: [1, 2, 3])
    reconcile_detach: bool = True       # stop gradients into the other branches
    reconcile_width: float = 1.0        # hrnet: 1.0 = HRNet's full-width fuse paths; < 1 runs every path
                                        # at width * C_l channels, summed, then one shared 1x1 widening
                                        # (1/16 cuts the ResNet-50 RL from 6.8 to 0.63 GMACs; recipes use it)
    shared_backbone: bool = False       # SSMT ablation: one backbone shared by every task
    frozen_bn: bool = False             # FrozenBatchNorm2d in the backbone (detection practice)
    channels_last: bool = False         # memory format for GPU runs
    compile: bool = False               # torch.compile the backbone stages (measured: see README)
    det_head: str = "faster_rcnn"       # faster_rcnn (FPN + RPN + RoIHeads)
    seg_head: str = "fpn"               # fpn | deeplab
    # Detection sizes. torchvision's defaults suit 800 px images on GPUs; the
    # demo config shrinks them (17x cheaper on CPU at 128 px).
    fpn_channels: int = 256
    rpn_pre_nms_top_n: int = 2000       # per image, train; eval uses half
    rpn_post_nms_top_n: int = 2000      # per image, train; eval uses half (torchvision: 2000 / 1000)
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512 # RoIs sampled per image
    box_head_dim: int = 1024            # TwoMLPHead width
    box_detections_per_img: int = 100
    seg_channels: int = 128             # width of the seg FPN decoder


@dataclass
class SourceConfig:
    name: str = ""
    task: str = "cls"                   # cls | det | seg
    format: str = "imagefolder"         # imagefolder | csv | coco | masks | torchvision
    train: str = ""                     # split dir (imagefolder/masks), csv file, or coco image dir
    val: str = ""
    train_ann: str = ""                 # coco instances JSON for train
    val_ann: str = ""
    num_classes: int = 0                # 0 = read it from the data
    batch_size: int = 8                 # per process
    weight: float = 1.0                 # w_s in L = sum_s w_s L_s
    image_size: int = 224               # train/eval size (shorter side for det)
    multi_label: bool = False           # cls: BCE instead of softmax CE
    ignore_index: int = 255             # seg: label of pixels that carry no loss
    # format = "torchvision": a torchvision.datasets class by name
    root: str = ""
    train_split: str = "train"
    val_split: str = "test"
    download: bool = False              # never fetch unless the user asks
    # transfer datasets only; empty/None means "take it from [transfer]"
    metric: str = "top1"                # top1 | mean_per_class (cls)
    protocol: str = ""                  # linear | finetune
    train_fraction: Optional[float] = None
    freeze_backbone: Optional[bool] = None
    epochs: Optional[int] = None


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 0.02
    optimizer: str = "sgd"              # sgd | adamw (no weight decay on norms and biases)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100             # linear warmup, then cosine to 0
    amp: str = "off"                    # off | bf16 | fp16 (fp16 uses a GradScaler)
    grad_accum: int = 1                 # micro-batches per optimiser step
    clip_grad: float = 0.0              # max grad norm; 0 = off
    sync_bn: bool = False               # SyncBatchNorm (CUDA only)
    eval_every: int = 0                 # 0 = only at the end
    ckpt_every: int = 200
    log_every: int = 20
    workers: int = 2                    # DataLoader workers per source
    seed: int = 0
    out: str = "runs/expand"


@dataclass
class SqueezeConfig(TrainConfig):
    out: str = "runs/squeeze"
    student_init: str = ""              # task:<name> (default: first task) | mean | scratch | path
    distill_stages: list[int] = field(default_factory=lambda: [2, 3, 4])
    distill_loss: str = "l2"            # l2 on channel-normalised maps | cka
    lambda_task: float = 1.0            # weight of each source's own task loss
    lambda_feat: float = 1.0
    lambda_kd: float = 1.0
    kd_temperature: float = 4.0


@dataclass
class TransferConfig:
    protocol: str = "linear"            # linear | finetune (cls); det/seg always train a head
    train_fraction: float = 1.0         # class-stratified subset of train (0.1 = low-data regime)
    freeze_backbone: bool = True        # det/seg: GV-B protocol freezes the backbone
    epochs: int = 10                    # finetune / det / seg epochs
    lr: float = 0.01
    clip_grad: float = 10.0             # max global grad norm in det / seg / finetune training (0 = off):
    #                                     a det head on weak frozen features went to nan once without it
    batch_size: int = 32
    seeds: list[int] = field(default_factory=lambda: [0])
    l2_grid: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0])
    workers: int = 2
    out: str = "runs/transfer"
    datasets: list[SourceConfig] = field(default_factory=list)


@dataclass
class AblateConfig:
    """`python cli.py ablate`: the paper's comparison in miniature (README, "The miniature table")."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: list[str] = field(default_factory=lambda: [
        "ssst", "ssmt", "expand_norl", "expand_rl", "xlearner", "squeeze_norl"])
    ssst_source: str = ""               # the single source of SSST; default: the first cls source
    out: str = "runs/ablate"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sources: list[SourceConfig] = field(default_factory=list)
    expand: TrainConfig = field(default_factory=TrainConfig)
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise ConfigError(f"no source named {name!r}; sources are {[s.name for s in self.sources]}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ----------------------------------------------------------------------------
# dict -> dataclass with type checks

def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return `value` coerced to `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, args[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return _from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # a bug in this file, not in the TOML


def _from_dict(cls, data: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (known keys: {', '.join(sorted(names))})")
    kwargs = {k: _check_type(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    for t in cfg.model.tasks:
        if t not in TASKS:
            raise ConfigError(f"model.tasks: unknown task {t!r} (choose from {TASKS})")
    if not 0 < cfg.model.reconcile_width <= 1:
        raise ConfigError(f"model.reconcile_width: must be in (0, 1], got {cfg.model.reconcile_width}")
    seen = set()
    all_sources = [("sources", s) for s in cfg.sources] + [("transfer.datasets", s) for s in cfg.transfer.datasets]
    for where, s in all_sources:
        if not s.name:
            raise ConfigError(f"{where}: every source needs a name")
        if s.task not in TASKS:
            raise ConfigError(f"{where}.{s.name}.task: unknown task {s.task!r} (choose from {TASKS})")
        if s.format not in FORMATS:
            raise ConfigError(f"{where}.{s.name}.format: unknown format {s.format!r} (choose from {FORMATS})")
        if where == "sources":
            if s.name in seen:
                raise ConfigError(f"sources: duplicate source name {s.name!r}")
            seen.add(s.name)
            if s.task not in cfg.model.tasks:
                raise ConfigError(f"sources.{s.name}.task: {s.task!r} is not in model.tasks {cfg.model.tasks}")
    for amp_key in ("expand", "squeeze"):
        tc = getattr(cfg, amp_key)
        if tc.amp not in ("off", "bf16", "fp16"):
            raise ConfigError(f"{amp_key}.amp: expected off|bf16|fp16, got {tc.amp!r}")
        if tc.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"{amp_key}.optimizer: expected sgd|adamw, got {tc.optimizer!r}")
        if tc.grad_accum < 1:
            raise ConfigError(f"{amp_key}.grad_accum: must be >= 1, got {tc.grad_accum}")


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. expand.steps=50")
    key, raw = text.split("=", 1)
    try:  # TOML literal first (numbers, booleans, lists, quoted strings) ...
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # ... else a bare string such as expand.out=runs/x
    return key.strip().split("."), value


def apply_override(data: dict, text: str) -> None:
    """Apply one `a.b=value` to the raw TOML dict. `sources.NAME.key` addresses a source by name."""
    path, value = _parse_override(text)
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):  # a list of named tables: pick by name
            match = [t for t in node if t.get("name") == part]
            if not match:
                raise ConfigError(f"--set {text}: no entry named {part!r} under {'.'.join(path[:i])}")
            node = match[0]
        else:
            node = node.setdefault(part, [] if part in ("sources", "datasets") else {})
    if isinstance(node, list):
        raise ConfigError(f"--set {text}: address a source as sources.NAME.key")
    node[path[-1]] = value


def load_config(path: str | Path | None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Read a TOML file (or nothing: defaults), apply `--set` overrides, type-check, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: malformed TOML: {e}") from None
    for o in overrides:
        apply_override(data, o)
    try:
        cfg = _from_dict(Config, data, "")
        _validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. stored in a checkpoint)."""
    cfg = _from_dict(Config, data, "")
    _validate(cfg)
    return cfg
