"""One run per run directory (OUT/.lock), a resume that checks the config first, and --out checks.

The CLI tests run the tiny expand run of runner.write_config (3 steps, one process, no loader
workers); the table and the lock are also tested in this process, where they cost nothing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from runner import REPO, Proc, as_sets, assert_same_state, cli, demo_toml, env, model_state, run, train_steps, write_config
from xlearner.run import rundir
from xlearner.config import Config, TrainConfig
from xlearner.run.rundir import INFO, LOCK, REFUSE, WARN, RunDirError, RunLock, ResumeError

FAST = as_sets(["expand.workers=0"])
HOST = socket.gethostname()


def step_line(step: int, steps: int = 3) -> re.Pattern:
    return re.compile(rf"\[expand\] step {step}/{steps} loss")


def errors(p: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in p.stderr.splitlines() if ln.startswith("Error:")]


def train_records(log: Path) -> list[tuple]:
    """(step, loss, losses, lr) of every train line: what a run computed, without its timings."""
    lines = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    return [(r["step"], r["loss"], r["losses"], r["lr"]) for r in lines if r["event"] == "train"]


@pytest.fixture(scope="module")
def lone(tmp_path_factory, demo_world) -> Path:
    """A finished 3-step run, alone in its directory: what every other run here is compared with."""
    root = tmp_path_factory.mktemp("lone")
    run("expand", "--config", str(write_config(root, demo_world, "lone", steps=3)), *FAST)
    return root / "lone"


# ----------------------------------------------------------------------------
# the lock, through the CLI

@pytest.mark.slow
def test_a_second_run_on_the_same_out_exits_1_naming_the_holder_and_the_first_is_untouched(tmp_path, demo_world,
                                                                                            lone):
    toml = write_config(tmp_path, demo_world, "a", steps=3)
    first = Proc(cli("expand", "--config", str(toml), *FAST))
    first.wait_for(step_line(1))
    first.signal_group(signal.SIGSTOP)  # holds the lock, mid-run, for as long as the second one takes
    try:
        log_before = (tmp_path / "a" / "log.jsonl").read_bytes()
        second = run("expand", "--config", str(toml), *FAST, check=False, timeout=120)
        log_after = (tmp_path / "a" / "log.jsonl").read_bytes()
    finally:
        first.signal_group(signal.SIGCONT)
    assert second.returncode == 1, second.stderr
    assert "Traceback" not in second.stderr and len(errors(second)) == 1, second.stderr
    assert f"{tmp_path / 'a'}: another run is using this directory: pid {first.p.pid} on host {HOST} since " \
           in errors(second)[0], second.stderr
    assert "step" not in second.stdout and log_after == log_before  # the second run wrote nothing
    assert first.finish() == 0, first.output
    assert train_records(tmp_path / "a" / "log.jsonl") == train_records(lone / "log.jsonl")
    assert train_steps(tmp_path / "a" / "log.jsonl") == [1, 2, 3]
    assert_same_state(model_state(tmp_path / "a" / "checkpoint.pt"), model_state(lone / "checkpoint.pt"))
    assert not (tmp_path / "a" / LOCK).exists()


@pytest.mark.slow
def test_the_lock_of_a_killed_run_is_taken_over_with_one_warning(tmp_path, demo_world):
    toml = write_config(tmp_path, demo_world, "k", steps=3)
    killed = Proc(cli("expand", "--config", str(toml), *FAST))
    killed.wait_for(step_line(1))
    killed.signal_group(signal.SIGKILL)  # no handler runs: the lock file stays, the kernel drops the flock
    killed.finish()
    assert json.loads((tmp_path / "k" / LOCK).read_text())["pid"] == killed.p.pid
    again = run("expand", "--config", str(toml), *FAST)
    took_over = [ln for ln in again.stderr.splitlines() if "took over the stale lock" in ln]
    assert len(took_over) == 1, again.stderr
    assert took_over[0].startswith(f"warning: [expand] {tmp_path / 'k' / LOCK}: took over the stale lock of pid "
                                   f"{killed.p.pid} on host {HOST} since ")
    assert train_steps(tmp_path / "k" / "log.jsonl")[-3:] == [1, 2, 3]
    assert not (tmp_path / "k" / LOCK).exists()


@pytest.mark.slow
def test_torchrun_refuses_a_lock_from_another_host_on_every_rank(tmp_path, demo_world):
    toml = write_config(tmp_path, demo_world, "t", steps=3)
    (tmp_path / "t").mkdir()
    foreign = {"host": "elsewhere.example", "pid": 4242, "stage": "expand", "since": "2026-01-01T00:00:00+00:00",
               "command": "python cli.py expand"}
    (tmp_path / "t" / LOCK).write_text(json.dumps(foreign))
    # --monitor-interval: the agent looks at its workers every 2 s, so it does not stop rank 1 for rank 0's exit
    # before rank 1 has said why it stops too
    launcher = [sys.executable, "-m", "xlearner.run.torchrun", "--standalone", "--nproc_per_node=2", "--monitor-interval=2",
                str(REPO / "cli.py")]
    p = subprocess.run([*launcher, "expand", "--config", str(toml), *FAST], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    refused = [ln for ln in p.stderr.splitlines() if ln.startswith("Error:")]
    assert len(refused) == 2, p.stderr[-3000:]  # rank 0 and rank 1 (told by rank 0): neither went on
    for line in refused:
        assert f"{tmp_path / 't' / LOCK}: locked by pid 4242 on host elsewhere.example since 2026-01-01" in line
        assert f"delete {tmp_path / 't' / LOCK} and run again" in line
    assert sorted(os.listdir(tmp_path / "t")) == [LOCK]  # nothing written, the lock left as it was
    assert json.loads((tmp_path / "t" / LOCK).read_text()) == foreign


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["expand", "squeeze", "transfer"])
def test_out_naming_a_file_is_refused_in_one_line(tmp_path, demo_world, stage):
    toml = demo_toml(demo_world, tmp_path / "runs", tmp_path / "demo.toml")
    afile = tmp_path / "afile"
    afile.write_text("not a run directory")
    extra = {"expand": [], "squeeze": ["--teacher", str(tmp_path / "teacher.pt")], "transfer": ["--backbone", "random"]}
    p = run(stage, "--config", str(toml), *extra[stage], "--out", str(afile), check=False, timeout=300)
    assert p.returncode == 1, p.stderr
    assert errors(p) == [f"Error: {afile}: exists and is not a directory; --out names a run directory"], p.stderr
    assert "Traceback" not in p.stderr and afile.read_text() == "not a run directory"


# ----------------------------------------------------------------------------
# resume with another config, through the CLI

@pytest.mark.slow
def test_resume_with_another_model_or_source_set_exits_2_naming_the_keys(tmp_path, demo_world, lone):
    shutil.copytree(lone, tmp_path / "r")
    toml = write_config(tmp_path, demo_world, "r", steps=3)
    one_source = re.sub(r'\[\[sources\]\]\nname = "texture-cls".*?batch_size = 4\n', "", toml.read_text(), flags=re.S)
    assert one_source.count("[[sources]]") == 1
    toml.write_text(one_source)
    before = (tmp_path / "r" / "checkpoint.pt").read_bytes()
    p = run("expand", "--config", str(toml), *FAST, *as_sets(["model.arch=resnet34", "model.reconcile=scalar"]),
            check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and len(errors(p)) == 1, p.stderr[-3000:]
    line = errors(p)[0]
    assert line.startswith(f"Error: {tmp_path / 'r' / 'checkpoint.pt'}: cannot resume, the config changes what this "
                           "run trains: "), line
    for change in ("model.arch: 'resnet18' -> 'resnet34'", "model.reconcile: 'hrnet' -> 'scalar'",
                   "sources: ['shapes-cls', 'texture-cls'] -> ['shapes-cls']"):
        assert change in line, line
    assert "expand.out" not in line  # bookkeeping is not a reason to refuse
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == before


@pytest.mark.slow
def test_resume_goes_on_with_more_steps_and_warns_once_for_a_new_image_size(tmp_path, demo_world, lone):
    shutil.copytree(lone, tmp_path / "r")
    more = run("expand", "--config", str(write_config(tmp_path, demo_world, "r", steps=4)), *FAST)
    assert f"resumed from {tmp_path / 'r' / 'checkpoint.pt'} at step 3" in more.stdout
    noted = [ln for ln in more.stdout.splitlines() if "resuming with a changed schedule or bookkeeping" in ln]
    assert len(noted) == 1 and "expand.steps: 3 -> 4" in noted[0], more.stdout
    assert not [ln for ln in more.stderr.splitlines() if ln.startswith("warning:")], more.stderr
    assert train_steps(tmp_path / "r" / "log.jsonl") == [1, 2, 3, 4]

    bigger = run("expand", "--config", str(write_config(tmp_path, demo_world, "r", steps=5)), *FAST,
                 *as_sets(["sources.shapes-cls.image_size=48"]))
    warned = [ln for ln in bigger.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1, bigger.stderr
    assert warned[0] == (f"warning: [expand] resuming {tmp_path / 'r' / 'checkpoint.pt'} with changed keys (the run "
                         "goes on, but not bit-exactly as it would have): sources.shapes-cls.image_size: 32 -> 48")
    assert train_steps(tmp_path / "r" / "log.jsonl") == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------
# the table and the lock, in this process

@pytest.mark.parametrize("key, expected", [
    ("model.arch", REFUSE), ("model.reconcile", REFUSE), ("model.pretrained", REFUSE), ("sources", REFUSE),
    ("sources.a.task", REFUSE), ("sources.a.num_classes", REFUSE), ("sources.a.classes", REFUSE),
    ("teacher.sha256", REFUSE), ("squeeze.student_init", REFUSE), ("squeeze.distill_stages", REFUSE),
    ("squeeze.distill_targets", REFUSE), ("squeeze.heads", REFUSE), ("expand.optimizer", REFUSE),
    ("model.compile", WARN), ("sources.a.image_size", WARN), ("sources.a.batch_size", WARN), ("world_size", WARN),
    ("expand.seed", WARN), ("expand.lr", WARN), ("squeeze.distill_loss", WARN), ("squeeze.lambda_kd", WARN),
    ("squeeze.teacher_norm", WARN), ("squeeze.a_key_added_later", WARN),
    ("expand.steps", INFO), ("squeeze.eval_every", INFO), ("expand.ckpt_every", INFO), ("expand.log_every", INFO),
    ("squeeze.workers", INFO), ("expand.out", INFO), ("teacher.path", INFO),
])
def test_each_key_has_its_class(key, expected):
    assert rundir.key_class(key) == expected


def test_resume_changes_list_both_values_and_skip_what_one_side_lacks():
    old = {"model.arch": "resnet18", "expand.steps": 3, "sources.a.image_size": 32, "only.old": 1}
    new = {"model.arch": "resnet34", "expand.steps": 4, "sources.a.image_size": 32, "only.new": 2}
    assert rundir.resume_changes(old, new) == {REFUSE: ["model.arch: 'resnet18' -> 'resnet34'"], WARN: [],
                                               INFO: ["expand.steps: 3 -> 4"]}


def test_a_key_the_checkpoint_predates_compares_at_its_default(tmp_path):
    config = Config(expand=TrainConfig(out=str(tmp_path)))
    written = config.to_dict()
    del written["model"]["compile"]  # a checkpoint from before model.compile existed
    rundir.check_resume(tmp_path / "checkpoint.pt", {"config": written, "meta": {}, "rng": [0]}, config, {}, "expand")
    config.model.arch = "resnet50"
    with pytest.raises(ResumeError, match=r"model\.arch: 'resnet18' -> 'resnet50'; resume with the config in "):
        rundir.check_resume(tmp_path / "checkpoint.pt", {"config": written, "meta": {}, "rng": [0]}, config, {},
                            "expand")


def test_a_squeeze_resume_refuses_another_teacher_and_notes_a_moved_one(tmp_path, capsys):
    config = Config()
    ckpt = {"config": config.to_dict(), "rng": [0], "meta": {"teacher": "a/checkpoint.pt", "teacher_sha256": "1" * 64}}
    rundir.check_resume(tmp_path / "c.pt", ckpt, config, {"teacher": "b/checkpoint.pt", "teacher_sha256": "1" * 64},
                        "squeeze")
    assert "teacher.path: 'a/checkpoint.pt' -> 'b/checkpoint.pt'" in capsys.readouterr().out
    with pytest.raises(ResumeError, match=r"teacher\.sha256: '1{64}' -> '2{64}'"):
        rundir.check_resume(tmp_path / "c.pt", ckpt, config, {"teacher": "a/checkpoint.pt",
                                                             "teacher_sha256": "2" * 64}, "squeeze")


def test_a_lock_is_exclusive_while_held_and_gone_once_released(tmp_path):
    with RunLock(tmp_path / "run", "expand"):
        record = json.loads((tmp_path / "run" / LOCK).read_text())
        assert (record["host"], record["pid"], record["stage"]) == (HOST, os.getpid(), "expand")
        with pytest.raises(RunDirError, match=rf"another run is using this directory: pid {os.getpid()} on host "):
            RunLock(tmp_path / "run", "squeeze").acquire()  # a second open file of the same lock: refused too
    assert not (tmp_path / "run" / LOCK).exists()
    with RunLock(tmp_path / "run", "expand"):  # and free again
        pass


def test_a_stale_lock_of_this_host_is_taken_over_and_one_of_another_host_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"host": HOST, "pid": 999999, "since": "then", "stage": "expand",
                                        "command": "x"}))
    with RunLock(out, "expand"):
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    assert capsys.readouterr().err.count("took over the stale lock of pid 999999 on host") == 1
    (out / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}))
    with pytest.raises(RunDirError, match=rf"if no run uses {re.escape(str(out))} any more, delete "):
        RunLock(out, "expand").acquire()
    assert json.loads((out / LOCK).read_text())["host"] == "elsewhere"


def test_an_out_that_cannot_be_a_directory_is_refused(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(RunDirError, match=r"afile/run: cannot write the run directory there \(Not a directory\)"):
        RunLock(tmp_path / "afile" / "run", "expand").acquire()
