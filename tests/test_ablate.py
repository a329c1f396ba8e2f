"""The ablation's bookkeeping, by hand: per-variant configs, mean ± std over seeds, task means, gains.

Training every variant is covered end to end by `test_cli.py::test_ablate_quick`; here the numbers
that go into the miniature table are checked against values worked out on paper.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from xlearner.tools import ablate
from xlearner.config import ConfigError


def _cfg(datasets: dict[str, str]):
    """Just what summarise() reads: the downstream datasets' names and tasks."""
    ds = [SimpleNamespace(name=n, task=t) for n, t in datasets.items()]
    return SimpleNamespace(transfer=SimpleNamespace(datasets=ds))


def test_summarise_mean_std_task_means_and_gains():
    cfg = _cfg({"a": "cls", "b": "cls", "d": "det"})
    scores = {
        "ssst": {0: {"a": 10.0, "b": 20.0, "d": 1.0}, 1: {"a": 14.0, "b": 30.0, "d": 3.0}},
        "xlearner": {0: {"a": 20.0, "b": 20.0, "d": 2.0}, 1: {"a": 22.0, "b": 40.0, "d": 4.0}},
    }
    s = ablate.summarise(cfg, scores)
    assert s["variants"] == ["ssst", "xlearner"] and s["seeds"] == [0, 1]
    mean, std = s["rows"]["a"]["ssst"]
    assert mean == pytest.approx(12.0) and std == pytest.approx(math.sqrt(8))  # sample std of 10, 14
    # task mean: per seed first (15, 22 and 20, 31), then mean ± std over seeds
    assert s["rows"]["cls mean"]["ssst"] == pytest.approx((18.5, math.sqrt(24.5)))
    assert s["rows"]["cls mean"]["xlearner"] == pytest.approx((25.5, math.sqrt(60.5)))
    assert s["rows"]["det mean"]["xlearner"] == pytest.approx((3.0, math.sqrt(2)))
    assert "seg mean" not in s["rows"]  # no seg dataset, no seg row

    md = ablate.to_markdown(s)
    cls_row = next(line for line in md.splitlines() if line.startswith("| **cls mean**"))
    assert cls_row == "| **cls mean** | 18.50 ± 4.95 | 25.50 ± 7.78 | +7.00 |"
    assert "gains in points over SSST" in md


def test_summarise_one_seed_has_zero_std():
    s = ablate.summarise(_cfg({"a": "seg"}), {"ssst": {3: {"a": 40.0}}})
    assert s["rows"]["a"]["ssst"] == (40.0, 0.0) and s["rows"]["seg mean"]["ssst"] == (40.0, 0.0)
    assert s["seeds"] == [3]


def test_variant_configs(demo_config):
    out = Path("/runs/abl")
    ssst = ablate.variant_config(demo_config, "ssst", 1, out)
    assert [s.name for s in ssst.sources] == ["shapes-cls"]  # the first cls source
    assert ssst.model.tasks == ["cls"] and ssst.model.reconcile == "none"
    assert ssst.expand.seed == ssst.squeeze.seed == 1 and ssst.expand.out == "/runs/abl/seed1/ssst"
    norl = ablate.variant_config(demo_config, "expand_norl", 0, out)
    assert norl.model.reconcile == "none" and len(norl.sources) == len(demo_config.sources)
    rl = ablate.variant_config(demo_config, "expand_rl", 0, out)
    assert rl.model.reconcile == demo_config.model.reconcile != "none"
    assert demo_config.expand.out != norl.expand.out  # the input config is left untouched

    demo_config.ablate.ssst_source = "texture-cls"
    assert [s.name for s in ablate.variant_config(demo_config, "ssst", 0, out).sources] == ["texture-cls"]
    demo_config.ablate.ssst_source = "no-such-source"
    with pytest.raises(ConfigError, match="ablate.ssst_source: no cls source named 'no-such-source'"):
        ablate.variant_config(demo_config, "ssst", 0, out)
