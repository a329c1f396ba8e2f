"""Linear probe: frozen features, extracted once and cached, and an L-BFGS logistic regression.

The default way transfer.py judges a backbone on a classification dataset
(the `linear` protocol, DINO eval_linear style). The backbone only measures
features: global-average-pooled layer4 of the frozen network, under eval
transforms, extracted once (sharded across ranks under torchrun, then
gathered) and cached on disk, keyed by the backbone's hash (load_backbone's
info["hash"]) and a hash of what selects and transforms the images. On top, a
multinomial logistic regression is fit by full-batch L-BFGS on standardized
features, its L2 strength swept on a class-stratified held-out 20% of train,
then refit on all of train and scored on val. No augmentation and no SGD
schedule to tune, so the score reflects the features.

Also here: the seeded train_fraction subsets (class-stratified for cls, random
for det/seg), the fixed train_subset / val_subset (`open_split`) and the
dataset label reader, which the trained protocols of transfer.py share.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import data

from .run import dist
from .backbone import to_input
from .run.checkpoint import CheckpointError, load_checkpoint, save_atomic, sha256_text
from .config import TransferDatasetConfig
from .evaluate import mean_per_class_accuracy

FEATURE_RECIPE = "gap-layer4-v1"   # part of the cache key: bump it if the features change
PROBE_MAX_ITER = 100               # L-BFGS iterations of the final fit
PROBE_SWEEP_ITER = 40              # ... of each held-out fit of the sweep (it only has to rank the L2 values)
SUBSET_SEED = 0                    # train_subset / val_subset: one fixed subset


# ----------------------------------------------------------------------------
# hashing (the feature cache's keys) and the feature size

def feature_dim(backbone: nn.Module) -> int:
    return backbone.channels["layer4"]


# ----------------------------------------------------------------------------
# subsets (train_fraction) and labels

def dataset_labels(ds) -> list[int]:
    """Integer class labels of a single-label dataset, without decoding images where the reader knows them."""
    reader = getattr(ds, "reader", None)  # data.SourceDataset
    labels = _reader_labels(reader) if reader is not None else None
    if labels is None:
        return [int(ds[i][1]) for i in range(len(ds))]  # the slow way: decode every image
    indices = getattr(ds, "indices", None)  # a subset (train_subset / val_subset)
    return labels if indices is None else [labels[i] for i in indices]


def _reader_labels(reader) -> list[int] | None:
    """Every label of a reader, where it holds them without decoding images; else None."""
    items = getattr(reader, "items", None)
    if isinstance(items, list) and items and isinstance(items[0], tuple) and isinstance(items[0][1], int):
        return [int(it[1]) for it in items]  # imagefolder / csv: (path, label)
    tv = getattr(reader, "ds", None)  # a torchvision.datasets object
    for attr in ("targets", "_labels", "labels", "y"):
        values = getattr(tv, attr, None)
        if isinstance(values, (list, tuple, torch.Tensor)) and len(values) == len(reader):
            return [int(v) for v in values]
    return None


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


def open_split(src: TransferDatasetConfig, split: str, train: bool):
    """data.build_dataset, cut to the dataset's fixed class-stratified `train_subset` / `val_subset` if set
    (SUBSET_SEED: the same subset for every seed and backbone).

    With `dev_fraction` (transfer.dev_fraction) val is never opened: "val" is a fixed dev split carved
    out of train (class-stratified for cls, random for det / seg; SUBSET_SEED) and "train" is the rest,
    so that settings are chosen without reading the val set the final table reports."""
    dev = src.dev_fraction or 0.0
    ds = data.build_dataset(src, "train" if dev else split, train=train)
    n = src.train_subset if split == "train" or dev else src.val_subset
    if n and n < len(ds):
        ds.indices = stratified_subset(dataset_labels(ds), n / len(ds), SUBSET_SEED)
    if dev:
        pool = ds.indices if ds.indices is not None else list(range(len(ds)))
        held = set(stratified_subset(dataset_labels(ds), dev, SUBSET_SEED) if src.task == "cls"
                   else random_subset(len(pool), dev, SUBSET_SEED))  # positions in `pool`
        ds.indices = [i for k, i in enumerate(pool) if (k in held) == (split == "val")]
    return ds


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
    idx, feats, labels = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, feature_dim(backbone))], \
        [torch.zeros(0, dtype=torch.long)]  # an empty shard still concatenates
    for batch in dist.progress(loader, desc=desc, leave=False):
        if batch is None:
            continue
        i, x, y = batch
        idx.append(i)
        feats.append(backbone(to_input(x.to(device, non_blocking=True)))["layer4"].float().mean((2, 3)).cpu())
        labels.append(y)
    parts = dist.all_gather_object((torch.cat(idx), torch.cat(feats), torch.cat(labels)))
    idx, feats, labels = (torch.cat([p[k] for p in parts]) for k in range(3))
    skipped = len(dataset) - len(idx)
    if skipped:
        dist.log(f"{desc}: {skipped} undecodable image(s) skipped")
    order = idx.argsort()
    return feats[order], labels[order]


def dataset_hash(src: TransferDatasetConfig, split: str, dataset) -> str:
    """What the cached features of one split depend on, besides the backbone.

    The config that selects and transforms the images, plus the dataset's size
    and classes as read from disk (cheap, and they catch most edits to the
    data). Images changed in place are not detected: delete out/cache then.
    """
    key = {"recipe": FEATURE_RECIPE, "task": src.task, "format": src.format, "image_size": src.image_size,
           "dev_fraction": src.dev_fraction or 0.0,
           "path": os.path.abspath(getattr(src, split)) if getattr(src, split) else "",
           "ann": getattr(src, f"{split}_ann"), "root": os.path.abspath(src.root) if src.root else "",
           "split": getattr(src, f"{split}_split"), "len": len(dataset),
           "classes": [str(c) for c in getattr(dataset, "classes", [])]}
    return sha256_text(json.dumps(key, sort_keys=True))


def cached_features(backbone, info: dict, src: TransferDatasetConfig, split: str, dataset, cache_dir: str | Path,
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
