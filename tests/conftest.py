"""Shared fixtures: the repo on sys.path, the one world factory, the demo world and a config pointing into it.

Every test that needs a generated world asks `make_world` (or `demo_world`, its 5% demo world); every
test that needs configs/demo.toml pointed at a world uses runner.demo_toml (or `demo_config`, built on it).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from runner import demo_toml  # noqa: E402
from xlearner.config import Config  # noqa: E402
from xlearner.configfile import load_config  # noqa: E402
from xlearner.tools.demo import generate  # noqa: E402


@pytest.fixture(scope="session")
def make_world(tmp_path_factory):
    """make_world(scale, world="demo") -> the world `cli.py demo-data --world WORLD --scale SCALE` writes (seed 0).

    Written once per test session for each (scale, world) and shared read-only by every test that asks."""
    made: dict[tuple[float, str], Path] = {}

    def make(scale: float, world: str = "demo") -> Path:
        if (scale, world) not in made:
            out = tmp_path_factory.mktemp(f"{world}-{scale}")
            generate(out, seed=0, scale=scale, world=world)
            made[scale, world] = out
        return made[scale, world]
    return make


@pytest.fixture(scope="session")
def demo_world(make_world) -> Path:
    """The demo world at 5% scale (a few images per class)."""
    return make_world(0.05)


@pytest.fixture
def demo_config(demo_world, tmp_path) -> Config:
    """configs/demo.toml with data read from `demo_world` and runs written under this test's tmp dir.

    A fresh Config per test, so a test may change it freely.
    """
    return load_config(demo_toml(demo_world, tmp_path / "runs", tmp_path / "demo_config.toml"))
