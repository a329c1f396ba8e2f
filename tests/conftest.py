"""Shared fixtures: the repo on sys.path, a tiny demo world, and a config pointing into it."""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from xlearner.config import Config, config_from_dict  # noqa: E402
from xlearner.tools.demo import generate  # noqa: E402

DEMO_CONFIG = REPO / "configs" / "demo.toml"


@pytest.fixture(scope="session")
def demo_world(tmp_path_factory) -> Path:
    """The demo world at 5% scale (a few images per class), written once per test session."""
    out = tmp_path_factory.mktemp("demo")
    generate(out, seed=0, scale=0.05)
    return out


def _rewrite(node, old: str, new: str):
    """Replace the `old` path prefix in every string of a nested TOML dict / list."""
    if isinstance(node, dict):
        return {k: _rewrite(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite(v, old, new) for v in node]
    if isinstance(node, str) and (node == old or node.startswith(old + "/")):
        return new + node[len(old):]
    return node


@pytest.fixture
def demo_config(demo_world, tmp_path) -> Config:
    """configs/demo.toml with data read from `demo_world` and runs written under this test's tmp dir.

    A fresh Config per test, so a test may change it freely.
    """
    data = tomllib.loads(DEMO_CONFIG.read_text())
    data = _rewrite(data, "data/demo", str(demo_world))
    data = _rewrite(data, "runs/demo", str(tmp_path / "runs"))
    return config_from_dict(data)
