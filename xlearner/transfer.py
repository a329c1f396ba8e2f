"""Transfer evaluation: how a backbone is judged, the last step of the method.

X-Learner's claim is a representation that transfers: +3.0 (cls), +3.3 (det)
and +1.8 (seg) points over existing pre-trained models on 12 downstream
datasets (docs/DESIGN.md §1, "Transfer"). This module turns any backbone (the
squeezed student, one branch of an expanded model, a torchvision state_dict, a
torchvision weights name, or `random`) into those numbers:

- cls, `linear` (the default, probe.py): the backbone is frozen and only measures
  features. Global-average-pooled layer4 features are extracted once (eval
  transforms) and cached on disk; a multinomial logistic regression is fit with
  full-batch L-BFGS, its L2 strength chosen on a held-out 20% of train, then
  refit on all of train. No augmentation and no SGD schedule to tune, so the
  score reflects the features, and the probe costs little next to extraction.
- cls, `finetune`: backbone + linear layer trained end to end with SGD.
- det: torchvision Faster R-CNN + FPN (heads.py's det head) over the backbone,
  frozen (the GV-B protocol) or fine-tuned; COCO AP / AP50 / AP75.
- seg: heads.py's seg head over the backbone, frozen or fine-tuned; mIoU.

`run()` evaluates every backbone on every `[[transfer.datasets]]` entry for
every seed and writes results.json and results.md (results.py): datasets as
rows, backbones as columns, per-task means and the gain of each backbone over
the first, the shape of the paper's headline. It loads every backbone and opens
every dataset before it trains anything, so a bad path fails in seconds, not
after hours. The style follows DINO's eval_linear.py: plain loops, no framework.

Details a user may need:
- Features are cached at <out>/cache/<backbone hash[:16]>_<dataset hash[:16]>_<split>.pt;
  the cache holds the full train split, so train_fraction and seeds reuse it.
- Each finished (backbone, dataset, seed) is recorded atomically at
  <out>/records/<backbone hash[:16]>_<dataset key[:16]>_<protocol>_seed<N>.json.
  A re-run on the same out reuses every record whose key matches (the backbone's
  weights; the dataset entry, [transfer] values and head sizes that change the
  result; the splits' sizes and classes) and computes only the rest, so a killed
  suite loses at most the result in progress. Images changed in place are not
  detected: delete <out>/records (and <out>/cache) then.
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
import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from . import data

from .run import dist
from .backbone import freeze_bn, load_torchvision_state_dict, to_input
from .config import Config, ConfigError, ModelConfig, TransferConfig, TransferDatasetConfig, as_source, primary_metric
from .engine import warmup_cosine, wrap_ddp
from .evaluate import evaluate
from .expand import XLearnerModel
from .model import BranchWithRL
from .probe import (cached_features, dataset_hash, dataset_labels, feature_dim, linear_probe, open_split,
                    random_subset, stratified_subset)
from .results import mean_std, read_record, record_path, results_markdown, write_record, write_results
from .run.checkpoint import sha256_text
from .run.rundir import locked
from .weights import load_backbone

WEIGHT_DECAY = 1e-4                # finetune / det / seg SGD
RECORD_VERSION = 1                 # part of each result record's key: bump it if a protocol changes


# ----------------------------------------------------------------------------
# linear probe (probe.py) on one dataset

def _check_single_label(src: TransferDatasetConfig) -> None:
    if src.multi_label:
        raise ConfigError(f"transfer.datasets.{src.name}: the linear probe needs single-label classes")


def linear_transfer(backbone, info: dict, src: TransferDatasetConfig, xfer: TransferConfig, seed: int,
                    device: torch.device, cache_dir: str | Path) -> dict:
    """The `linear` protocol on one cls dataset for one seed (features from the cache when possible)."""
    _check_single_label(src)
    backbone.to(device).eval()
    splits = {}
    for split in ("train", "val"):
        ds = open_split(src, split, train=False)  # eval transforms: resize + center crop
        # the batch size does not change the features: take the larger of the two
        splits[split] = cached_features(backbone, info, src, split, ds, cache_dir, device,
                                        max(src.batch_size, xfer.batch_size), xfer.workers)
        num_classes = src.num_classes or ds.num_classes
    (xtr, ytr), (xva, yva) = splits["train"], splits["val"]
    keep = stratified_subset(ytr, _frac(src, xfer), seed)
    return linear_probe(xtr[keep].to(device), ytr[keep].to(device), xva.to(device), yva.to(device),
                        num_classes, xfer.l2_grid, seed, primary_metric(src))


# ----------------------------------------------------------------------------
# trained protocols: finetune (cls), det, seg

class _Classifier(nn.Module):
    """backbone + global pool + linear: the `finetune` model; predict() matches evaluate()'s contract."""

    def __init__(self, backbone: nn.Module, num_classes: int, multi_label: bool):
        super().__init__()
        self.backbone, self.multi_label = backbone, multi_label
        self.fc = nn.Linear(feature_dim(backbone), num_classes)

    def predict(self, images, source=None):
        return self.fc(self.backbone(to_input(images))["layer4"].mean((2, 3)))

    def forward(self, batch):
        logits = self.predict(batch["images"])
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, batch["labels"].float())
        return F.cross_entropy(logits, batch["labels"])


HEAD_KEYS = ("seg_head", "fpn_channels", "rpn_pre_nms_top_n", "rpn_post_nms_top_n",
             "rpn_batch_size_per_image", "box_batch_size_per_image", "box_head_dim", "box_detections_per_img",
             "seg_channels")  # the [model] keys that size the det / seg heads trained here


class _HeadModel(nn.Module):
    """heads.py's det/seg head over one backbone (an XLearnerModel with a shared backbone), loss as a scalar.

    Built on the backbone's own arch, not model.arch: a ResNet-50 is evaluated with any config."""

    def __init__(self, cfg: Config, src: TransferDatasetConfig, backbone, num_classes: int):
        super().__init__()
        sizes = {k: getattr(cfg.model, k) for k in HEAD_KEYS}
        # detection practice: BN frozen (small per-GPU batches); seg keeps BN trainable when fine-tuned
        frozen_bn = src.task == "det" or bool(src.freeze_backbone)
        mcfg = ModelConfig(arch=backbone.arch, tasks=[src.task], shared_backbone=True, reconcile="none",
                           frozen_bn=frozen_bn, **sizes)
        self.name = src.name
        self.model = XLearnerModel(mcfg, [as_source(src)], {src.name: num_classes})
        if isinstance(backbone, BranchWithRL):  # the whole expanded network stands in for the backbone
            self.model.backbone = freeze_bn(copy.deepcopy(backbone)) if frozen_bn else copy.deepcopy(backbone)
        else:
            load_torchvision_state_dict(self.model.backbone, backbone.state_dict(), f"backbone for {src.name}")
        self.backbone = self.model.backbone

    def predict(self, images, source=None):
        return self.model.predict(images, self.name)

    def forward(self, batch):
        return self.model.total_loss(self.model({self.name: batch}))


def train_loop(model: nn.Module, dataset, task: str, *, epochs: int, lr: float, batch_size: int, workers: int,
               device: torch.device, seed: int, freeze_backbone: bool, desc: str, ignore_index: int = 255,
               clip_grad: float = 0.0) -> None:
    """SGD (momentum 0.9), global grad norm clipped to `clip_grad` (0 = off), a short warmup and cosine
    decay; DDP + DistributedSampler under torchrun.

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
    ddp = wrap_ddp(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=WEIGHT_DECAY)
    total = max(1, epochs * len(loader))
    warmup = min(100, total // 10)  # detection heads diverge at full LR from step 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, warmup, total))
    bar = dist.progress(total=total, desc=desc, leave=False)
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
                raise FloatingPointError(f"{desc}: loss is {loss.item()} at epoch {epoch}; lower transfer.lr or transfer.clip_grad")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad > 0:
                nn.utils.clip_grad_norm_(params, clip_grad)
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()


def trained_transfer(backbone, cfg: Config, src: TransferDatasetConfig, seed: int, device: torch.device) -> dict:
    """finetune (cls), det or seg on one dataset for one seed (`src` resolved); `backbone` is not modified.

    Batch size: the dataset's `batch_size` (per process), for training and evaluation.
    """
    xfer = cfg.transfer
    torch.manual_seed(seed)  # head initialisation
    train_ds = open_split(src, "train", train=True)
    val_ds = open_split(src, "val", train=False)
    num_classes = src.num_classes or train_ds.num_classes
    if src.task == "cls":
        model = _Classifier(copy.deepcopy(backbone), num_classes, src.multi_label)
        single = not src.multi_label
        keep = (stratified_subset(dataset_labels(train_ds), src.train_fraction, seed) if single
                else random_subset(len(train_ds), src.train_fraction, seed))
    else:
        model = _HeadModel(cfg, src, backbone, num_classes)
        keep = random_subset(len(train_ds), src.train_fraction, seed)
    freeze = bool(src.freeze_backbone) and src.task != "cls"  # finetune trains everything by definition
    train_loop(model, Subset(train_ds, keep) if len(keep) < len(train_ds) else train_ds, src.task,
               epochs=src.epochs, lr=xfer.lr, batch_size=src.batch_size, workers=xfer.workers, device=device,
               seed=seed, freeze_backbone=freeze, desc=f"{src.name} seed {seed}", ignore_index=src.ignore_index,
               clip_grad=xfer.clip_grad)
    loader = data.build_eval_loader(src, val_ds, rank=dist.get_rank(), world_size=dist.get_world_size(),
                                    batch_size=src.batch_size, workers=xfer.workers)
    return evaluate(model, src, loader, val_ds, device)


# ----------------------------------------------------------------------------
# the driver

def _frac(src: TransferDatasetConfig, xfer: TransferConfig) -> float:
    return src.train_fraction if src.train_fraction is not None else xfer.train_fraction


def resolve(src: TransferDatasetConfig, xfer: TransferConfig) -> TransferDatasetConfig:
    """A copy of a transfer dataset with every "take it from [transfer]" field filled in."""
    return dataclasses.replace(
        src, protocol=src.protocol or xfer.protocol, train_fraction=_frac(src, xfer),
        dev_fraction=xfer.dev_fraction if src.dev_fraction is None else src.dev_fraction,
        freeze_backbone=xfer.freeze_backbone if src.freeze_backbone is None else src.freeze_backbone,
        epochs=xfer.epochs if src.epochs is None else src.epochs)


def transfer_one(backbone, info: dict, cfg: Config, src: TransferDatasetConfig, seed: int, device: torch.device,
                 cache_dir: str | Path) -> dict:
    """One (backbone, dataset, seed): the metrics dict of the dataset's protocol."""
    src = resolve(src, cfg.transfer)
    if src.task == "cls" and src.protocol == "linear":
        return linear_transfer(backbone, info, src, cfg.transfer, seed, device, cache_dir)
    if src.task == "cls" and src.protocol != "finetune":
        raise ConfigError(f"transfer.datasets.{src.name}.protocol: expected linear|finetune, got {src.protocol!r}")
    return trained_transfer(backbone, cfg, src, seed, device)


def _default_names(backbones: list[str]) -> list[str]:
    names = []
    for b in backbones:
        n = b if (b.startswith("random") or not os.path.exists(b)) else Path(b).stem
        names.append(n if n not in names else f"{n}#{len(names)}")
    return names


def open_datasets(datasets: list[TransferDatasetConfig], cfg: Config) -> dict[str, str]:
    """Open every (resolved) transfer dataset before any training, DataError / ConfigError naming the
    first bad one; returns each one's result key (`dataset_key`)."""
    keys = {}
    for src in datasets:
        if src.task == "cls" and src.protocol == "linear":
            _check_single_label(src)
        splits = {split: dataset_hash(src, split, open_split(src, split, train=False))
                  for split in ("train", "val")}
        keys[src.name] = dataset_key(src, cfg, splits)
    return keys


def dataset_key(src: TransferDatasetConfig, cfg: Config, splits: dict[str, str]) -> str:
    """What a result on `src` depends on besides the backbone and the seed: the resolved dataset entry,
    the [transfer] values its protocol reads, the det/seg head sizes, and each split as the feature cache
    keys it (size and classes as read from disk; probe.dataset_hash)."""
    xfer = cfg.transfer
    key = {"dataset": dataclasses.asdict(src), "splits": splits, "version": RECORD_VERSION,
           "transfer": {"lr": xfer.lr, "clip_grad": xfer.clip_grad, "l2_grid": xfer.l2_grid, "batch_size": xfer.batch_size},
           "heads": {k: getattr(cfg.model, k) for k in HEAD_KEYS} if src.task != "cls" else {}}
    return sha256_text(json.dumps(key, sort_keys=True))


def _finished(out: Path, cfg: Config, loaded: list, names: list[str], datasets: list[TransferDatasetConfig],
              data_keys: dict[str, str]) -> tuple[dict, dict]:
    """(record path, finished result) of every (name, dataset, seed), the second from rank 0's records."""
    paths = {(name, d.name, seed): record_path(out, info["hash"], data_keys[d.name], d, seed)
             for name, (_, info) in zip(names, loaded) for d in datasets for seed in cfg.transfer.seeds}
    done = {k: r for k, p in paths.items() if (r := read_record(p)) is not None}
    done = dist.all_gather_object(done)[0]  # rank 0's view: every rank skips the same work
    if done:
        dist.log(f"[transfer] reusing {len(done)} of {len(paths)} finished results from {out / 'records'}")
    return paths, done


@locked("transfer")  # OUT/.lock for the life of the run
def run(cfg: Config, backbones: list[str], names: list[str] | None = None, branch: str | None = None,
        out: str | None = None, with_rl: bool = False) -> dict:
    """Every backbone on every transfer dataset for every seed; writes results.json and results.md.

    Fails fast: every backbone is loaded and every dataset opened before the first training step.
    Resumable: each finished (backbone, dataset, seed) is recorded under out/records (results.record_path),
    and a re-run on the same `out` reuses those and computes only the rest.
    """
    device = dist.init_distributed()
    out = Path(out or cfg.transfer.out)
    names = list(names) if names else _default_names(backbones)
    if len(names) != len(backbones) or len(set(names)) != len(names):
        raise ConfigError(f"need one distinct name per backbone, got {names} for {backbones}")
    if not cfg.transfer.datasets:
        raise ConfigError("transfer.datasets is empty: add [[transfer.datasets]] tables to the config")
    datasets = [resolve(d, cfg.transfer) for d in cfg.transfer.datasets]
    loaded = [load_backbone(spec, cfg.model.arch, branch, with_rl) for spec in backbones]
    data_keys = open_datasets(datasets, cfg)
    paths, done = _finished(out, cfg, loaded, names, datasets, data_keys)
    results = {"config": cfg.to_dict(), "backbones": [],
               "datasets": [{"name": d.name, "task": d.task, "metric": primary_metric(d), "protocol": d.protocol,
                             "train_fraction": d.train_fraction, "freeze_backbone": d.freeze_backbone,
                             "epochs": d.epochs} for d in datasets],
               "results": {d.name: {} for d in datasets}}
    for (backbone, info), name in zip(loaded, names):
        results["backbones"].append({"name": name, **info})
        for d in datasets:
            per_seed = []
            for seed in cfg.transfer.seeds:
                result = done.get((name, d.name, seed))
                if result is None:
                    t0 = time.perf_counter()
                    metrics = transfer_one(backbone, info, cfg, d, seed, device, out / "cache")
                    result = {"seed": seed, "seconds": round(time.perf_counter() - t0, 2), **metrics}
                    key = {"backbone": info["spec"], "backbone_hash": info["hash"], "dataset": d.name,
                           "dataset_key": data_keys[d.name], "seed": seed}
                    write_record(paths[(name, d.name, seed)], key, result)
                per_seed.append(result)
                dist.log(f"[{name}] {d.name} seed {seed}: {primary_metric(d)} = {result[primary_metric(d)]:.2f}")
            mean, std = mean_std([r[primary_metric(d)] for r in per_seed])
            results["results"][d.name][name] = {"mean": mean, "std": std, "per_seed": per_seed}
            write_results(results, out)  # after every dataset: a long suite keeps what it has measured
    dist.log("\n" + results_markdown(results))
    return results
