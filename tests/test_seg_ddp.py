"""The seg loss under DDP: 2 processes x B give the gradients of 1 process x 2B, ignored pixels or not.

The loss is the mean over the labelled pixels of the global batch. Two gloo
processes each see half of one batch, with very different numbers of ignored
pixels; their DDP-averaged gradients must equal those of one process on the
whole batch. The model is in eval mode so that BN uses running statistics
(batch statistics of B and 2B differ by design): only the loss normalisation
is under test.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from xlearner.config import ModelConfig, SourceConfig
from xlearner.expand import XLearnerModel

IGNORE = 255


def make_model() -> XLearnerModel:
    torch.manual_seed(0)
    mcfg = ModelConfig(arch="resnet18", tasks=["seg"], reconcile="none", seg_channels=16)
    src = SourceConfig(name="seg", task="seg", image_size=32, ignore_index=IGNORE)
    return XLearnerModel(mcfg, [src], {"seg": 3}).eval()


def make_batch() -> dict:
    """4 images; rank 0 gets the first two (1.5 of 2 images labelled), rank 1 the last two (2 of 2 minus a row)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 32, generator=g)
    masks = torch.randint(0, 3, (4, 32, 32), generator=g)
    masks[1, :, :] = IGNORE
    masks[1, :8, :] = 1             # image 1: a quarter labelled
    masks[3, :1, :] = IGNORE        # image 3: one row ignored
    return {"images": images, "masks": masks}


def grads(model: XLearnerModel, module, batch: dict) -> dict[str, torch.Tensor]:
    model.total_loss(module({"seg": batch})).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = make_model()
        half = {k: v[2 * rank: 2 * rank + 2] for k, v in make_batch().items()}
        g = grads(model, DDP(model), half)
        if rank == 0:
            torch.save(g, out)
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_different_ignore_counts_equal_one_process(tmp_path):
    batch = make_batch()
    labelled = [(batch["masks"][2 * r: 2 * r + 2] != IGNORE).sum().item() for r in (0, 1)]
    assert labelled == [1280, 2016]  # the two ranks' pixel counts really differ
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    model = make_model()
    single = grads(model, model, batch)
    assert ddp.keys() == single.keys()
    for n in single:
        torch.testing.assert_close(ddp[n], single[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")
