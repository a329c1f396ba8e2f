"""Stops the way clusters stop a run: a signal to the whole process group, torchrun, a stop during
evaluation, a slow step, a step that never finishes, a second signal. Every stop must end with exit
128+signal, one message and no traceback, and leave no run lock behind; a stop that could checkpoint
must resume to the same weights, bit for bit.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from runner import REPO, Proc, assert_same_state, cli, env, model_state, run, train_steps, write_config
from xlearner import data, expand
from xlearner.run.checkpoint import load_checkpoint

STEP_LINE = re.compile(r"\[expand\] step (\d+)/\d+ loss")


@pytest.fixture(scope="module")
def world(make_world):
    return make_world(0.2)


def assert_clean_stop(proc: Proc, code: int, sig=signal.SIGTERM) -> None:
    assert code == 128 + sig, f"exit {code}:\n{proc.output}"
    assert "Traceback" not in proc.output, proc.output
    assert "checkpoint written at step" in proc.output, proc.output


# ----------------------------------------------------------------------------
# (a) one process, loader workers, SIGTERM to the whole group at a random step

@pytest.mark.slow
def test_group_sigterm_at_a_random_step_resumes_exactly(tmp_path, world):
    full = write_config(tmp_path, world, "full", steps=6)
    cut = write_config(tmp_path, world, "cut", steps=6)
    run("expand", "--config", str(full))
    at = random.randint(1, 4)
    proc = Proc(cli("expand", "--config", str(cut)))
    proc.wait_for(re.compile(rf"\[expand\] step {at}/6 loss"))
    proc.signal_group()  # main process and its DataLoader worker alike
    assert_clean_stop(proc, proc.finish())
    assert not (tmp_path / "cut" / ".lock").exists()  # released on the way out of a stop
    stopped = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"]
    assert at <= stopped < 6, (at, stopped)
    resumed = run("expand", "--config", str(cut))
    assert f"resumed from {tmp_path / 'cut' / 'checkpoint.pt'} at step {stopped}" in resumed.stdout
    assert_same_state(model_state(tmp_path / "full" / "checkpoint.pt"), model_state(tmp_path / "cut" / "checkpoint.pt"))
    assert train_steps(tmp_path / "cut" / "log.jsonl") == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------
# (b) torchrun, 2 processes (gloo), SIGTERM to the launcher's group: the launcher forwards it too,
# so each rank gets it twice within milliseconds (one stop, not a "second signal")

@pytest.mark.slow
def test_torchrun_group_sigterm_resumes_exactly(tmp_path, world):
    full = write_config(tmp_path, world, "full", steps=5)
    cut = write_config(tmp_path, world, "cut", steps=5)
    launcher = [sys.executable, "-m", "xlearner.run.torchrun", "--standalone", "--nproc_per_node=2", str(REPO / "cli.py")]
    run_full = subprocess.run([*launcher, "expand", "--config", str(full)], cwd=REPO, env=env(),
                              capture_output=True, text=True, timeout=600)
    assert run_full.returncode == 0, run_full.stderr[-3000:]
    proc = Proc([*launcher, "expand", "--config", str(cut)])
    proc.wait_for(re.compile(r"\[expand\] step 2/5 loss"))
    proc.signal_group()
    assert_clean_stop(proc, proc.finish())
    assert "torchrun: SIGTERM" in proc.output
    assert not (tmp_path / "cut" / ".lock").exists()  # rank 0's lock, released by rank 0
    resumed = subprocess.run([*launcher, "expand", "--config", str(cut)], cwd=REPO, env=env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_state(model_state(tmp_path / "full" / "checkpoint.pt"), model_state(tmp_path / "cut" / "checkpoint.pt"))
    assert train_steps(tmp_path / "cut" / "log.jsonl") == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------
# (c) a stop during a long evaluation (a det source, one image per eval batch)

@pytest.mark.slow
def test_sigterm_during_evaluation_stops_it_and_resumes_exactly(tmp_path, world):
    full = write_config(tmp_path, world, "full", steps=4, eval_every=2, det=True)
    cut = write_config(tmp_path, world, "cut", steps=4, eval_every=2, det=True)
    run("expand", "--config", str(full))
    proc = Proc(cli("expand", "--config", str(cut)))
    proc.wait_for(re.compile(r"\[expand\] step 2: evaluating"))
    proc.signal_group()
    assert_clean_stop(proc, proc.finish())
    assert "step 2 eval:" not in proc.output  # the evaluation was cut short, not finished
    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert ckpt["step"] == 2 and ckpt["eval_pending"] is True
    resumed = run("expand", "--config", str(cut))
    assert "step 2 eval:" in resumed.stdout  # the evaluation that was cut runs again first
    assert_same_state(model_state(tmp_path / "full" / "checkpoint.pt"), model_state(tmp_path / "cut" / "checkpoint.pt"))
    evals = [json.loads(l)["step"] for l in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()
             if json.loads(l)["event"] == "eval"]
    assert evals == [2, 4]


# ----------------------------------------------------------------------------
# (d) a det source, eval_every > 0, stopped exactly at an eval step: evaluation must not move the
# training RNG (the RPN/RoI samplers draw from it), so skipping that evaluation changes nothing

@pytest.mark.slow
def test_stop_at_an_eval_step_with_det_source_resumes_exactly(tmp_path, demo_world, monkeypatch):
    from xlearner.configfile import load_config
    world = demo_world  # the small one: this test needs evaluations, not long ones
    expand.run(load_config(write_config(tmp_path, world, "full", steps=4, eval_every=2, det=True)))

    next_batch = data.MultiSourceLoader.__next__
    calls = []

    def signal_in_step_2(self):
        calls.append(1)
        if len(calls) == 2:  # while step 2 loads its batch: the stop lands after step 2, an eval step
            os.kill(os.getpid(), signal.SIGTERM)
        return next_batch(self)

    cut = load_config(write_config(tmp_path, world, "cut", steps=4, eval_every=2, det=True))
    monkeypatch.setattr(data.MultiSourceLoader, "__next__", signal_in_step_2)
    with pytest.raises(SystemExit) as stopped:
        expand.run(cut)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == 2
    monkeypatch.setattr(data.MultiSourceLoader, "__next__", next_batch)
    torch.manual_seed(1234)  # a fresh process would not share this one's RNG state
    expand.run(cut)
    assert_same_state(model_state(tmp_path / "full" / "checkpoint.pt"), model_state(tmp_path / "cut" / "checkpoint.pt"))


# ----------------------------------------------------------------------------
# (e) a step that never finishes: a second signal, or the grace period, ends the run

HUNG = """
import time
import torch
import torch.nn as nn
from xlearner import engine
from xlearner.config import Config, TrainConfig
from xlearner.run.rundir import RunLock

class Hangs:
    skipped = {}
    def __init__(self):
        self.pos = 0
    def __next__(self):
        self.pos += 1
        if self.pos == 3:
            print("hanging", flush=True)
            while True:
                time.sleep(1)
        time.sleep(STEP_S)
        return {"x": torch.randn(4, 3)}
    def state_dict(self):
        return {"pos": self.pos}

class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)
    def forward(self, batch):
        return {"a": self.lin(batch["x"]).pow(2).mean()}
    def total_loss(self, losses):
        return sum(losses.values())

tc = TrainConfig(out=OUT, steps=10, workers=0, log_every=1, ckpt_every=1, warmup_steps=1)
with RunLock(OUT, "expand"):  # as a stage holds it: the forced exit must remove it too
    engine.train(engine.Run(model=Toy(), loader=Hangs(), tc=tc, config=Config(expand=tc), device=torch.device("cpu")))
"""


def start_hung(tmp_path: Path, grace: str, step_s: float = 0.0) -> Proc:
    """The toy run, whose steps take `step_s` seconds each until the third, which never ends."""
    script = tmp_path / "hung.py"
    script.write_text(f"OUT = {str(tmp_path / 'run')!r}\nSTEP_S = {step_s!r}\n" + HUNG)
    proc = Proc([sys.executable, str(script)], extra_env={"XLEARNER_STOP_GRACE_S": grace})
    proc.wait_for(re.compile(r"hanging"), timeout=120)
    return proc


@pytest.mark.slow
def test_second_sigterm_ends_a_hung_step_at_once(tmp_path):
    proc = start_hung(tmp_path, grace="600")
    proc.signal_group()
    time.sleep(3)  # a second signal within 2 s of the first is the same stop (torchrun forwarding a group signal)
    assert proc.p.poll() is None, proc.output  # the first signal waits for the step
    proc.signal_group()
    code = proc.finish(timeout=30)  # far less than the 600 s grace period
    assert code == 128 + signal.SIGTERM and "Traceback" not in proc.output, proc.output
    assert "second signal 15: stopping at once: no checkpoint written for the unfinished step " \
           "(last checkpoint: step 2)" in proc.output, proc.output
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    assert not (tmp_path / "run" / ".lock").exists()  # os._exit runs no `finally`: preempt.on_forced_exit did it


def test_a_hung_step_ends_after_the_grace_period(tmp_path):
    proc = start_hung(tmp_path, grace="1")
    proc.signal_group()
    code = proc.finish(timeout=30)
    assert code == 128 + signal.SIGTERM and "Traceback" not in proc.output, proc.output
    assert "the step did not finish within 1 s of signal 15: no checkpoint written for the unfinished step " \
           "(last checkpoint: step 2)" in proc.output, proc.output
    assert not (tmp_path / "run" / ".lock").exists()


@pytest.mark.slow
def test_the_grace_of_a_hung_step_is_three_slowest_steps_when_that_is_longer(tmp_path):
    # steps of 0.5 s, then one that never ends: the grace is max(1 s, 3 x 0.5 s and a little compute)
    proc = start_hung(tmp_path, grace="1", step_s=0.5)
    proc.signal_group()
    code = proc.finish(timeout=60)
    assert code == 128 + signal.SIGTERM and "Traceback" not in proc.output, proc.output
    m = re.search(r"the step did not finish within ([\d.]+) s of signal 15: no checkpoint written for the "
                  r"unfinished step \(last checkpoint: step 2\)", proc.output)
    assert m and 1.5 <= float(m.group(1)) < 10, proc.output


def test_a_step_reported_just_after_the_signal_still_lengthens_the_grace(monkeypatch):
    from xlearner.run import preempt
    monkeypatch.setenv(preempt.GRACE_ENV, "0.2")
    stop = preempt.GracefulStop("expand", last_ckpt=None)
    ended = []
    monkeypatch.setattr(stop, "_exit_now", lambda signum, why: ended.append(why))
    try:
        stop._handle(signal.SIGTERM, None)  # the signal lands between the end of a 0.5 s step and its report
        stop.step_took(0.5)  # the grace is now max(0.2, 3 x 0.5) = 1.5 s from the signal
        time.sleep(0.8)
        assert ended == []
        time.sleep(1.2)
        assert ended == ["the step did not finish within 1.5 s of signal 15"]
    finally:
        stop.step_finished()
        preempt.request_stop(0)


# ----------------------------------------------------------------------------
# (f) a slow step is not a hung one: the grace grows with the slowest step seen, so a stop during
# a slow step still finishes it and checkpoints

SLOW_STEPS = """
import sys
import time
from xlearner import data
from xlearner.cli import main

next_batch = data.MultiSourceLoader.__next__
calls = []

def slow(self):  # every step after the first waits 2.5 s for its batch (a slow transform, a slow disk)
    calls.append(1)
    if len(calls) > 1:
        print(f"slow batch {len(calls)}", flush=True)
        time.sleep(2.5)
    return next_batch(self)

data.MultiSourceLoader.__next__ = slow
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_sigterm_during_a_slow_step_waits_for_it_and_checkpoints(tmp_path, demo_world):
    script = tmp_path / "slow.py"
    script.write_text(SLOW_STEPS)
    toml = write_config(tmp_path, demo_world, "slow", steps=6)
    # a 1 s grace alone would end step 3 (2.5 s of waiting) without a checkpoint
    proc = Proc([sys.executable, str(script), "expand", "--config", str(toml), "--set", "expand.workers=0"],
                extra_env={"XLEARNER_STOP_GRACE_S": "1"})
    proc.wait_for(re.compile(r"slow batch 3"))  # step 2 took 2.5 s: the grace is now >= 7.5 s
    proc.signal_group()  # during step 3's wait for its batch
    assert_clean_stop(proc, proc.finish())
    assert "did not finish" not in proc.output, proc.output
    assert load_checkpoint(tmp_path / "slow" / "checkpoint.pt")["step"] == 3
    assert not (tmp_path / "slow" / ".lock").exists()


# ----------------------------------------------------------------------------
# the ablation driver: a signal to it alone (a pkill, a scheduler that signals the main PID) must reach the
# worker processes it spawned (ablate.jobs), which checkpoint and stop, instead of leaving them running

@pytest.mark.slow
def test_sigterm_to_the_ablate_driver_alone_stops_its_workers(tmp_path, world):
    from runner import as_sets, demo_toml, tiny_sizes
    toml = demo_toml(world, tmp_path / "runs", tmp_path / "ablate.toml")
    sets = ["expand.steps=200", "squeeze.steps=200", "expand.log_every=1", "expand.workers=1", "transfer.workers=0",
            f'ablate.out="{tmp_path / "abl"}"', *tiny_sizes(cls_batch=2)]
    proc = Proc(cli("ablate", "--config", str(toml), "--jobs", "2", "--seeds", "2", "--out", str(tmp_path / "report"),
                    *as_sets(sets)))
    proc.wait_for(STEP_LINE)
    proc.p.send_signal(signal.SIGTERM)  # the driver only, not its process group
    code = proc.finish()
    assert code == 128 + signal.SIGTERM, proc.output
    assert "[ablate] stopped by a signal; run the same command again to resume" in proc.output
    assert proc.output.count("checkpoint written at step") == 2, proc.output  # both workers checkpointed
    assert "Traceback" not in proc.output, proc.output
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # every process of the session is gone: no orphaned worker
        try:
            os.killpg(proc.p.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.killpg(proc.p.pid, signal.SIGKILL)
        raise AssertionError("processes of the ablate session still running 30 s after the driver exited")
    assert not (tmp_path / "report" / "ablation.json").exists()
