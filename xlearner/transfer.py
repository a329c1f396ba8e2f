"""Transfer evaluation: how a backbone is judged, the last step of the method.

X-Learner's claim is a representation that transfers: +3.0 (cls), +3.3 (det)
and +1.8 (seg) points over existing pre-trained models on 12 downstream
datasets (DESIGN.md §1, "Transfer"). This module turns any backbone (the
squeezed student, one branch of an expanded model, a torchvision state_dict, a
torchvision weights name, or `random`) into those numbers:

- cls, `linear` (the default): the backbone is frozen and only measures
  features. Global-average-pooled layer4 features are extracted once (eval
  transforms) and cached on disk; a multinomial logistic regression is fit with
  full-batch L-BFGS, its L2 strength chosen on a held-out 20% of train, then
  refit on all of train. No augmentation and no SGD schedule to tune, so the
  score reflects the features, and the probe costs little next to extraction.
- cls, `finetune`: backbone + linear layer trained end to end with SGD.
- det: torchvision Faster R-CNN + FPN (model.py's det head) over the backbone,
  frozen (the GV-B protocol) or fine-tuned; COCO AP / AP50 / AP75.
- seg: model.py's seg head over the backbone, frozen or fine-tuned; mIoU.

`run()` evaluates every backbone on every `[[transfer.datasets]]` entry for
every seed and writes results.json and results.md: datasets as rows, backbones
as columns, per-task means and the gain of each backbone over the first, the
shape of the paper's headline. The style follows DINO's eval_linear.py: one
file, plain loops, no framework.

Details a user may need:
- Features are cached at <out>/cache/<backbone hash[:16]>_<dataset hash[:16]>_<split>.pt;
  the cache holds the full train split, so train_fraction and seeds reuse it.
- train_fraction keeps a seeded, class-stratified subset (cls) or a seeded
  random image subset (det/seg); each seed of `transfer.seeds` draws its own.
- Batch size: the dataset's `batch_size` for training and evaluation; the
  extraction uses max(that, transfer.batch_size) since it does not change features.
- Under torchrun, extraction is sharded and gathered (the probe then runs
  identically on every rank), the trained protocols use DDP, and only rank 0
  writes files and prints.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from . import data, dist
from .checkpoint import CheckpointError, load_checkpoint, save_atomic
from .config import Config, ConfigError, ModelConfig, SourceConfig, TransferConfig
from .evaluate import evaluate, mean_per_class_accuracy, primary_metric

FEATURE_RECIPE = "gap-layer4-v1"   # part of the cache key: bump it if the features change
PROBE_MAX_ITER = 100               # L-BFGS iterations of the final fit
PROBE_SWEEP_ITER = 40              # ... of each held-out fit of the sweep (it only has to rank the L2 values)
WEIGHT_DECAY = 1e-4                # finetune / det / seg SGD
RANDOM_SEED = 0                    # "random" = "random:0"


# ----------------------------------------------------------------------------
# backbones

def _sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def load_backbone(spec: str, arch: str, branch: str | None = None):
    """Build a model.Backbone from `spec`; returns (backbone, info).

    spec: a torchvision-format state_dict (.pth), a run checkpoint (expand or
    squeeze, recognised by its "model" and "meta" keys; `branch` picks an
    expand branch, default the first task), a torchvision weights name such as
    "ResNet18_Weights.IMAGENET1K_V1" (downloaded only in that case), or
    "random" / "random:SEED". info["hash"] identifies the weights and keys the
    feature cache: the file's sha256 (with the branch for checkpoints), the
    weights name's, or the seed's.
    """
    from .model import backbone_state_dict, build_backbone, load_torchvision_state_dict, model_from_checkpoint

    info = {"spec": spec, "arch": arch}
    if spec == "random" or spec.startswith("random:"):
        seed = int(spec.split(":", 1)[1]) if ":" in spec else RANDOM_SEED
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = build_backbone(arch)
        # torch's init code is part of what "random" means: a new version is a new backbone
        info.update(seed=seed, hash=_sha256_text(f"random:{arch}:{seed}:torch{torch.__version__}"))
        return backbone, info
    if not os.path.exists(spec) and "_Weights." in spec:
        import torchvision
        weights = torchvision.models.get_weight(spec)
        arch = spec.split("_Weights.")[0].lower()  # ResNet50_Weights.X -> resnet50
        for downloader in (True, False):  # rank 0 downloads first; the others then read torch's hub cache
            if dist.is_main_process() == downloader:
                state = weights.get_state_dict(progress=downloader)
            dist.barrier()
        info.update(arch=arch, hash=_sha256_text(spec))
    else:
        ckpt = load_checkpoint(spec)  # weights_only, with errors that name the file
        info["file_sha256"] = _sha256_file(spec)
        if "model" in ckpt and "meta" in ckpt:
            model = model_from_checkpoint(ckpt)
            state = backbone_state_dict(model, branch)
            arch = ckpt["meta"].get("arch", arch)
            if ckpt["meta"].get("kind") == "expanded" and not model.mcfg.shared_backbone:
                branch = branch or model.tasks[0]  # the default branch, named so that the hash is the same
            info.update(arch=arch, kind=ckpt["meta"].get("kind"), branch=branch,
                        hash=_sha256_text(f"{info['file_sha256']}:{branch}"))
        else:
            state = ckpt
            info["hash"] = info["file_sha256"]
    backbone = build_backbone(arch)
    try:  # strict except fc.* (and num_batches_tracked), with an error that names the file
        load_torchvision_state_dict(backbone, state, spec)
    except ValueError as e:
        raise ConfigError(f"{e} (model.arch is {arch!r}: set it to the backbone's architecture)") from None
    return backbone, info


def _feature_dim(backbone: nn.Module) -> int:
    return backbone.channels["layer4"]


# ----------------------------------------------------------------------------
# subsets (train_fraction) and labels

def dataset_labels(ds) -> list[int]:
    """Integer class labels of a single-label dataset, without decoding images where the reader knows them."""
    reader = getattr(ds, "reader", None)  # data.SourceDataset
    items = getattr(reader, "items", None)
    if isinstance(items, list) and items and isinstance(items[0], tuple) and isinstance(items[0][1], int):
        return [int(it[1]) for it in items]  # imagefolder / csv: (path, label)
    tv = getattr(reader, "ds", None)  # a torchvision.datasets object
    for attr in ("targets", "_labels", "labels", "y"):
        values = getattr(tv, attr, None)
        if isinstance(values, (list, tuple, torch.Tensor)) and len(values) == len(ds):
            return [int(v) for v in values]
    return [int(ds[i][1]) for i in range(len(ds))]  # the slow way: decode every image


def stratified_subset(labels, fraction: float, seed: int) -> list[int]:
    """Sorted indices keeping `fraction` of each class (at least one), chosen with a fixed seed."""
    labels = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels).long()
    if fraction >= 1.0:
        return list(range(len(labels)))
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().view(-1)
        n = max(1, round(fraction * len(idx)))
        keep += idx[torch.randperm(len(idx), generator=g)[:n]].tolist()
    return sorted(keep)


def random_subset(n: int, fraction: float, seed: int) -> list[int]:
    """Sorted indices of a seeded random `fraction` of n items (det/seg: no single label per image)."""
    if fraction >= 1.0:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:max(1, round(fraction * n))].tolist())


# ----------------------------------------------------------------------------
# linear probe: features (cached) + L-BFGS logistic regression

class _Indexed(torch.utils.data.Dataset):
    """(index, sample): so features gathered from every rank go back in dataset order."""

    def __init__(self, ds, indices):
        self.ds, self.indices = ds, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.indices[i], self.ds[self.indices[i]]


def _collate_indexed(items):
    items = [(i, s) for i, s in items if s is not None]  # undecodable images: skipped, counted by the caller
    if not items:
        return None
    return (torch.tensor([i for i, _ in items]), torch.stack([s[0] for _, s in items]),
            torch.as_tensor([int(s[1]) for _, s in items]))


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset, device: torch.device, batch_size: int = 64,
                     workers: int = 2, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, C] float32, labels [N]) in dataset order: pooled layer4 of the frozen backbone.

    Under torchrun each rank extracts every world_size-th image and the pieces
    are gathered, so every rank ends with the full, identically ordered set.
    """
    backbone.eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    loader = DataLoader(_Indexed(dataset, list(range(rank, len(dataset), world))), batch_size=batch_size,
                        num_workers=workers, collate_fn=_collate_indexed, pin_memory=device.type == "cuda")
    idx, feats, labels = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, _feature_dim(backbone))], \
        [torch.zeros(0, dtype=torch.long)]  # an empty shard still concatenates
    for batch in tqdm(loader, desc=desc, disable=not dist.is_main_process(), leave=False):
        if batch is None:
            continue
        i, x, y = batch
        idx.append(i)
        feats.append(backbone(x.to(device, non_blocking=True))["layer4"].float().mean((2, 3)).cpu())
        labels.append(y)
    parts = dist.all_gather_object((torch.cat(idx), torch.cat(feats), torch.cat(labels)))
    idx, feats, labels = (torch.cat([p[k] for p in parts]) for k in range(3))
    skipped = len(dataset) - len(idx)
    if skipped:
        dist.log(f"{desc}: {skipped} undecodable image(s) skipped")
    order = idx.argsort()
    return feats[order], labels[order]


def dataset_hash(src: SourceConfig, split: str, dataset) -> str:
    """What the cached features of one split depend on, besides the backbone.

    The config that selects and transforms the images, plus the dataset's size
    and classes as read from disk (cheap, and they catch most edits to the
    data). Images changed in place are not detected: delete out/cache then.
    """
    key = {"recipe": FEATURE_RECIPE, "task": src.task, "format": src.format, "image_size": src.image_size,
           "path": os.path.abspath(getattr(src, split)) if getattr(src, split) else "",
           "ann": getattr(src, f"{split}_ann"), "root": os.path.abspath(src.root) if src.root else "",
           "split": getattr(src, f"{split}_split"), "len": len(dataset),
           "classes": [str(c) for c in getattr(dataset, "classes", [])]}
    return _sha256_text(json.dumps(key, sort_keys=True))


def cached_features(backbone, info: dict, src: SourceConfig, split: str, dataset, cache_dir: str | Path,
                    device: torch.device, batch_size: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """extract_features, memoised on disk at cache_dir/<backbone hash>_<dataset hash>_<split>.pt."""
    path = Path(cache_dir) / f"{info['hash'][:16]}_{dataset_hash(src, split, dataset)[:16]}_{split}.pt"
    if path.is_file():
        try:
            cached = load_checkpoint(path)
            return cached["features"], cached["labels"]
        except (CheckpointError, KeyError) as e:  # a damaged cache entry is recomputed, not fatal
            dist.log(f"{path}: unusable feature cache ({e}); extracting again")
    feats, labels = extract_features(backbone, dataset, device, batch_size, workers, desc=f"{src.name}/{split}")
    save_atomic({"features": feats, "labels": labels, "backbone": info["hash"]}, path)  # rank 0 only
    return feats, labels


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = PROBE_MAX_ITER,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS: (W [C, K], b [K]).

    Loss = mean cross-entropy + l2/2 * ||W||^2 (bias not penalised); `x` should
    be standardized. Deterministic: no sampling, a fixed iteration budget.
    """
    w = (init[0].clone() if init else torch.zeros(x.shape[1], num_classes, device=x.device)).requires_grad_(True)
    b = (init[1].clone() if init else torch.zeros(num_classes, device=x.device)).requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    # A small problem on CPU is dominated by per-op threading overhead (and by spinning
    # threads on a busy machine: 100x slower measured): fit those on one thread.
    small = x.device.type == "cpu" and x.shape[0] * x.shape[1] * num_classes < 2 ** 24
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if small else threads)
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return w.detach(), b.detach()


def _score(logits: torch.Tensor, y: torch.Tensor, num_classes: int, metric: str) -> float:
    pred = logits.argmax(1)
    if metric == "mean_per_class":
        return mean_per_class_accuracy(pred.cpu(), y.cpu(), num_classes)
    return 100.0 * (pred == y).double().mean().item()


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                 num_classes: int, l2_grid: list[float], seed: int = 0, metric: str = "top1",
                 max_iter: int = PROBE_MAX_ITER, sweep_iter: int = PROBE_SWEEP_ITER) -> dict:
    """Sweep L2 on a class-stratified 80/20 split of train, refit on all of train, score on val.

    Features are standardized with train statistics (no labels involved). The
    grid is walked from strong to weak regularisation, each fit starting from
    the previous solution, so a short iteration budget per grid point suffices
    (the whole probe costs about a tenth of the extraction on the demo).
    Returns {metric: val score, "l2": chosen strength, "sweep": {l2: held-out score}}.
    """
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    held = torch.zeros(len(y_train), dtype=torch.bool)
    held[stratified_subset(y_train.cpu(), 0.2, seed)] = True
    # a class with a single example keeps it for fitting: it cannot be both fitted and held out
    held &= torch.bincount(y_train.cpu(), minlength=num_classes)[y_train.cpu()] > 1
    held = held.to(x_train.device)
    fit_x, fit_y, ho_x, ho_y = x_train[~held], y_train[~held], x_train[held], y_train[held]
    sweep, best, init, best_init = {}, None, None, None
    for l2 in sorted(l2_grid, reverse=True):
        init = fit_logistic(fit_x, fit_y, num_classes, l2, sweep_iter, init)
        sweep[l2] = _score(ho_x @ init[0] + init[1], ho_y, num_classes, metric)
        if best is None or sweep[l2] > sweep[best]:  # ties keep the stronger regularisation
            best, best_init = l2, init
    w, b = fit_logistic(x_train, y_train, num_classes, best, max_iter, best_init)
    logits = x_val @ w + b
    return {"top1": _score(logits, y_val, num_classes, "top1"), metric: _score(logits, y_val, num_classes, metric),
            "l2": best, "sweep": {str(k): v for k, v in sweep.items()}}


def linear_transfer(backbone, info: dict, src: SourceConfig, tc: TransferConfig, seed: int,
                    device: torch.device, cache_dir: str | Path) -> dict:
    """The `linear` protocol on one cls dataset for one seed (features from the cache when possible)."""
    if src.multi_label:
        raise ConfigError(f"transfer.datasets.{src.name}: the linear probe needs single-label classes")
    backbone.to(device).eval()
    splits = {}
    for split in ("train", "val"):
        ds = data.build_dataset(src, split, train=False)  # eval transforms: resize + center crop
        # the batch size does not change the features: take the larger of the two
        splits[split] = cached_features(backbone, info, src, split, ds, cache_dir, device,
                                        max(src.batch_size, tc.batch_size), tc.workers)
        num_classes = src.num_classes or ds.num_classes
    (xtr, ytr), (xva, yva) = splits["train"], splits["val"]
    keep = stratified_subset(ytr, _frac(src, tc), seed)
    return linear_probe(xtr[keep].to(device), ytr[keep].to(device), xva.to(device), yva.to(device),
                        num_classes, tc.l2_grid, seed, primary_metric(src))


# ----------------------------------------------------------------------------
# trained protocols: finetune (cls), det, seg

class _Classifier(nn.Module):
    """backbone + global pool + linear: the `finetune` model; predict() matches evaluate()'s contract."""

    def __init__(self, backbone: nn.Module, num_classes: int, multi_label: bool):
        super().__init__()
        self.backbone, self.multi_label = backbone, multi_label
        self.fc = nn.Linear(_feature_dim(backbone), num_classes)

    def predict(self, images, source=None):
        return self.fc(self.backbone(images)["layer4"].mean((2, 3)))

    def forward(self, batch):
        logits = self.predict(batch["images"])
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, batch["labels"].float())
        return F.cross_entropy(logits, batch["labels"])


class _HeadModel(nn.Module):
    """model.py's det/seg head over one backbone (an XLearnerModel with a shared backbone), loss as a scalar."""

    def __init__(self, cfg: Config, src: SourceConfig, backbone_state: dict, num_classes: int):
        super().__init__()
        from .model import XLearnerModel, load_torchvision_state_dict
        sizes = {k: getattr(cfg.model, k) for k in ("det_head", "seg_head", "fpn_channels", "rpn_pre_nms_top_n",
                                                    "rpn_post_nms_top_n", "rpn_batch_size_per_image",
                                                    "box_batch_size_per_image", "box_head_dim",
                                                    "box_detections_per_img", "seg_channels")}
        # detection practice: BN frozen (small per-GPU batches); seg keeps BN trainable when fine-tuned
        frozen_bn = src.task == "det" or bool(src.freeze_backbone)
        mcfg = ModelConfig(arch=cfg.model.arch, tasks=[src.task], shared_backbone=True, reconcile="none",
                           frozen_bn=frozen_bn, **sizes)
        self.name = src.name
        self.model = XLearnerModel(mcfg, [src], {src.name: num_classes})
        self.backbone = self.model.backbone
        load_torchvision_state_dict(self.backbone, backbone_state, f"backbone for {src.name}")

    def predict(self, images, source=None):
        return self.model.predict(images, self.name)

    def forward(self, batch):
        return self.model.total_loss(self.model({self.name: batch}))


def train_loop(model: nn.Module, dataset, task: str, *, epochs: int, lr: float, batch_size: int, workers: int,
               device: torch.device, seed: int, freeze_backbone: bool, desc: str, ignore_index: int = 255) -> None:
    """SGD (momentum 0.9) with a short warmup and cosine decay; DDP + DistributedSampler under torchrun.

    `model(batch)` returns the scalar loss. A frozen backbone has no gradients
    and stays in eval mode, so its BN statistics are the pre-trained ones.
    """
    model.to(device)
    if freeze_backbone:
        model.backbone.requires_grad_(False)
    sampler = (torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=seed) if dist.is_dist() else None)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                        generator=torch.Generator().manual_seed(seed), num_workers=workers,
                        collate_fn=data.collate_fn(task, ignore_index), pin_memory=device.type == "cuda")
    ddp = model
    if dist.is_dist():
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=WEIGHT_DECAY)
    total = max(1, epochs * len(loader))
    warmup = min(100, total // 10)  # detection heads diverge at full LR from step 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / (warmup + 1) if s < warmup
                                              else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    bar = tqdm(total=total, desc=desc, disable=not dist.is_main_process(), leave=False)
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        if freeze_backbone:
            model.backbone.eval()
        for batch in loader:
            if len(batch["images"]) == 0:  # every image of the batch was undecodable (counted by data.py)
                continue
            loss = ddp(data.move_to(batch, device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss is {loss.item()} at epoch {epoch}; lower transfer.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()


def trained_transfer(backbone, cfg: Config, src: SourceConfig, seed: int, device: torch.device) -> dict:
    """finetune (cls), det or seg on one dataset for one seed (`src` resolved); `backbone` is not modified.

    Batch size: the dataset's `batch_size` (per process), for training and evaluation.
    """
    tc = cfg.transfer
    torch.manual_seed(seed)  # head initialisation
    train_ds = data.build_dataset(src, "train", train=True)
    val_ds = data.build_dataset(src, "val", train=False)
    num_classes = src.num_classes or train_ds.num_classes
    if src.task == "cls":
        model = _Classifier(copy.deepcopy(backbone), num_classes, src.multi_label)
        single = not src.multi_label
        keep = (stratified_subset(dataset_labels(train_ds), src.train_fraction, seed) if single
                else random_subset(len(train_ds), src.train_fraction, seed))
    else:
        model = _HeadModel(cfg, src, backbone.state_dict(), num_classes)
        keep = random_subset(len(train_ds), src.train_fraction, seed)
    freeze = bool(src.freeze_backbone) and src.task != "cls"  # finetune trains everything by definition
    train_loop(model, Subset(train_ds, keep) if len(keep) < len(train_ds) else train_ds, src.task,
               epochs=src.epochs, lr=tc.lr, batch_size=src.batch_size, workers=tc.workers, device=device,
               seed=seed, freeze_backbone=freeze, desc=f"{src.name} seed {seed}", ignore_index=src.ignore_index)
    loader = data.build_eval_loader(src, val_ds, rank=dist.get_rank(), world_size=dist.get_world_size(),
                                    batch_size=src.batch_size, workers=tc.workers)
    return evaluate(model, src, loader, val_ds, device)


# ----------------------------------------------------------------------------
# driver, results table, bench

def _frac(src: SourceConfig, tc: TransferConfig) -> float:
    return src.train_fraction if src.train_fraction is not None else tc.train_fraction


def resolve(src: SourceConfig, tc: TransferConfig) -> SourceConfig:
    """A copy of a transfer dataset with every "take it from [transfer]" field filled in."""
    return dataclasses.replace(
        src, protocol=src.protocol or tc.protocol, train_fraction=_frac(src, tc),
        freeze_backbone=tc.freeze_backbone if src.freeze_backbone is None else src.freeze_backbone,
        epochs=tc.epochs if src.epochs is None else src.epochs)


def transfer_one(backbone, info: dict, cfg: Config, src: SourceConfig, seed: int, device: torch.device,
                 cache_dir: str | Path) -> dict:
    """One (backbone, dataset, seed): the metrics dict of the dataset's protocol."""
    src = resolve(src, cfg.transfer)
    if src.task == "cls" and src.protocol == "linear":
        return linear_transfer(backbone, info, src, cfg.transfer, seed, device, cache_dir)
    if src.task == "cls" and src.protocol != "finetune":
        raise ConfigError(f"transfer.datasets.{src.name}.protocol: expected linear|finetune, got {src.protocol!r}")
    return trained_transfer(backbone, cfg, src, seed, device)


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)


def _default_names(backbones: list[str]) -> list[str]:
    names = []
    for b in backbones:
        n = b if (b.startswith("random") or not os.path.exists(b)) else Path(b).stem
        names.append(n if n not in names else f"{n}#{len(names)}")
    return names


def run(cfg: Config, backbones: list[str], names: list[str] | None = None, branch: str | None = None,
        out: str | None = None) -> dict:
    """Every backbone on every transfer dataset for every seed; writes results.json and results.md."""
    device = dist.init_distributed()
    out = Path(out or cfg.transfer.out)
    names = list(names) if names else _default_names(backbones)
    if len(names) != len(backbones) or len(set(names)) != len(names):
        raise ConfigError(f"need one distinct name per backbone, got {names} for {backbones}")
    if not cfg.transfer.datasets:
        raise ConfigError("transfer.datasets is empty: add [[transfer.datasets]] tables to the config")
    datasets = [resolve(d, cfg.transfer) for d in cfg.transfer.datasets]
    results = {"config": cfg.to_dict(), "backbones": [],
               "datasets": [{"name": d.name, "task": d.task, "metric": primary_metric(d), "protocol": d.protocol,
                             "train_fraction": d.train_fraction, "freeze_backbone": d.freeze_backbone,
                             "epochs": d.epochs} for d in datasets],
               "results": {d.name: {} for d in datasets}}
    for spec, name in zip(backbones, names):
        backbone, info = load_backbone(spec, cfg.model.arch, branch)
        results["backbones"].append({"name": name, **info})
        for d in datasets:
            per_seed = []
            for seed in cfg.transfer.seeds:
                t0 = time.perf_counter()
                metrics = transfer_one(backbone, info, cfg, d, seed, device, out / "cache")
                per_seed.append({"seed": seed, "seconds": round(time.perf_counter() - t0, 2), **metrics})
                dist.log(f"[{name}] {d.name} seed {seed}: {primary_metric(d)} = {metrics[primary_metric(d)]:.2f}")
            mean, std = _mean_std([r[primary_metric(d)] for r in per_seed])
            results["results"][d.name][name] = {"mean": mean, "std": std, "per_seed": per_seed}
            _write(results, out)  # after every dataset: a long suite keeps what it has measured
    table = results_markdown(results)
    dist.log("\n" + table)
    return results


def _write(results: dict, out: Path) -> None:
    if not dist.is_main_process():
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(results_markdown(results))


def results_markdown(results: dict) -> str:
    """Datasets x backbones (mean ± std over seeds), per-task means, and each backbone's gain over the first."""
    names = [b["name"] for b in results["backbones"]]
    first, others = (names[0] if names else ""), names[1:]

    def fmt(mean, std=0.0, n=1):
        if mean is None or math.isnan(mean):
            return "n/a"
        return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"

    def gain(a, b):
        return "n/a" if a is None or b is None or math.isnan(a) or math.isnan(b) else f"{b - a:+.2f}"

    head = ["dataset", "metric", *names, *[f"{n} gain over {first}" for n in others]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_task: dict[str, dict[str, list[float]]] = {}
    for d in results["datasets"]:
        row = results["results"].get(d["name"], {})
        means = {n: row[n]["mean"] if n in row else None for n in names}
        cells = [fmt(row[n]["mean"], row[n]["std"], len(row[n]["per_seed"])) if n in row else "" for n in names]
        lines.append("| " + " | ".join([d["name"], d["metric"], *cells,
                                        *[gain(means[first], means[n]) for n in others]]) + " |")
        for n in names:
            if means[n] is not None:
                by_task.setdefault(d["task"], {}).setdefault(n, []).append(means[n])
    for task in ("cls", "det", "seg"):
        if task not in by_task:
            continue
        m = {n: (sum(v) / len(v) if (v := by_task[task].get(n)) else None) for n in names}
        lines.append("| " + " | ".join([f"**{task} mean**", "", *[fmt(m[n]) if m[n] is not None else "" for n in names],
                                        *[gain(m[first], m[n]) for n in others]]) + " |")
    return "\n".join(lines) + "\n"


def _clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and of its reaped children, i.e. DataLoader workers)."""
    import resource
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), time.process_time() + kids.ru_utime + kids.ru_stime


def bench_transfer(cfg: Config, backbone: str = "random", rounds: int = 3) -> dict:
    """Time of one linear transfer over the cls datasets (cold cache) vs one extraction pass (DESIGN.md §7).

    Both include building the datasets and loaders over train + val; the
    transfer also writes the cache and fits the probe over the whole L2 grid
    plus the refit. The two are timed alternately `rounds` times and the best
    of each is kept, so a burst of load on a shared machine does not decide
    the ratio. Target: ratio <= 1.25 (wall clock). `cpu_ratio`, the same with
    CPU seconds, is reported too: on a busy machine it is the steadier number.
    """
    device = dist.init_distributed()
    tc = cfg.transfer
    cls = [dataclasses.replace(resolve(d, tc), protocol="linear") for d in tc.datasets if d.task == "cls"]
    if not cls:
        raise ConfigError("bench transfer: the config has no cls transfer dataset")
    bb, info = load_backbone(backbone, cfg.model.arch)
    bb.to(device).eval()
    with torch.no_grad():  # one-off costs (thread pools, kernel selection) charged to neither side
        bb(torch.zeros(2, 3, cls[0].image_size, cls[0].image_size, device=device))
    transfer_t, extract_t = [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:  # a cold cache: the transfer extracts too
            start = _clock()
            for d in cls:
                linear_transfer(bb, info, d, tc, tc.seeds[0], device, tmp)
            transfer_t.append([b - a for a, b in zip(start, _clock())])
        start = _clock()
        for d in cls:
            for split in ("train", "val"):
                extract_features(bb, data.build_dataset(d, split, train=False), device,
                                 max(d.batch_size, tc.batch_size), tc.workers)
        extract_t.append([b - a for a, b in zip(start, _clock())])
    (tw, tc_), (ew, ec) = (min(t[0] for t in transfer_t), min(t[1] for t in transfer_t)), \
        (min(t[0] for t in extract_t), min(t[1] for t in extract_t))
    return {"bench": "transfer", "backbone": backbone, "datasets": [d.name for d in cls],
            "transfer_s": round(tw, 3), "extract_s": round(ew, 3), "ratio": round(tw / ew, 3),
            "transfer_cpu_s": round(tc_, 3), "extract_cpu_s": round(ec, 3), "cpu_ratio": round(tc_ / ec, 3),
            "rounds_s": {"transfer": [round(t[0], 2) for t in transfer_t], "extract": [round(t[0], 2) for t in extract_t]}}
