"""Random-number state: what makes a resumed run draw exactly the numbers it would have drawn.

The engine (engine.py) stores `rng_state()` of every rank in each run checkpoint and puts it back
on resume, and saves and restores it around an evaluation, so that evaluating never moves the
training stream (RPN/RoI samplers, augmentations drawn in the main process). The loader's own
streams are seeded per sample (data.sample_seed) and need none of this.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """This process's torch, numpy, python (and CUDA) generator states, as a checkpoint stores them."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Put back what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
