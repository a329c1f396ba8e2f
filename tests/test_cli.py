"""The command line as a user meets it: README blocks, check-data, export, bench, ablate --quick, --help."""
from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from runner import REPO, as_sets, demo_toml, env, run, tiny_sizes

TINY = ["expand.steps=2", "squeeze.steps=2", "expand.workers=0", "squeeze.workers=0", "transfer.workers=0",
        "transfer.epochs=1", *tiny_sizes(cls_batch=4)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, demo_world):
    """(the demo world, configs/demo.toml pointed at it)"""
    root = tmp_path_factory.mktemp("cli")
    return demo_world, demo_toml(demo_world, root / "runs", root / "demo.toml")


def readme_blocks() -> list[str]:
    """Fenced bash blocks of README.md marked `<!-- readme-test -->` on the line before."""
    text = (REPO / "README.md").read_text()
    return re.findall(r"<!-- readme-test -->\n```bash\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_readme_test_blocks_run(tmp_path):
    blocks = readme_blocks()
    assert blocks, "README.md has no block marked <!-- readme-test -->"
    (tmp_path / "cli.py").symlink_to(REPO / "cli.py")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    for block in blocks:
        for line in block.strip().splitlines():
            args = shlex.split(line)
            assert args[0] == "python", line
            p = subprocess.run([sys.executable, *args[1:]], cwd=tmp_path, env=env(), capture_output=True, text=True,
                               timeout=600)
            assert p.returncode == 0, f"{line}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    assert (tmp_path / "data" / "demo" / ".complete").exists()


OPTIONS = {  # every command's options, exactly (check-data --out and export --set were dead: removed)
    "demo-data": ["--out", "--seed", "--scale", "--downstream-scale", "--world", "--workers"],
    "clipart": ["--out", "--root"],
    "check-data": ["--config", "--set"],
    "expand": ["--config", "--set", "--out", "--init"],
    "squeeze": ["--config", "--set", "--teacher", "--out"],
    "transfer": ["--config", "--set", "--backbone", "--name", "--branch", "--with-rl", "--out"],
    "export": ["--checkpoint", "--out", "--branch"],
    "bench": ["--config", "--set", "--steps", "--teacher", "--backbone", "--out"],
    "ablate": ["--config", "--set", "--out", "--quick", "--seeds", "--jobs"],
    "plot": ["--out"],
}


def _options(help_text: str) -> list[str]:
    return re.findall(r"^  (?:-\w, )?(--[\w-]+)", help_text.split("Options:")[1], flags=re.M)


def test_every_command_documents_defaults():
    out = run("--help").stdout
    assert re.findall(r"^  ([\w-]+)  ", out.split("Commands:")[1], flags=re.M) == sorted(OPTIONS)
    assert _options(out) == ["--debug", "--help"]
    for cmd, options in OPTIONS.items():
        assert _options(run(cmd, "--help").stdout) == options + ["--help"], cmd
    demo = run("demo-data", "--help").stdout
    assert "(default: data/WORLD)" in demo and "[default: demo]" in demo
    assert "[default: 20]" in run("bench", "--help").stdout


@pytest.mark.slow
def test_check_data_lists_every_problem(tiny, tmp_path):
    demo_world, toml = tiny
    ok = run("check-data", "--config", str(toml))
    assert ok.stdout == "ok: 9 source(s) checked, no problems\n"  # 5 sources + 4 transfer datasets
    # break two sources in a copy of the world: a corrupt image and an out-of-range mask
    import shutil
    world = tmp_path / "world"
    shutil.copytree(demo_world, world)
    img = sorted((world / "shapes-cls" / "train").rglob("*.png"))[0]
    img.write_bytes(b"\x89PNG broken")
    mask = sorted((world / "shapes-seg" / "val" / "masks").glob("*.png"))[0]
    from PIL import Image
    m = Image.open(mask)
    m.putpixel((0, 0), 200)
    m.save(mask)
    bad = run("check-data", "--config", str(demo_toml(world, tmp_path / "runs", tmp_path / "bad.toml")), check=False)
    assert bad.returncode == 1
    assert img.name in bad.stdout and mask.name in bad.stdout
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_expand_export_and_bench(tiny, tmp_path):
    _, toml = tiny
    run("expand", "--config", str(toml), "--out", str(tmp_path / "exp"), *as_sets(TINY))
    for branch in ("cls", "det", "seg"):
        out = tmp_path / f"{branch}.pth"
        run("export", "--checkpoint", str(tmp_path / "exp" / "checkpoint.pt"), "--branch", branch, "--out", str(out))
        missing, unexpected = torchvision.models.resnet18().load_state_dict(torch.load(out, weights_only=True),
                                                                            strict=False)
        assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    bad = run("export", "--checkpoint", str(tmp_path / "exp" / "checkpoint.pt"), "--branch", "depth",
              "--out", str(tmp_path / "x.pth"), check=False)
    assert bad.returncode == 1
    assert bad.stderr == (f"Error: {tmp_path / 'exp' / 'checkpoint.pt'}: branch 'depth': the expanded model's branches are "
                          "['cls', 'det', 'seg']\n")
    # each bench's own numbers agree with each other; the ratio of the loader bench is checked on known
    # rates in test_data.py. TINY's sources: 2 cls batches of 4, 2 det and 1 seg batch of 2 = 14 images a step
    times = {"loader": ("multi_images_per_s", "plain_images_per_s"), "expand": ("step_s", "floor_s"),
             "squeeze": ("step_s", "floor_s"), "transfer": ("transfer_s", "extract_s")}
    for what, extra in (("loader", []), ("expand", []), ("squeeze", ["--teacher", str(tmp_path / "exp" / "checkpoint.pt")]),
                        ("transfer", [])):
        p = run("bench", what, "--config", str(toml), "--steps", "2", *extra, *as_sets(TINY))
        result = json.loads(p.stdout.strip().splitlines()[-1])
        a, b = (result[k] for k in times[what])
        assert result["bench"] == what and a > 0 and b > 0
        if what in ("expand", "squeeze"):
            assert result["images_per_s"] == pytest.approx(14 / a) and result["arch"] == "resnet18"
        elif what == "loader":  # expand.workers = 0: the main process decodes all 5 sources
            assert (result["images_per_step"], result["worker_processes"]) == (14, 5)
        else:  # the best of the 3 alternated rounds of each side is what it reports
            rounds = result["rounds_s"]
            assert len(rounds["transfer"]) == len(rounds["extract"]) == 3
            assert (a, b) == pytest.approx((min(rounds["transfer"]), min(rounds["extract"])), abs=0.0051)


FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist; absent on CI
FASHION_TOML = f"""
[[transfer.datasets]]
name = "FashionMNIST"
task = "cls"
format = "torchvision"
root = "{FASHION}"
image_size = 32
batch_size = 64
train_subset = 10000
val_subset = 2000

[ablate]
optional_datasets = ["FashionMNIST"]
"""


@pytest.mark.slow
def test_ablate_quick(tiny, tmp_path):
    demo_world, _ = tiny
    toml = demo_toml(demo_world, tmp_path / "demo-runs", tmp_path / "ablate.toml", extra=FASHION_TOML)
    # One seed: every variant still trains and transfers, at a fraction of the disk; the statistics over
    # seeds are checked by hand in test_ablate.py.
    res = run("ablate", "--config", str(toml), "--quick", "--seeds", "1", "--out", str(tmp_path / "report"),
              *as_sets(TINY + [f'ablate.out="{tmp_path / "runs"}"']), timeout=1200)
    summary = json.loads((tmp_path / "report" / "ablation.json").read_text())
    assert summary["variants"] == ["ssst", "msst", "msmt", "teacher_rl", "expand_rl", "expand_rl_alone", "expand_norl",
                                   "xlearner", "xlearner_v1", "squeeze_norl"]
    assert summary["budgets"] == {"ssst": 8, "msst": 8, "msmt": 8, "teacher_rl": 4, "expand_rl": 8,
                                  "expand_rl_alone": 8, "expand_norl": 8, "xlearner": 8, "xlearner_v1": 8,
                                  "squeeze_norl": 8}
    assert summary["seeds"] == [0]
    assert sorted(p.name for p in (tmp_path / "runs" / "seed0").iterdir()) == sorted([
        "ssst", "msst", "msmt", "teacher_rl", "teacher_norl", "expand_rl", "expand_norl", "xlearner", "xlearner_v1",
        "squeeze_norl", "transfer"])
    fashion = ["FashionMNIST"] if FASHION.is_dir() else []
    assert list(summary["rows"]) == ["novel-cls", "count-cls", "novel-det", "novel-seg", *fashion,
                                     "cls mean", "det mean", "seg mean"]
    if not fashion:  # skipped with its reason, and nothing else fails
        assert "[ablate] skipping downstream dataset FashionMNIST: its files are missing" in res.stdout
        assert summary["skipped_datasets"] == ["FashionMNIST"]
    # the expanded variants are transferred with their RL inputs; "branch alone" is its own row
    claims = {c["claim"] for c in summary["claims"]}
    assert {"X-Learner vs SSST", "X-Learner vs MSST", "X-Learner vs MSMT (hard sharing)",
            "X-Learner: new squeeze vs squeeze v1"} <= claims
    assert set(summary["squeeze_ratios"]) == {"xlearner", "xlearner_v1", "squeeze_norl"}
    # downstream ratios need the teacher's transfer: teacher_norl is trained but not a column
    assert set(summary["transfer_ratios"]) == {"xlearner", "xlearner_v1"}
    # student / teacher downstream, per task mean: the ratio of the two variants' own rows, seed by seed
    for v, ratios in summary["transfer_ratios"].items():
        teacher = summary["teachers"][v]
        for task, (ratio, _) in ratios.items():
            student, of_teacher = summary["rows"][task][v][0], summary["rows"][task][teacher][0]
            # a teacher at 0 (a tiny run's AP) has no ratio: NaN, not a crash of the report
            assert math.isnan(ratio) if of_teacher == 0 else ratio == pytest.approx(student / of_teacher)
    md = (tmp_path / "report" / "ablation.md").read_text().splitlines()
    assert md[0] == ("| dataset | SSST | MSST | MSMT (hard sharing) | X-Learner's teacher (expand + RL) | Expand + RL "
                     "| Expand + RL, branch alone | Expand, no RL | X-Learner | X-Learner, squeeze v1 | Squeeze of no-RL |")
    assert md[2] == "| steps | 8 | 8 | 8 | 4 | 8 | 8 | 8 | 8 | 8 | 8 |"
    # a second run reuses every finished run and transfer: nothing is trained or transferred again
    again = run("ablate", "--config", str(toml), "--quick", "--seeds", "1", "--out", str(tmp_path / "report2"),
                *as_sets(TINY + [f'ablate.out="{tmp_path / "runs"}"']), timeout=300)
    assert "[ablate] seed" not in again.stdout and "[expand] step" not in again.stdout and "seed 0: " not in again.stdout
    assert json.loads((tmp_path / "report2" / "ablation.json").read_text())["rows"] == summary["rows"]
    assert [row.split(" | ")[0] for row in md[3:10 + len(fashion)]] == [
        "| novel-cls", "| count-cls", "| novel-det", "| novel-seg", *[f"| {f}" for f in fashion],
        "| **cls mean**", "| **det mean**", "| **seg mean**"]


def test_demo_check_fails_when_the_table_is_not_the_readmes(tmp_path):
    """`make demo-check` (scripts/check_demo_table.py) compares the README's demo table with what the demo printed."""
    script = [sys.executable, str(REPO / "scripts" / "check_demo_table.py")]
    table = (REPO / "README.md").read_text().split("<!-- demo-table -->\n```\n", 1)[1].split("```", 1)[0]
    (tmp_path / "same.md").write_text(table)
    (tmp_path / "other.md").write_text(table.replace("| novel-cls | top1 |", "| novel-cls | top1 | 0.01 |", 1))
    ok = subprocess.run([*script, str(REPO / "README.md"), str(tmp_path / "same.md")], capture_output=True, text=True)
    assert ok.returncode == 0 and "the same table" in ok.stdout
    bad = subprocess.run([*script, str(REPO / "README.md"), str(tmp_path / "other.md")], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith(f"Error: {tmp_path / 'other.md'} differs from the demo table")
    warn = subprocess.run([*script, str(REPO / "README.md"), str(tmp_path / "other.md"), "--warn"],
                          capture_output=True, text=True)
    assert warn.returncode == 0 and warn.stderr.startswith("warning:")
