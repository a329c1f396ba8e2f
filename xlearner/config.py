"""Run configuration: one TOML file describes a whole X-Learner run (docs/DESIGN.md §3).

`[model]`, one `[[sources]]` per upstream source, `[expand]`, `[squeeze]`, and `[transfer]` with its
`[[transfer.datasets]]`: the dataclasses below (configfile.py reads a TOML file
into them): every key, its type and its default is written down in exactly one place. Unknown keys,
wrong types and bad values (the `_validate_*` functions) fail at load time, before any torch import, naming the file,
the dotted key, the value and what is allowed; a legal but probably unintended value prints one
warning. `--set expand.steps=50` overrides any key with the same checks. The resolved config is
saved as JSON next to every checkpoint (`to_dict`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

TASKS = ("cls", "det", "seg")
FORMATS = ("imagefolder", "csv", "coco", "masks", "ade20k", "cityscapes", "torchvision")
# formats whose files are found from `root` and the split names train_split / val_split (not `train` / `val`)
ROOT_FORMATS = ("cityscapes", "torchvision")
# formats with a fixed label space (formats/files.py / formats/tvdatasets.py read them; num_classes may only repeat it)
FIXED_CLASSES = {"ade20k": 150, "cityscapes": 19}
# the keys of a [[sources]] / [[transfer.datasets]] entry that are paths: relative ones resolve against data_root
PATH_KEYS = ("train", "val", "train_ann", "val_ann", "root")


class ConfigError(ValueError):
    """A config problem; the message always names the file or the key."""


@dataclass
class ModelConfig:
    arch: str = "resnet18"              # resnet10 (torchvision's ResNet, 1 BasicBlock a stage) | resnet18/34/50/101/152
    pretrained: str = ""                # "", a state_dict path, or a torchvision weights name
    tasks: list[str] = field(default_factory=lambda: ["cls", "det", "seg"])
    reconcile: str = "hrnet"            # hrnet | scalar | cross_stitch | none
    reconcile_stages: list[int] = field(default_factory=lambda: [1, 2, 3])
    reconcile_detach: bool = True       # stop gradients into the other branches
    branch_init: str = "independent"    # independent: each branch its own random draw | shared: one draw (or
                                        # `pretrained`) copied into every branch, so the branches share their start
    reconcile_width: float = 1.0        # hrnet: 1.0 = HRNet's full-width fuse paths; < 1 runs every path at width * C_l
                                        # channels, summed, then one 1x1 widening (1/16: R50's RL 6.8 -> 0.63 GMACs)
    other_branches_bn: str = "batch"    # BN of the branches an image's task does not own (they feed the RLs): "batch"
                                        # statistics or their own "running" ones; neither updates their buffers
    shared_backbone: bool = False       # MSMT (hard sharing) ablation: one backbone shared by every task
    frozen_bn: bool = False             # FrozenBatchNorm2d in the backbone (detection practice)
    channels_last: bool = False         # memory format for GPU runs
    compile: bool = False               # torch.compile the backbone stages (measured: docs/OPERATIONS.md, "Full scale")
    seg_head: str = "fpn"               # fpn | deeplab (det is always Faster R-CNN: FPN + RPN + RoIHeads)
    # Detection sizes: torchvision's defaults suit 800 px images on GPUs (the demo's are 17x cheaper on CPU)
    fpn_channels: int = 256
    rpn_pre_nms_top_n: int = 2000       # per image, train; eval uses half
    rpn_post_nms_top_n: int = 2000      # per image, train; eval uses half (torchvision: 2000 / 1000)
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512 # RoIs sampled per image
    box_head_dim: int = 1024            # TwoMLPHead width
    box_detections_per_img: int = 100
    seg_channels: int = 128             # width of the seg FPN decoder


@dataclass
class DataConfig:
    """One labelled dataset on disk: what an upstream source and a transfer dataset both say about their data."""
    name: str = ""
    task: str = "cls"                   # cls | det | seg
    format: str = "imagefolder"         # imagefolder | csv | coco | masks | ade20k | cityscapes | torchvision
    train: str = ""                     # split dir (imagefolder/masks), csv file, coco image dir, or the
                                        # ADEChallengeData2016 folder (ade20k: train and val both name it, or root)
    val: str = ""
    train_ann: str = ""                 # coco instances JSON for train
    val_ann: str = ""
    num_classes: int = 0                # 0 = read it from the data
    batch_size: int = 8                 # per process
    image_size: int = 224               # train/eval size (shorter side for det)
    multi_label: bool = False           # cls: BCE instead of softmax CE
    ignore_index: int = 255             # seg: label of pixels that carry no loss
    metric: str = "top1"                # top1 | the task's own (cls: mean_per_class; see primary_metric)
    # format = "torchvision": a torchvision.datasets class by name; "cityscapes": torchvision's Cityscapes
    root: str = ""
    train_split: str = "train"
    val_split: str = "test"
    download: bool = False              # never fetch unless the user asks


@dataclass
class SourceConfig(DataConfig):
    """One [[sources]] entry: a dataset the expansion and the squeeze train on."""
    weight: float = 1.0                 # w_s in L = sum_s w_s L_s


@dataclass
class TransferDatasetConfig(DataConfig):
    """One [[transfer.datasets]] entry: a downstream dataset; empty / None means "take it from [transfer]"."""
    protocol: str = ""                  # linear | finetune
    train_fraction: Optional[float] = None
    dev_fraction: Optional[float] = None
    # cls: one fixed class-stratified subset of that many images (0 = all), the same for every seed and backbone
    train_subset: int = 0
    val_subset: int = 0
    freeze_backbone: Optional[bool] = None
    epochs: Optional[int] = None


def as_source(d: DataConfig) -> SourceConfig:
    """A transfer dataset as the one source of a model that trains a head on it (weight 1)."""
    return SourceConfig(**{f.name: getattr(d, f.name) for f in dataclasses.fields(DataConfig)})


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
    sync_bn: bool = False               # SyncBatchNorm (CUDA, several processes)
    cudnn_benchmark: bool = False       # cuDNN autotuning (CUDA): faster fixed shapes; each new det image size re-tunes
    sync_bn_no_grad: bool = True        # also sync the BNs of a forward under no_grad (the other branches feeding the
                                        # RLs): false syncs only where a BN learns (dist.GradSyncBatchNorm), not measured yet
    eval_every: int = 0                 # 0 = only at the end
    ckpt_every: int = 200
    log_every: int = 20
    workers: int = 2                    # DataLoader workers per source
    seed: int = 0
    out: str = "runs/expand"


@dataclass
class SqueezeConfig(TrainConfig):
    out: str = "runs/squeeze"
    student_init: str = ""              # task:<name> (default: first task) | mean (needs branches that share their
                                        # start: model.branch_init = "shared" or model.pretrained) | scratch | path
    # The defaults are the recipe chosen on dev splits (docs/ablation/README.md); the first recipe was
    # distill_targets = "own", teacher_norm = "none", distill_stages = [2, 3, 4], distill_loss = "l2", heads = "copy".
    distill_targets: str = "all"        # own: branch t on task-t images | all: every branch on every image (+ every head's KD)
    distill_stages: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    distill_loss: str = "cos_smoothl1"  # l2 on channel-normalised maps | cka | cos_smoothl1 (1 - cos + smooth L1)
    teacher_norm: str = "standardize"   # none | standardize: teacher features per channel to mean 0, std 1
    norm_steps: int = 20                # standardize: loader steps (a batch of every source) that estimate the statistics
    heads: str = "frozen"               # the student's task heads: copy (trainable) | frozen (the teacher's) | fresh
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
    clip_grad: float = 10.0             # max grad norm, det/seg/finetune (0 = off); a det head went nan without
    batch_size: int = 32
    seeds: list[int] = field(default_factory=lambda: [0])
    l2_grid: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0])
    dev_fraction: float = 0.0           # > 0: score on a fixed dev split of train (this fraction), train on the rest;
                                        # for choosing settings without ever reading val
    workers: int = 2
    out: str = "runs/transfer"
    datasets: list[TransferDatasetConfig] = field(default_factory=list)


@dataclass
class Config:
    data_root: str = ""                 # relative data paths of [[sources]] / [[transfer.datasets]] resolve
                                        # against it when the config loads; "" = the working directory
    dist_timeout_min: float = 30.0      # how long a collective waits for the slowest rank before the job aborts
                                        # (torch.distributed's timeout): longer than any rank-0-only work
    model: ModelConfig = field(default_factory=ModelConfig)
    sources: list[SourceConfig] = field(default_factory=list)
    expand: TrainConfig = field(default_factory=TrainConfig)
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)

    def to_dict(self) -> dict:
        """Plain dicts and lists (JSON-able): what a checkpoint stores; config_from_dict reads it back."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------
# value checks: ranges, allowed names, cross-field rules (load time, no torch, no disk)

# The names the code accepts: their one list. config.py imports no torch, so the implementations
# (backbone.BACKBONES, model.RECONCILE, heads.SEG_DECODERS, squeeze.FEATURE_LOSSES) are
# Registry objects built against these tuples, and a name missing or extra there fails at import.
ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
RECONCILES = ("hrnet", "scalar", "cross_stitch", "none")
SEG_HEADS = ("fpn", "deeplab")
OTHER_BNS = ("batch", "running")
BRANCH_INITS = ("independent", "shared")
DISTILL_LOSSES = ("l2", "cka", "cos_smoothl1")
DISTILL_TARGETS = ("own", "all")
TEACHER_NORMS = ("none", "standardize")
STUDENT_HEADS = ("copy", "frozen", "fresh")
PROTOCOLS = ("linear", "finetune")
FORMAT_TASKS = {"imagefolder": ("cls",), "csv": ("cls",), "coco": ("det",), "masks": ("seg",), "ade20k": ("seg",),
                "cityscapes": ("seg",), "torchvision": TASKS}
# Measured on CPU (ResNet-18/50, every task): image_size >= 1 trains with 2+ images per batch (0 crashes). With ONE
# image per batch, training BN needs 2+ values per channel: layer4 (stride 32) is one pixel up to 32 px.
MIN_IMAGE_SIZE = 1
MIN_IMAGE_SIZE_BATCH1 = 33


def check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {rule}, got {value!r}")


def one_of(value: Any, key: str, allowed) -> None:
    """The one check of a name: config validation, and the constructors that take the name directly, call it."""
    check(value in allowed, key, f"expected {'|'.join(allowed)}", value)


class Registry(dict):
    """name -> implementation, for the names allowed under `key` (e.g. model.RECONCILE for model.reconcile).

    Built against the names' tuple in this module (tools/ablate_config.py's for the ablation's variants), which
    stays their one list: an implementation missing or extra raises when its module is imported, and looking up
    an unknown name raises validation's own line."""

    def __init__(self, key: str, names: tuple[str, ...], **implementations):
        if sorted(implementations) != sorted(names):
            raise TypeError(f"{key}: implemented {sorted(implementations)}, the config allows {sorted(names)}")
        super().__init__(implementations)
        self.key = key

    def __missing__(self, name: str):
        one_of(name, self.key, tuple(self))


def _at_least(obj, prefix: str, low: int | float, *names: str) -> None:
    for n in names:
        check(getattr(obj, n) >= low, f"{prefix}.{n}", f"must be >= {low}", getattr(obj, n))


def _stages(stages: list[int], key: str, allow_empty: bool) -> None:
    check(allow_empty or bool(stages), key, "needs at least one stage", stages)
    for l in stages:
        check(1 <= l <= 4, key, "stages are 1..4 (layer1..layer4)", stages)


def _validate_model(m: ModelConfig) -> None:
    one_of(m.arch, "model.arch", ARCHS)
    check(bool(m.tasks) and len(set(m.tasks)) == len(m.tasks), "model.tasks", "expected distinct tasks", m.tasks)
    for t in m.tasks:
        one_of(t, "model.tasks", TASKS)
    one_of(m.reconcile, "model.reconcile", RECONCILES)
    _stages(m.reconcile_stages, "model.reconcile_stages", allow_empty=True)
    check(0 < m.reconcile_width <= 1, "model.reconcile_width", "must be in (0, 1]", m.reconcile_width)
    one_of(m.other_branches_bn, "model.other_branches_bn", OTHER_BNS)
    one_of(m.branch_init, "model.branch_init", BRANCH_INITS)
    one_of(m.seg_head, "model.seg_head", SEG_HEADS)
    _at_least(m, "model", 1, "fpn_channels", "rpn_pre_nms_top_n", "rpn_post_nms_top_n", "rpn_batch_size_per_image",
              "box_batch_size_per_image", "box_head_dim", "box_detections_per_img", "seg_channels")


def own_metric(s: DataConfig) -> str:
    """The task's own metric for this source: what `metric` may ask for besides "top1"."""
    return {"cls": "mAP" if s.multi_label else "mean_per_class", "det": "AP", "seg": "mIoU"}[s.task]


def primary_metric(s: DataConfig) -> str:
    """The key of evaluate.evaluate's result that a table reports for this source: top1 for single-label cls
    unless `metric` asks for mean_per_class, the task's own metric otherwise."""
    return "top1" if s.task == "cls" and not s.multi_label and s.metric != "mean_per_class" else own_metric(s)


def _validate_data(s: DataConfig, key: str, trains: bool, m: ModelConfig) -> None:
    """What a [[sources]] and a [[transfer.datasets]] entry share; `trains`: its batches train BatchNorm layers."""
    one_of(s.task, f"{key}.task", TASKS)
    one_of(s.format, f"{key}.format", FORMATS)
    check(s.task in FORMAT_TASKS[s.format], f"{key}.format", f"format {s.format!r} holds "
          f"{'|'.join(FORMAT_TASKS[s.format])} data, not task {s.task!r}", s.format)
    _at_least(s, key, 0, "num_classes")
    fixed = FIXED_CLASSES.get(s.format)
    check(not fixed or s.num_classes in (0, fixed), f"{key}.num_classes", f"format {s.format!r} has {fixed} classes "
          "(0 or omitted means the same)", s.num_classes)
    check(s.format != "cityscapes" or s.val_split != "test", f"{key}.val_split",
          "Cityscapes' test labels are not public: use val_split = \"val\"", s.val_split)
    _at_least(s, key, 1, "batch_size")
    _at_least(s, key, MIN_IMAGE_SIZE, "image_size")
    check(0 <= s.ignore_index <= 255, f"{key}.ignore_index", "must be in [0, 255] (a label value of a uint8 mask)",
          s.ignore_index)
    one_of(s.metric, f"{key}.metric", ("top1", own_metric(s)))
    if trains and s.batch_size == 1:
        check(s.image_size >= MIN_IMAGE_SIZE_BATCH1, f"{key}.image_size", f"must be >= {MIN_IMAGE_SIZE_BATCH1} "
              "with batch_size = 1 (training BatchNorm needs more than one value per channel at layer4)", s.image_size)
        check(not (s.task == "seg" and m.seg_head == "deeplab"), f"{key}.batch_size",
              "must be >= 2 with model.seg_head = 'deeplab' (its image-pooling BatchNorm sees one value per image)", 1)


def _validate_transfer_dataset(d: TransferDatasetConfig, key: str) -> None:
    one_of(d.protocol, f"{key}.protocol", ("",) + PROTOCOLS)
    check(d.train_fraction is None or 0 < d.train_fraction <= 1, f"{key}.train_fraction", "must be in (0, 1]",
          d.train_fraction)
    check(d.epochs is None or d.epochs >= 1, f"{key}.epochs", "must be >= 1", d.epochs)
    check(d.dev_fraction is None or 0 <= d.dev_fraction <= 0.5, f"{key}.dev_fraction", "must be in [0, 0.5]",
          d.dev_fraction)
    _at_least(d, key, 0, "train_subset", "val_subset")
    check(d.task == "cls" or not (d.train_subset or d.val_subset), f"{key}.train_subset",
          "train_subset / val_subset are for cls datasets (a class-stratified subset)", [d.train_subset, d.val_subset])


def _validate_sources(cfg: Config) -> None:
    seen: set[tuple[str, str]] = set()
    for where, entries in (("sources", cfg.sources), ("transfer.datasets", cfg.transfer.datasets)):
        for s in entries:
            check(bool(s.name) and "." not in s.name, f"{where}.name", "every entry needs a name without '.'", s.name)
            check((where, s.name) not in seen, f"{where}.{s.name}", "duplicate name", s.name)
            seen.add((where, s.name))
            key = f"{where}.{s.name}"
            if where == "sources":  # upstream sources always train
                _validate_data(s, key, True, cfg.model)
                _at_least(s, key, 0, "weight")
                check(s.task in cfg.model.tasks, f"{key}.task", f"must be in model.tasks {cfg.model.tasks}", s.task)
            else:  # a transfer dataset trains unless it is a linear probe
                _validate_data(s, key, s.task != "cls" or (s.protocol or cfg.transfer.protocol) == "finetune",
                               cfg.model)
                _validate_transfer_dataset(s, key)
    check(not cfg.sources or any(s.weight > 0 for s in cfg.sources), "sources.weight",
          "at least one source needs a weight > 0", [s.weight for s in cfg.sources])


def _validate_train(tc: TrainConfig, key: str) -> list[str]:
    """expand / squeeze; returns warnings (values that run but are probably not meant)."""
    _at_least(tc, key, 1, "steps", "grad_accum")
    check(tc.lr > 0, f"{key}.lr", "must be > 0", tc.lr)
    one_of(tc.optimizer, f"{key}.optimizer", ("sgd", "adamw"))
    check(0 <= tc.momentum < 1, f"{key}.momentum", "must be in [0, 1)", tc.momentum)
    one_of(tc.amp, f"{key}.amp", ("off", "bf16", "fp16"))
    _at_least(tc, key, 0, "weight_decay", "warmup_steps", "clip_grad", "eval_every", "ckpt_every", "log_every",
              "workers", "seed")
    check(bool(tc.out), f"{key}.out", "needs a directory", tc.out)
    if tc.warmup_steps >= tc.steps:
        return [f"{key}.warmup_steps = {tc.warmup_steps} >= {key}.steps = {tc.steps}: "
                "the whole run is warmup (no cosine decay)"]
    return []


def branches_share_start(m: ModelConfig) -> bool:
    """Whether the expanded branches start from the same weights: the condition for averaging them."""
    return m.branch_init == "shared" or bool(m.pretrained) or m.shared_backbone


def _validate_squeeze(sq: SqueezeConfig, m: ModelConfig) -> None:
    if sq.student_init.startswith("task:"):
        one_of(sq.student_init[len("task:"):], "squeeze.student_init (task:<name>)", m.tasks)
    # anything else but mean / scratch is a state_dict path, checked on disk when the squeeze starts
    # student_init = "mean" is checked against the teacher's own model config when the squeeze starts
    # (squeeze.init_student_backbone): the teacher checkpoint, not this file, says where its branches started
    _stages(sq.distill_stages, "squeeze.distill_stages", allow_empty=False)
    one_of(sq.distill_loss, "squeeze.distill_loss", DISTILL_LOSSES)
    one_of(sq.distill_targets, "squeeze.distill_targets", DISTILL_TARGETS)
    one_of(sq.teacher_norm, "squeeze.teacher_norm", TEACHER_NORMS)
    one_of(sq.heads, "squeeze.heads", STUDENT_HEADS)
    _at_least(sq, "squeeze", 1, "norm_steps")
    _at_least(sq, "squeeze", 0, "lambda_task", "lambda_feat", "lambda_kd")
    check(sq.lambda_task + sq.lambda_feat + sq.lambda_kd > 0, "squeeze.lambda_task/lambda_feat/lambda_kd",
          "at least one must be > 0", [sq.lambda_task, sq.lambda_feat, sq.lambda_kd])
    check(sq.kd_temperature > 0, "squeeze.kd_temperature", "must be > 0", sq.kd_temperature)


def _validate_transfer(tc: TransferConfig) -> None:
    one_of(tc.protocol, "transfer.protocol", PROTOCOLS)
    check(0 < tc.train_fraction <= 1, "transfer.train_fraction", "must be in (0, 1]", tc.train_fraction)
    _at_least(tc, "transfer", 1, "epochs", "batch_size")
    check(tc.lr > 0, "transfer.lr", "must be > 0", tc.lr)
    _at_least(tc, "transfer", 0, "clip_grad", "workers")
    check(bool(tc.out), "transfer.out", "needs a directory", tc.out)
    check(bool(tc.l2_grid) and min(tc.l2_grid) >= 0, "transfer.l2_grid", "needs values >= 0", tc.l2_grid)
    check(0 <= tc.dev_fraction <= 0.5, "transfer.dev_fraction", "must be in [0, 0.5]", tc.dev_fraction)
    check_seeds(tc.seeds, "transfer.seeds")


def check_seeds(seeds: list[int], key: str) -> None:
    check(bool(seeds) and min(seeds) >= 0 and len(set(seeds)) == len(seeds), key, "needs distinct seeds >= 0", seeds)


def check_tasks_have_sources(m: ModelConfig, sources: list[SourceConfig]) -> None:
    """Every task of model.tasks needs a source, or its branch and head get no gradient (DDP fails). Checked
    when a stage builds its model, not at load time: a transfer-only config has no [[sources]]."""
    missing = [t for t in m.tasks if not any(s.task == t for s in sources)]
    if missing:
        raise ConfigError(f"model.tasks lists {missing} but no [[sources]] has that task; "
                          "remove it from model.tasks or add a source")


def validate(cfg: Config) -> list[str]:
    """Raise ConfigError naming the first bad key (what it is, what is allowed); return the warnings."""
    check(cfg.dist_timeout_min > 0, "dist_timeout_min", "must be > 0 (minutes)", cfg.dist_timeout_min)
    _validate_model(cfg.model)
    _validate_sources(cfg)
    warnings = _validate_train(cfg.expand, "expand") + _validate_train(cfg.squeeze, "squeeze")
    _validate_squeeze(cfg.squeeze, cfg.model)
    _validate_transfer(cfg.transfer)
    return warnings
