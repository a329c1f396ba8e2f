"""The ablation's bookkeeping and statistics, by hand: budgets, per-variant configs, t-intervals, verdicts.

Training and transferring every variant is covered end to end by `test_cli.py::test_ablate_quick`; here
the numbers that go into the miniature's table are checked against values worked out on paper.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from xlearner.config import ConfigError
from xlearner.tools import ablate, ablate_report
from xlearner.tools.ablate_config import AblationConfig, load_ablation_config
from xlearner.tools.ablate_report import t_interval, verdict

from runner import demo_toml


def _cfg(datasets: dict[str, str]):
    """Just what summarise() reads: the downstream datasets' names and tasks."""
    ds = [SimpleNamespace(name=n, task=t) for n, t in datasets.items()]
    return SimpleNamespace(transfer=SimpleNamespace(datasets=ds))


def test_t_interval_and_verdicts_by_hand():
    # d = 1..5: mean 3, sd sqrt(2.5), se sqrt(2.5 / 5) = 0.70711, t_{0.975,4} = 2.776 -> 1.96293
    mean, half = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == pytest.approx(3.0) and half == pytest.approx(2.776 * math.sqrt(0.5), abs=1e-9)
    assert half == pytest.approx(1.96293, abs=1e-5) and verdict(mean, half) == "win"
    # d = -4, -5, -6: mean -5, sd 1, t_{0.975,2} = 4.303 -> half 4.303 / sqrt(3) = 2.48434: the interval is below 0
    mean, half = t_interval([-4.0, -5.0, -6.0])
    assert (mean, round(half, 5)) == (-5.0, 2.48434) and verdict(mean, half) == "loss"
    # d = -1, 0.5, 0, 0.5, 0: mean 0, variance 1.5 / 4, half 2.776 * sqrt(0.375 / 5) = 0.76023: inside ±2, a tie
    mean, half = t_interval([-1.0, 0.5, 0.0, 0.5, 0.0])
    assert mean == pytest.approx(0.0, abs=1e-12) and half == pytest.approx(0.76023, abs=1e-5)
    assert verdict(mean, half) == "tie"
    # d = 5, -5, 4, -3, 1: mean 0.4, squared deviations 75.2, sd sqrt(75.2 / 4) = 4.33590, half 2.776 * 4.33590 / sqrt(5) = 5.38286
    mean, half = t_interval([5.0, -5.0, 4.0, -3.0, 1.0])
    assert mean == pytest.approx(0.4) and half == pytest.approx(5.38286, abs=1e-5)
    assert verdict(mean, half) == "undecided"  # contains 0, but too wide to call a tie
    assert verdict(1.5, 0.4) == "win" and verdict(1.0, 1.0) == "tie" and verdict(0.5, 1.6) == "undecided"
    assert t_interval([7.0]) == (7.0, None) and verdict(7.0, None) == "undecided"  # one seed decides nothing


def test_a_teacher_that_scored_zero_has_no_ratio():
    """A tiny run's teacher can score 0 AP: its student's ratio is NaN for that seed, not a ZeroDivisionError."""
    cfg = _cfg({"a": "cls", "d": "det"})
    scores = {"teacher_rl": {0: {"a": 10.0, "d": 0.0}, 1: {"a": 20.0, "d": 2.0}},
              "xlearner": {0: {"a": 12.0, "d": 1.0}, 1: {"a": 18.0, "d": 3.0}}}
    s = ablate_report.summarise(cfg, scores, {"teacher_rl": 4, "xlearner": 8}, teachers={"xlearner": "teacher_rl"})
    assert s["transfer_ratios"]["xlearner"]["cls mean"][0] == pytest.approx((1.2 + 0.9) / 2)
    assert math.isnan(s["transfer_ratios"]["xlearner"]["det mean"][0])


def test_summarise_pairs_seeds_per_task_mean():
    cfg = _cfg({"a": "cls", "b": "cls", "d": "det"})
    scores = {  # the xlearner - ssst cls-mean differences per seed are 3.5 and 6.5 and 5.0
        "ssst": {0: {"a": 10.0, "b": 20.0, "d": 1.0}, 1: {"a": 14.0, "b": 30.0, "d": 3.0},
                 2: {"a": 12.0, "b": 24.0, "d": 2.0}},
        "xlearner": {0: {"a": 17.0, "b": 20.0, "d": 2.0}, 1: {"a": 22.0, "b": 35.0, "d": 3.0},
                     2: {"a": 16.0, "b": 30.0, "d": 4.0}},
    }
    s = ablate_report.summarise(cfg, scores, {"ssst": 480, "xlearner": 480})
    assert list(s["rows"]) == ["a", "b", "d", "cls mean", "det mean"]
    # ssst cls mean per seed: 15, 22, 18 -> mean 18.33333, sd sqrt(24.66667 / 2), half 4.303 * sd / sqrt(3)
    mean, half = s["rows"]["cls mean"]["ssst"]
    assert mean == pytest.approx(55 / 3) and half == pytest.approx(4.303 * math.sqrt(37 / 3) / math.sqrt(3))
    (cls,) = [c for c in s["claims"] if c["row"] == "cls mean"]
    assert cls["claim"] == "X-Learner vs SSST" and cls["n"] == 3
    assert cls["diff"] == pytest.approx(5.0) and cls["half"] == pytest.approx(4.303 * 1.5 / math.sqrt(3))
    assert cls["verdict"] == "win"  # 5.0 - 3.72651 > 0
    (det,) = [c for c in s["claims"] if c["row"] == "det mean"]  # 1, 0, 2: mean 1, half 4.303 / sqrt(3)
    assert det["diff"] == pytest.approx(1.0) and det["verdict"] == "undecided"
    md = ablate_report.to_markdown(s, {"ssst": "SSST", "xlearner": "X-Learner"})
    assert "| steps | 480 | 480 |" in md
    assert "| claim (A − B, points) | cls | det |\n|---|---|---|\n" in md
    assert "| X-Learner vs SSST | +5.00 ± 3.73 win | +1.00 ± 2.48 undecided |" in md


@pytest.fixture
def ablation_config(demo_world, tmp_path) -> AblationConfig:
    """configs/demo.toml as `python cli.py ablate` reads it: the runs' Config and the [ablate] section's defaults."""
    return load_ablation_config(demo_toml(demo_world, tmp_path / "runs", tmp_path / "ablation.toml"))


def test_budgets_are_equal(ablation_config):
    ablation_config.expand.steps, ablation_config.squeeze.steps = 240, 200
    budgets = {v: ablate.budget(ablation_config, v) for v in ablate.VARIANTS}
    assert budgets.pop("teacher_rl") == budgets.pop("teacher_norl") == 240  # half of X-Learner's budget
    assert budgets.pop("teacher_prev") == 220  # the previous recipe: half of this config's 440
    # the grid's teachers get the rest of the budget after their squeeze's share (a quarter, half, three quarters)
    assert {v: budgets.pop(v) for v in list(budgets) if v.startswith("gt_")} == {
        "gt_ind_240": 220, "gt_sh_240": 220, "gt_ind_120": 330, "gt_sh_120": 330, "gt_ind_360": 110, "gt_sh_360": 110}
    assert set(budgets.values()) == {440}, budgets  # every other variant: expand + squeeze steps


def test_variant_configs(ablation_config):
    out = Path("/runs/abl")
    ablation_config.expand.steps, ablation_config.squeeze.steps = 240, 200
    ssst = ablate.variant_config(ablation_config, "ssst", 1, out)
    assert [s.name for s in ssst.sources] == ["shapes-cls"]  # the first cls source
    assert ssst.model.tasks == ["cls"] and ssst.model.reconcile == "none" and ssst.expand.steps == 440
    assert ssst.expand.seed == ssst.squeeze.seed == 1 and ssst.expand.out == "/runs/abl/seed1/ssst"
    msst = ablate.variant_config(ablation_config, "msst", 0, out)  # one backbone over every cls source
    assert [s.name for s in msst.sources] == ["shapes-cls", "texture-cls"] and msst.model.tasks == ["cls"]
    assert msst.expand.steps == 440 and msst.model.reconcile == "none"
    msmt = ablate.variant_config(ablation_config, "msmt", 0, out)  # hard sharing: one backbone, every source and head
    assert msmt.model.shared_backbone and len(msmt.sources) == len(ablation_config.sources)
    v1 = ablate.variant_config(ablation_config, "xlearner_v1", 0, out).squeeze
    assert (v1.distill_targets, v1.teacher_norm, v1.distill_loss, v1.heads, v1.student_init, v1.lr) == (
        "own", "none", "l2", "copy", "task:cls", 0.001)
    assert ablate.variant_config(ablation_config, "xlearner", 0, out).squeeze.distill_targets == \
        ablation_config.squeeze.distill_targets  # X-Learner squeezes as configured
    norl = ablate.variant_config(ablation_config, "expand_norl", 0, out)
    assert norl.model.reconcile == "none" and len(norl.sources) == len(ablation_config.sources)
    assert norl.expand.steps == 200  # on top of teacher_norl's 240
    rl = ablate.variant_config(ablation_config, "expand_rl", 0, out)
    assert rl.model.reconcile == ablation_config.model.reconcile != "none"
    assert ablate.variant_config(ablation_config, "xlearner", 0, out).squeeze.steps == 200
    assert ablate.variant_config(ablation_config, "teacher_rl", 0, out).expand.steps == 240
    assert ablation_config.expand.out != norl.expand.out  # the input config is left untouched
    assert ablate.run_dir(out, 2, "expand_rl_alone") == out / "seed2" / "expand_rl"  # a row, not a run
    assert ablate.needed(["xlearner"]) == {"xlearner", "teacher_rl"}
    assert ablate.needed(["expand_rl_alone"]) == {"expand_rl_alone", "expand_rl", "teacher_rl"}

    ablation_config.ablate.ssst_source = "texture-cls"
    assert [s.name for s in ablate.variant_config(ablation_config, "ssst", 0, out).sources] == ["texture-cls"]
    ablation_config.ablate.ssst_source = "no-such-source"
    with pytest.raises(ConfigError, match="ablate.ssst_source: no cls source named 'no-such-source'"):
        ablate.variant_config(ablation_config, "ssst", 0, out)


def test_missing_optional_dataset_is_skipped_with_the_reason(ablation_config, tmp_path, capsys):
    from xlearner.config import TransferDatasetConfig
    ablation_config.transfer.datasets.append(TransferDatasetConfig(name="FashionMNIST", task="cls", format="torchvision",
                                                      root=str(tmp_path / "nowhere"), image_size=32))
    ablation_config.ablate.optional_datasets = ["FashionMNIST"]
    assert ablate.drop_missing_datasets(ablation_config) == ["FashionMNIST"]
    assert "FashionMNIST" not in [d.name for d in ablation_config.transfer.datasets]
    assert "[ablate] skipping downstream dataset FashionMNIST: its files are missing" in capsys.readouterr().out
    ablation_config.ablate.optional_datasets = []  # a dataset that is not optional is not dropped: it fails later
    assert ablate.drop_missing_datasets(ablation_config) == []


def test_a_worker_takes_every_unit_even_while_another_holds_the_queue():
    """multiprocessing.Queue.get_nowait() raises Empty while another process holds the read lock, though
    units remain: a worker must not take that for the end (one did, and one process ran a whole table)."""
    import queue

    class Contended:
        def __init__(self, items):
            self.items = list(items)

        def get_nowait(self):
            raise queue.Empty  # what a busy read lock looks like to get_nowait

        def get(self):
            return self.items.pop(0)

    units = [(("teacher_rl",), 0), (("msmt",), 0), (("ssst",), 1)]
    assert list(ablate.take_units(Contended(units + [None, None]))) == units


def _ablate_cfg(**sets):
    return load_ablation_config(str(Path(__file__).resolve().parents[1] / "configs" / "ablate.toml"),
                                [f"{k}={v}" for k, v in sets.items()])


def test_the_split_keeps_the_total_budget():
    cfg = _ablate_cfg()
    assert cfg.expand.steps + cfg.squeeze.steps == 480
    # the grid's three splits: the teacher gets what the squeeze does not, every X-Learner spends 480
    for n, teacher in ((120, 360), (240, 240), (360, 120)):
        for b in ("ind", "sh"):
            assert ablate.steps_of(cfg, ablate.VARIANTS[f"gt_{b}_{n}"]) == teacher
            assert ablate.budget(cfg, f"gt_{b}_{n}") == teacher
        for b, st in ablate.GRID2_RECIPES:
            assert ablate.steps_of(cfg, ablate.VARIANTS[f"gx_{b}_{st}_{n}"]) == n
            assert ablate.budget(cfg, f"gx_{b}_{st}_{n}") == 480
    # ablate.squeeze_steps moves X-Learner's split; every variant still spends 480
    cfg = _ablate_cfg(**{"ablate.squeeze_steps": 120})
    assert ablate.budget(cfg, "teacher_rl") == 360
    assert {v: ablate.budget(cfg, v) for v in ("xlearner", "expand_rl", "msmt", "ssst", "expand_norl")} == dict.fromkeys(
        ("xlearner", "expand_rl", "msmt", "ssst", "expand_norl"), 480)
    c = ablate.variant_config(cfg, "xlearner", 0, Path("runs"))
    assert (c.squeeze.steps, ablate.variant_config(cfg, "teacher_rl", 0, Path("runs")).expand.steps) == (120, 360)
    # --quick's 8 steps keep the share: 120 / 480 of 8 = 2
    q = ablate.quick(cfg)
    assert (ablate.budget(q, "teacher_rl"), ablate.budget(q, "xlearner")) == (6, 8)
    assert (ablate.budget(q, "gt_sh_360"), ablate.budget(q, "gx_sh_mean_360")) == (2, 8)
    with pytest.raises(ConfigError, match=r"ablate.squeeze_steps: must be in \[0, 480\)"):
        _ablate_cfg(**{"ablate.squeeze_steps": 480})


def test_grid_names_in_config_match_the_variants():
    from xlearner.tools.ablate_config import VARIANT_NAMES
    assert set(VARIANT_NAMES) == set(ablate.VARIANTS)
    assert ablate.VARIANTS["gt_sh_120"].model == {"branch_init": "shared"}
    assert ablate.VARIANTS["gx_sh_mean_120"].teacher == "gt_sh_120"
    assert ablate.VARIANTS["gx_sh_mean_120"].squeeze == {"student_init": "mean"}
    assert ablate.VARIANTS["gx_ind_cls_240"].squeeze == {"student_init": "task:cls"}


def test_margin_rule_by_hand():
    tasks_of = {"a": "cls", "b": "cls", "d": "det"}
    sc = lambda a, b, d: {"a": a, "b": b, "d": d}  # noqa: E731
    summary = {"scores": {"msmt": {"0": sc(10, 20, 5), "1": sc(12, 22, 7)},
                          "x1": {"0": sc(12, 20, 6), "1": sc(14, 22, 6)},     # cls +1, det 0 -> min 0
                          "x2": {"0": sc(20, 30, 5.2), "1": sc(20, 30, 7.0)},  # cls +9, det +0.1 -> min 0.1
                          "x3": {"0": sc(8, 20, 9), "1": sc(10, 22, 9)}},      # cls -1, det +3 -> min -1
               "transfer_ratios": {"x1": {"cls mean": [0.99, 0.1], "det mean": [0.97, 0.1]},
                                   "x2": {"cls mean": [1.02, 0.1], "det mean": [0.90, 0.1]},
                                   "x3": {"cls mean": [1.0, 0.1], "det mean": [1.0, 0.1]}}}
    out = ablate_report.margin_rule(summary, tasks_of, ["x1", "x2", "x3"])
    assert out["table"]["x1"]["margin"] == pytest.approx({"cls": 1.0, "det": 0.0})
    assert out["table"]["x2"]["margin"] == pytest.approx({"cls": 9.0, "det": 0.1})
    assert out["table"]["x3"]["min_margin"] == pytest.approx(-1.0)
    # x1 (0) and x2 (0.1) are within 0.5 points: the larger min ratio decides, 0.97 over 0.90
    assert out["winner"] == "x1" and out["table"]["x1"]["min_ratio"] == 0.97
    # a narrower band: x2's margin alone is best
    assert ablate_report.margin_rule(summary, tasks_of, ["x1", "x2", "x3"], band=0.05)["winner"] == "x2"


@pytest.mark.slow
def test_pack_ablate_runs_copies_only_finished_chains(tmp_path):
    """scripts/pack_ablate_runs.py: a chain's small files go only when every run and transfer of it is done."""
    import json
    import subprocess
    import sys
    from runner import REPO
    runs, dest = tmp_path / "runs", tmp_path / "packed"
    for name, step in (("msmt", 480), ("msst", 479), ("teacher_prev", 240), ("xlearner_prev", 240)):
        (runs / "seed0" / name).mkdir(parents=True)
        (runs / "seed0" / name / "metrics.json").write_text(json.dumps({"step": step}))
        (runs / "seed0" / name / "log.jsonl").write_text("{}\n")
        (runs / "seed0" / name / "checkpoint.pt").write_bytes(b"big")
    for name in ("msmt", "msst", "teacher_prev"):  # xlearner_prev trained but not transferred
        (runs / "seed0" / "transfer" / name).mkdir(parents=True)
        (runs / "seed0" / "transfer" / name / "scores.json").write_text("{}")
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "pack_ablate_runs.py"), str(REPO / "configs" / "ablate.toml"),
                        str(runs), str(dest)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout == "seed 0: msmt\n", p.stdout + p.stderr
    assert sorted(str(f.relative_to(dest)) for f in dest.rglob("*") if f.is_file()) == [
        "seed0/msmt/log.jsonl", "seed0/msmt/metrics.json", "seed0/transfer/msmt/scores.json"]
