"""The multi-source loader: one batch from every source at every step.

X-Learner's loss is `L = sum_s w_s L_s` over sources of different tasks, each
with its own labels (docs/DESIGN.md §1), so one training step needs one batch from
*every* source, each at its own batch size and with its task's augmentation.
This module turns `SourceConfig`s into that stream:

    build_dataset(src, split, train)  reader (formats/) + per-task transform
    MultiSourceLoader                 next() -> {source name: batch}, forever
    build_eval_loader                 this rank's shard of a val split
    collate_fn(task), move_to         batching and host -> device (uint8 images: heads convert them there)

Determinism. A sample's augmentation is a pure function of (seed, source,
epoch, index): the batch sampler hands the dataset `(index, aug_seed)` keys and
`__getitem__` runs the transform under a forked, re-seeded torch RNG. So the
stream does not depend on the number of workers, the main process's RNG is not
touched, and `load_state_dict()` replays exactly the same images and the same
crops after a resume. Each rank reads its own `DistributedSampler` shard,
reshuffled every epoch, with `drop_last` so every batch has the same shape.

Bad images never stop a run: an undecodable image becomes a `None` sample,
which `collate_fn` drops and counts (`batch["skipped"]`, `loader.skipped`).
"""
from __future__ import annotations

import functools
import gc
import hashlib
import random
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from .run import preempt
from .config import DataConfig, SourceConfig
from .formats.files import BadSample, DataError
from .formats import make_reader

class DataWarning(UserWarning):
    """A sample was skipped; the message names the file and the reason."""


# ----------------------------------------------------------------------------
# transforms: torchvision.transforms.v2 moves boxes and masks with the image

def build_transform(task: str, train: bool, image_size: int) -> v2.Compose:
    """Geometry only, on uint8 images: float conversion and normalisation happen on the device
    (backbone.to_input, called by each head's `prepare`), so a step copies a quarter of the bytes."""
    if task == "det":
        # native size: the detector's GeneralizedRCNNTransform resizes (image_size is its shorter side)
        flip = [v2.RandomHorizontalFlip()] if train else []
        return v2.Compose([v2.ToImage(), *flip])
    if task == "cls":
        geometry = ([v2.RandomResizedCrop(image_size, scale=(0.6, 1.0)), v2.RandomHorizontalFlip()] if train
                    else [v2.Resize(image_size), v2.CenterCrop(image_size)])
    elif task == "seg":
        # a square S x S crop (scale jitter) so batches stack; masks use nearest
        geometry = ([v2.RandomResizedCrop(image_size, scale=(0.5, 1.0)), v2.RandomHorizontalFlip()] if train
                    else [v2.Resize((image_size, image_size))])
    else:
        raise ValueError(f"unknown task {task!r}")
    return v2.Compose([v2.ToImage(), *geometry])


def sample_seed(seed: int, source: str, epoch: int, index: int) -> int:
    """The augmentation seed of one sample: stable across processes and Python runs."""
    digest = hashlib.blake2b(f"{seed}/{source}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SourceDataset(Dataset):
    """One split of one source: reader + task transform. Index with an int or `(index, aug_seed)`."""

    def __init__(self, src: DataConfig, split: str, reader, train: bool):
        self.source, self.split, self.task, self.train = src, split, src.task, train
        self.reader = reader
        self.indices: list[int] | None = None  # a subset of the reader's samples (transfer's train/val_subset)
        self.classes = list(reader.classes)
        self.num_classes = len(self.classes)  # det: without background
        self.transform = build_transform(src.task, train, src.image_size)
        if self.task == "det":
            self.cat_ids = list(reader.cat_ids)  # label i+1 <-> original category cat_ids[i]

    @property
    def coco(self):
        """det: the pycocotools.COCO ground truth of this split (for VOC built on first use)."""
        return self.reader.coco

    def __len__(self) -> int:
        return len(self.reader) if self.indices is None else len(self.indices)

    def __getitem__(self, key):
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        if self.indices is not None:
            index = self.indices[index]
        try:
            img, target = self.reader.load(index)
        except BadSample as e:
            warnings.warn(f"{e} (sample skipped)", DataWarning, stacklevel=2)
            return None
        if aug_seed is None:
            return self._apply(img, target)
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG exactly as it was
            # the CPU generator only: torch.manual_seed() also queues CUDA seeding (~0.3 ms a call)
            torch.default_generator.manual_seed(aug_seed)
            return self._apply(img, target)

    def _apply(self, img, target):
        if self.task == "cls":
            if self.source.multi_label:
                hot = torch.zeros(self.num_classes)
                hot[target] = 1.0
                target = hot
            return self.transform(img), target
        if self.task == "det":
            boxes = tv_tensors.BoundingBoxes(torch.from_numpy(target["boxes"]), format="XYXY",
                                             canvas_size=(img.height, img.width))
            img, boxes = self.transform(img, boxes)
            return img, {"boxes": boxes.as_subclass(torch.Tensor), "labels": torch.from_numpy(target["labels"]),
                         "image_id": target["image_id"]}
        img, mask = self.transform(img, tv_tensors.Mask(torch.from_numpy(target)))
        return img, mask.as_subclass(torch.Tensor).long()


def build_dataset(src: DataConfig, split: str, train: bool) -> SourceDataset:
    """One split of a source with its train or eval transform; DataError if the split has problems."""
    reader = make_reader(src, split)
    if reader.problems:
        shown = "\n  ".join(reader.problems[:20])
        more = f"\n  ... and {len(reader.problems) - 20} more" if len(reader.problems) > 20 else ""
        raise DataError(f"source {src.name!r} ({split}): {len(reader.problems)} problem(s) "
                        f"(`cli.py check-data` lists them all):\n  {shown}{more}")
    if src.num_classes and src.num_classes < len(reader.classes):
        raise DataError(f"source {src.name!r}: num_classes = {src.num_classes} but the {split} data has "
                        f"{len(reader.classes)} classes")
    return SourceDataset(src, split, reader, train)


# ----------------------------------------------------------------------------
# batching

def build_train_datasets(sources: list[SourceConfig]) -> tuple[dict, dict[str, int]]:
    """Every source's train split, and its class count (the config's, or what the data says)."""
    datasets = {s.name: build_dataset(s, "train", train=True) for s in sources}
    num_classes = {s.name: s.num_classes or datasets[s.name].num_classes for s in sources}
    return datasets, num_classes


def images_per_step(sources: list[SourceConfig]) -> int:
    """Images in one step of the multi-source loader: one batch of every source."""
    return sum(s.batch_size for s in sources)


def collate_fn(task: str, ignore_index: int = 255):
    """Batch samples of one task; None samples (undecodable images) are dropped and counted."""
    return functools.partial(_collate, task, ignore_index)  # a partial pickles for worker processes


def _collate(task: str, ignore_index: int, samples: list) -> dict:
    kept = [s for s in samples if s is not None]
    skipped = len(samples) - len(kept)
    if task == "det":  # variable image sizes and box counts: lists
        return {"images": [s[0] for s in kept], "targets": [s[1] for s in kept], "skipped": skipped}
    if not kept:  # every image undecodable: MultiSourceLoader moves on to the next batch
        target_key = "labels" if task == "cls" else "masks"
        return {"images": torch.zeros(0, 3, 1, 1, dtype=torch.uint8), target_key: torch.zeros(0, dtype=torch.long),
                "skipped": skipped}
    if task == "cls":
        labels = [s[1] for s in kept]
        labels = torch.stack(labels) if torch.is_tensor(labels[0]) else torch.tensor(labels, dtype=torch.long)
        return {"images": torch.stack([s[0] for s in kept]), "labels": labels, "skipped": skipped}
    h = max(s[0].shape[-2] for s in kept)
    w = max(s[0].shape[-1] for s in kept)
    # padding: black uint8 (black after to_input too), and ignore_index in the masks, so it carries no loss; the seg
    # transforms make every image of a source S x S, so a source's batches need none
    images = torch.zeros(len(kept), 3, h, w, dtype=torch.uint8)
    masks = torch.full((len(kept), h, w), ignore_index, dtype=torch.long)
    for i, (img, mask) in enumerate(kept):
        images[i, :, : img.shape[-2], : img.shape[-1]] = img
        masks[i, : mask.shape[-2], : mask.shape[-1]] = mask
    return {"images": images, "masks": masks, "skipped": skipped}


def _batch_size(batch: dict) -> int:
    return len(batch["images"])


def move_to(batch, device):
    """Tensors, and lists/tuples/dicts of them, to `device` (non_blocking: pinned batches overlap)."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def _worker_init(worker_id: int) -> None:
    """Seeding and signals of a loader worker (train and eval loaders)."""
    # torch already seeds each worker (base_seed + id); give `random` and numpy the
    # same seed so third-party code that uses them is reproducible too
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    preempt.loader_worker_signals()


# ----------------------------------------------------------------------------
# the training loader

class ResumableBatchSampler(Sampler):
    """Infinite batches of `(index, aug_seed)` keys from this rank's shard, epoch after epoch.

    Each epoch is `DistributedSampler(shuffle=True, drop_last=True).set_epoch(e)`
    cut into full batches; a start at (epoch, batch) skips what was consumed.
    One sampler spans all epochs, so DataLoader workers live for the whole run
    instead of restarting at every epoch boundary.
    """

    def __init__(self, dataset, name: str, batch_size: int, *, rank: int, world_size: int, seed: int,
                 epoch: int = 0, batch: int = 0):
        # decorrelate sources: two sources of the same length must not share a permutation
        source_seed = seed + sample_seed(0, name, 0, 0) % 2**20
        self.shard = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                        seed=source_seed, drop_last=True)
        self.name, self.batch_size, self.seed = name, batch_size, seed
        self.batches_per_epoch = len(self.shard) // batch_size
        self.epoch, self.batch = epoch, batch

    def __iter__(self):
        epoch, skip, bs = self.epoch, self.batch, self.batch_size
        while True:
            self.shard.set_epoch(epoch)
            order = list(self.shard)
            for b in range(skip, self.batches_per_epoch):
                yield [(i, sample_seed(self.seed, self.name, epoch, i)) for i in order[b * bs:(b + 1) * bs]]
            epoch, skip = epoch + 1, 0


class MultiSourceLoader:
    """`next(loader) -> {source name: batch}`: one batch per source per step, forever.

    `state_dict()` is {name: {"epoch", "batch", "skipped"}} (JSON-able): the
    batches handed out so far, not what the workers have prefetched.
    """

    def __init__(self, sources: list[SourceConfig], datasets: dict, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, workers: int = 2):
        self.sources, self.datasets = list(sources), datasets
        self.rank, self.world_size, self.seed, self.workers = rank, world_size, seed, workers
        for src in self.sources:
            n, need = len(datasets[src.name]), src.batch_size * world_size
            if n < need:
                raise DataError(f"source {src.name!r}: {n} training samples, fewer than batch_size "
                                f"{src.batch_size} x world_size {world_size} = {need}")
        self.state = {s.name: {"epoch": 0, "batch": 0} for s in self.sources}
        self.skipped = {s.name: 0 for s in self.sources}
        self._iters: dict = {}
        self._per_epoch: dict = {}

    def _start(self, src: SourceConfig):
        st = self.state[src.name]
        sampler = ResumableBatchSampler(self.datasets[src.name], src.name, src.batch_size, rank=self.rank,
                                        world_size=self.world_size, seed=self.seed, **st)
        if st["batch"] >= sampler.batches_per_epoch:  # a state from another batch size / world size
            st["epoch"], st["batch"] = st["epoch"] + 1, 0
            sampler.epoch, sampler.batch = st["epoch"], 0
        self._per_epoch[src.name] = sampler.batches_per_epoch
        loader = DataLoader(self.datasets[src.name], batch_sampler=sampler, num_workers=self.workers,
                            collate_fn=collate_fn(src.task, src.ignore_index), worker_init_fn=_worker_init,
                            pin_memory=torch.cuda.is_available(), persistent_workers=False,
                            # the workers' base seed comes from here, not from the global RNG
                            generator=torch.Generator().manual_seed(self.seed))
        if self.workers > 0 and not gc.get_freeze_count():  # the workers fork here: once per process, what lives
            gc.collect()  # now (the readers' annotations) goes to the permanent generation, so that the collector's
            gc.freeze()   # scans do not copy its pages in every worker; garbage is collected first, never frozen
        self._iters[src.name] = iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        out = {}
        for src in self.sources:
            if src.name not in self._iters:
                self._start(src)
            while True:
                batch = next(self._iters[src.name])
                st = self.state[src.name]
                st["batch"] += 1
                if st["batch"] == self._per_epoch[src.name]:
                    st["epoch"], st["batch"] = st["epoch"] + 1, 0
                self.skipped[src.name] += batch["skipped"]
                if _batch_size(batch):  # a batch of only undecodable images: take the next one
                    break
            out[src.name] = batch
        return out

    def state_dict(self) -> dict:
        return {n: {**self.state[n], "skipped": self.skipped[n]} for n in self.state}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.state):
            raise ValueError(f"loader state has sources {sorted(state)}, this run has {sorted(self.state)}")
        self.close()
        for name, st in state.items():
            self.state[name] = {"epoch": int(st["epoch"]), "batch": int(st["batch"])}
            self.skipped[name] = int(st.get("skipped", 0))

    def close(self) -> None:
        """Stop the worker processes (they restart on the next `next()`)."""
        self._iters.clear()  # dropping a DataLoader iterator shuts its workers down


class EvalLoader(DataLoader):
    """A DataLoader that ends early once this process has been asked to stop (`preempt.stop_requested`).

    A stop signal during a long evaluation must not wait for its end: the batches
    stop coming, evaluate() scores what it has on every rank (its collectives
    stay matched), and the engine, which sees the stop, throws the result away,
    checkpoints and exits (engine.train)."""

    def __iter__(self):
        batches = super().__iter__()
        while not preempt.stop_requested():
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield batch


def build_eval_loader(src: DataConfig, dataset, *, rank: int = 0, world_size: int = 1, batch_size: int = 32,
                      workers: int = 2) -> DataLoader:
    """This rank's shard `range(rank, N, world_size)` in order: no shuffle, no padding duplicates."""
    return EvalLoader(dataset, batch_size=batch_size, sampler=list(range(rank, len(dataset), world_size)),
                      num_workers=workers, collate_fn=collate_fn(src.task, src.ignore_index),
                      pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init,
                      # the workers' base seed comes from here: evaluating never draws from the global
                      # RNG, so a run that skips an evaluation trains on the same random numbers
                      generator=torch.Generator().manual_seed(0))
