"""scripts/gpu_check.sh and scripts/gpu_ablate.sh on a CPU (GPU_CHECK_TINY=1): every case runs and appends its JSON
line, nothing but a few kB lands under $OUT, and the 8x ablation's config loads and runs at toy size."""
from __future__ import annotations

import json
import os
import subprocess
import tarfile

import pytest

from runner import REPO, env
from xlearner.tools.ablate_config import load_ablation_config


@pytest.mark.slow
def test_gpu_check_tiny_runs_every_case(tmp_path, make_world):
    out = tmp_path / "out"
    # the script's own tiny world (demo-data --world standin --scale 0.02), written once for the session
    e = {**env(), "GPU_CHECK_TINY": "1", "OUT": str(out), "SCRATCH": str(tmp_path / "scratch"),
         "WORLD": str(make_world(0.02, "standin"))}
    p = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=e, capture_output=True, text=True,
                       timeout=1200)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [json.loads(ln) for ln in (out / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["case"] for r in lines] == ["env", "boxes", "backbone", "recipe", "squeeze", "syncbn-learning",
                                          "syncbn-all", "profile"], lines
    assert not [r for r in lines if "error" in r]
    assert lines[1]["ours"]["max_box_err_px"] == 0.0 and lines[1]["torchvision"]["max_box_err_px"] > 4
    assert lines[3]["step"] == 2 and lines[3]["max_mem_mb"] > 0 and "coco" in lines[3]["images_per_s_per_source"]
    assert "overhead_vs_recipe" in lines[5] and lines[7]["checkpoint_write_s"]
    # only the JSON lines and the log under $OUT (checkpoints stay in $SCRATCH): a few kB
    assert sorted(f.name for f in out.iterdir()) == ["gpu_check.jsonl", "gpu_check.log"]
    assert sum(f.stat().st_size for f in out.iterdir()) < 200_000
    assert p.stdout.splitlines()[-1].endswith("(0 errors)")
    # the syncbn cases ran in a process group (one rank, gloo on a CPU, where no BN is converted)
    log = (out / "gpu_check.log").read_text()
    assert log.count("gpucheck syncbn: process group gloo, world size 1, forced SyncBatchNorm forwards 0") == 2


def test_gpu_ablation_config_loads():
    cfg = load_ablation_config(str(REPO / "configs" / "ablate_gpu.toml"))
    ref = load_ablation_config(str(REPO / "configs" / "ablate.toml"))
    assert {s.name: s.batch_size for s in cfg.sources} == {s.name: 8 * s.batch_size for s in ref.sources}
    assert (cfg.expand.steps, cfg.squeeze.steps, cfg.expand.lr) == (ref.expand.steps, ref.squeeze.steps, ref.expand.lr)
    assert [d.name for d in cfg.transfer.datasets] == [d.name for d in ref.transfer.datasets if d.name != "openclipart"]
    assert cfg.ablate.variants == ["ssst", "msmt", "teacher_rl", "xlearner", "expand_rl"]


@pytest.mark.slow
def test_gpu_ablate_tiny_packs_what_finished(tmp_path, make_world):
    """The 8x ablation's script at toy size (--quick, one seed, SSST only): it runs, and packs every finished run's
    metrics.json, transfer's scores.json and the report into $OUT/ablate_gpu.tgz."""
    (tmp_path / "data").mkdir()
    os.symlink(make_world(0.05), tmp_path / "data" / "ablate")  # configs/ablate_gpu.toml reads data/ablate/...
    e = {**env(), "GPU_CHECK_TINY": "1", "OUT": str(tmp_path / "out"), "ABLATE_RUNS": str(tmp_path / "runs"),
         "ABLATE_DATA": str(tmp_path / "data" / "ablate")}
    p = subprocess.run(["bash", str(REPO / "scripts" / "gpu_ablate.sh"), "600", "--seeds", "1", "--set",
                        'ablate.variants=["ssst"]', "--set", f'data_root="{tmp_path}"',
                        "--set", "sources.shapes-cls.batch_size=8"],  # the 5 % world has 60 images a class source
                       env=e, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with tarfile.open(tmp_path / "out" / "ablate_gpu.tgz") as tar:
        names = sorted(tar.getnames())
    assert {"./seed0/ssst/metrics.json", "./seed0/transfer/ssst/scores.json", "./report/ablation.md"} <= set(names)
