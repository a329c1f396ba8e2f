"""The training engine on a toy model and loader: schedule, errors, checkpoints, resume."""
import copy
import json
import math
import os
import signal
import sys

import pytest
import torch
import torch.nn as nn

from xlearner import engine
from xlearner.run.checkpoint import CheckpointError, load_checkpoint, save_run_checkpoint
from xlearner.config import Config, TrainConfig


class ToyLoader:
    """Deterministic infinite loader with the MultiSourceLoader's state API."""

    def __init__(self):
        self.pos = 0
        self.skipped = {"a": 0}

    def __next__(self):
        g = torch.Generator().manual_seed(self.pos)
        self.pos += 1
        return {"a": {"x": torch.randn(4, 3, generator=g), "skipped": 0}}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, d):
        self.pos = d["pos"]


class ToyModel(nn.Module):
    def __init__(self, nan_at: int | None = None, unused: bool = False):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.bn = nn.BatchNorm1d(3)
        if unused:
            self.spare = nn.Linear(3, 1)
        self.nan_at, self.calls = nan_at, 0

    def forward(self, batch):
        self.calls += 1
        loss = self.lin(self.bn(batch["a"]["x"])).pow(2).mean()
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return {"a": loss}

    def total_loss(self, losses):
        return sum(losses.values())


def make_run(tmp_path, model=None, **tc):
    tcfg = TrainConfig(**{"out": str(tmp_path / "run"), "workers": 0, "log_every": 1, "ckpt_every": 100,
                          "warmup_steps": 2, **tc})
    cfg = Config(expand=tcfg)
    torch.manual_seed(0)
    return engine.Run(model=model or ToyModel(), loader=ToyLoader(), tc=tcfg, config=cfg,
                      device=torch.device("cpu"), images_per_step=4)


def test_lr_schedule_warmup_then_cosine():
    tc = TrainConfig(steps=10, warmup_steps=2)
    factors = [engine.warmup_cosine(s, tc.warmup_steps, tc.steps) for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == pytest.approx(1.0)
    assert factors[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))


def test_no_weight_decay_on_norms_and_biases():
    model = ToyModel()
    opt = engine.build_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert decayed == {id(model.lin.weight)}
    assert opt.param_groups[1]["weight_decay"] == 0.0 and len(opt.param_groups[1]["params"]) == 3


def test_non_finite_loss_names_source_and_step(tmp_path):
    run = make_run(tmp_path, model=ToyModel(nan_at=3), steps=5)
    with pytest.raises(engine.NonFiniteLossError, match=r"'a' at step 3"):
        engine.train(run)
    # read back only when the loop logs (step 5 here) or checkpoints (step 4): still the step it appeared at,
    # and the checkpoint of step 4, whose weights it spoiled, is never written
    run = make_run(tmp_path / "late", model=ToyModel(nan_at=3), steps=8, log_every=5, ckpt_every=4)
    with pytest.raises(engine.NonFiniteLossError, match=r"'a' at step 3"):
        engine.train(run)
    assert not (tmp_path / "late" / "run" / "checkpoint.pt").exists()


LOOP_FILES = tuple(os.path.join("xlearner", *p) for p in (("engine.py",), ("run", "dist.py"), ("run", "preempt.py")))


def test_a_run_that_never_logs_still_drains_its_losses(tmp_path, monkeypatch):
    """log_every = ckpt_every = eval_every = 0: the losses wait on the device at most MAX_PENDING steps."""
    monkeypatch.setattr(engine, "MAX_PENDING", 2)
    model = ToyModel(nan_at=2)
    with pytest.raises(engine.NonFiniteLossError, match=r"'a' at step 2"):
        engine.train(make_run(tmp_path, model=model, steps=8, log_every=0, ckpt_every=0))
    assert model.calls == 2  # stopped at the second step, not at the end of the run


def test_the_loop_reads_back_from_the_device_only_when_it_logs(tmp_path, monkeypatch):
    """No host sync per step: the loop and the process-group code read tensors back (tolist, item, float, bool)
    only at the logging steps (3 and 6 here); the stop flag is agreed on without a device tensor."""
    reads = []
    for method in ("tolist", "item", "__float__", "__bool__", "__int__"):
        def counted(self, *args, _orig=getattr(torch.Tensor, method), _name=method, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.endswith(LOOP_FILES):
                reads.append(_name)
            return _orig(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, method, counted)
    engine.train(make_run(tmp_path, steps=6, log_every=3))
    assert reads == ["tolist", "tolist"]


def test_unused_parameters_are_named(tmp_path):
    run = make_run(tmp_path, model=ToyModel(unused=True), steps=2)
    with pytest.raises(engine.UnusedParametersError, match=r"spare\.weight"):
        engine.train(run)


def test_log_checkpoint_and_exact_resume(tmp_path):
    full = make_run(tmp_path / "full", steps=6)
    engine.train(full)
    # The same run in two legs: SIGTERM during step 3 (the engine checkpoints after it and exits),
    # then the same command again resumes to step 6 with a new model object.
    class Preempted(ToyLoader):
        def __next__(self):
            if self.pos == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return ToyLoader.__next__(self)

    leg1 = make_run(tmp_path / "legs", steps=6)
    leg1.loader = Preempted()
    with pytest.raises(SystemExit) as exit_info:
        engine.train(leg1)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert load_checkpoint(tmp_path / "legs" / "run" / "checkpoint.pt")["step"] == 3
    torch.manual_seed(123)  # a fresh process would start from an unrelated RNG state
    leg2 = make_run(tmp_path / "legs", steps=6)
    leg2.model.lin.weight.data.fill_(7.0)  # must be overwritten by the checkpoint
    engine.train(leg2)
    for a, b in zip(full.model.state_dict().values(), leg2.model.state_dict().values()):
        assert torch.equal(a, b)
    steps = [json.loads(l)["step"] for l in (tmp_path / "legs" / "run" / "log.jsonl").read_text().splitlines()
             if json.loads(l)["event"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    ckpt = load_checkpoint(tmp_path / "legs" / "run" / "checkpoint.pt")
    assert ckpt["step"] == 6 and set(ckpt) >= {"model", "optimizer", "scheduler", "scaler", "config", "loader", "rng"}
    assert (tmp_path / "legs" / "run" / "checkpoint_prev.pt").exists()
    assert json.loads((tmp_path / "legs" / "run" / "config.json").read_text())["expand"]["steps"] == 6


def test_grad_accum_matches_double_batch(tmp_path):
    class Concat(ToyLoader):  # one batch of 8 = two consecutive batches of 4
        def __next__(self):
            a, b = ToyLoader.__next__(self), ToyLoader.__next__(self)
            return {"a": {"x": torch.cat([a["a"]["x"], b["a"]["x"]]), "skipped": 0}}

    class NoBN(ToyModel):  # BN statistics differ between 2 x 4 and 1 x 8 by design
        def __init__(self):
            super().__init__()
            del self.bn

        def forward(self, batch):
            return {"a": self.lin(batch["a"]["x"]).pow(2).mean()}

    r1 = make_run(tmp_path / "accum", model=NoBN(), steps=3, grad_accum=2)
    r2 = make_run(tmp_path / "big", model=NoBN(), steps=3)
    r2.loader = Concat()
    engine.train(r1)
    engine.train(r2)
    torch.testing.assert_close(r1.model.lin.weight, r2.model.lin.weight, rtol=1e-6, atol=1e-7)


def test_corrupt_and_truncated_checkpoints_are_named(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: corrupt or truncated"):
        load_checkpoint(bad)
    save_run_checkpoint({"model": {"w": torch.randn(1000)}, "config": {}}, tmp_path / "ok")
    data = (tmp_path / "ok" / "checkpoint.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: corrupt or truncated"):
        load_checkpoint(cut)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt: checkpoint is empty"):
        load_checkpoint(tmp_path / "empty.pt")


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": ToyModel()}, path)  # a whole module needs pickled code
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to load"):
        load_checkpoint(path)


def test_weight_decay_by_parameter_role_with_cross_stitch(demo_config):
    """Cross-stitch mixing matrices [T, C] are mixing coefficients, not weights: no decay, like every norm
    parameter and every bias; conv and linear weights decay."""
    from xlearner.expand import XLearnerModel
    from xlearner.model import CrossStitchUnit

    demo_config.model.reconcile = "cross_stitch"
    model = XLearnerModel(demo_config.model, demo_config.sources, {s.name: 5 for s in demo_config.sources})
    opt = engine.build_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    exempt = {id(p) for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    mixing, norms, biases, weights = set(), set(), set(), set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, CrossStitchUnit):
                mixing.add(id(p))
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                norms.add(id(p))
            elif name == "bias":
                biases.add(id(p))
            elif isinstance(module, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)) and name == "weight":
                weights.add(id(p))
    assert len(mixing) == 3 * len(demo_config.model.reconcile_stages)  # one [T, C] matrix per task and stage
    assert mixing and norms and biases and weights
    assert mixing | norms | biases == exempt
    assert weights == decayed


def test_scalar_reconcile_alpha_gets_no_weight_decay():
    from xlearner.model import ScalarReconcile

    rl = ScalarReconcile(["a", "b"], {"layer1": 8}, [1])
    opt = engine.build_optimizer(rl, TrainConfig(weight_decay=0.1))
    alphas = {id(m.alpha) for m in rl.modules() if hasattr(m, "alpha")}
    assert len(alphas) == 2 and {id(p) for p in opt.param_groups[1]["params"]} == alphas
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(m.conv.weight) for m in rl.modules() if hasattr(m, "alpha")}


@pytest.mark.slow
def test_progress_in_a_log_file_is_plain_lines(demo_world, tmp_path):
    """stderr to a file (a SLURM job, `2>log`): no tqdm bar redrawn with '\\r', only the log_every lines."""
    import subprocess

    from runner import as_sets, cli, demo_toml, env, tiny_sizes

    toml = demo_toml(demo_world, tmp_path / "runs", tmp_path / "demo.toml")
    tiny = ["expand.steps=2", "expand.log_every=1", "expand.eval_every=0", "expand.workers=0", *tiny_sizes(cls_batch=2)]
    with open(tmp_path / "err.log", "wb") as err, open(tmp_path / "out.log", "wb") as out:
        p = subprocess.run(cli("expand", "--config", str(toml), "--out", str(tmp_path / "exp"), *as_sets(tiny)),
                           env=env(), stdout=out, stderr=err, stdin=subprocess.DEVNULL, timeout=600)
    logs = (tmp_path / "err.log").read_bytes() + (tmp_path / "out.log").read_bytes()
    assert p.returncode == 0, logs.decode()[-3000:]
    assert b"\r" not in logs
    assert b"[expand] step 1/2 loss" in logs and b"[expand] step 2/2 loss" in logs


def test_sync_bn_syncs_only_where_it_learns(tmp_path):
    """sync_bn converts every BN; those in a forward under no_grad (the other branches, the teacher) normalise with
    their own batch like a plain BatchNorm, those in a forward that builds a graph take SyncBatchNorm's collective
    path (on a CPU tensor in a process group, that path refuses: the proof that it was taken)."""
    import torch.distributed as tdist
    from xlearner.run import dist
    tdist.init_process_group("gloo", store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).train()
        synced = dist.convert_sync_batchnorm(copy.deepcopy(plain))
        assert type(synced[1]) is dist.GradSyncBatchNorm
        x = torch.randn(2, 3, 5, 5)
        with torch.no_grad():
            torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
        torch.testing.assert_close(synced[1].running_mean, plain[1].running_mean, rtol=0, atol=0)
        assert int(synced[1].num_batches_tracked) == 1
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            synced(x)
        # sync_bn_no_grad = true: every BN syncs, also under no_grad (the old behaviour)
        every = dist.convert_sync_batchnorm(copy.deepcopy(plain), no_grad_too=True)
        assert type(every[1]) is torch.nn.SyncBatchNorm
        with torch.no_grad(), pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            every(x)
    finally:
        tdist.destroy_process_group()


def _slow_main_worker(rank: int, store_path: str, mode: str, results) -> None:
    """One of two gloo ranks whose process group times out after 2 s; rank 0's work takes 4 s."""
    import datetime
    import time as t
    import torch.distributed as tdist
    from xlearner.run import dist
    tdist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2,
                             timeout=datetime.timedelta(seconds=2))

    def work():
        t.sleep(4)
        return {"AP": 12.5}
    try:
        if mode == "from_main":
            results[rank] = dist.from_main(work)
        else:  # the collective it replaced: rank 0 works, then broadcasts
            results[rank] = dist.broadcast_object(work() if rank == 0 else None)
    except RuntimeError as e:
        results[rank] = f"error: {type(e).__name__}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["from_main", "broadcast"])
def test_rank0_work_longer_than_the_timeout_does_not_abort(tmp_path, mode):
    """COCOeval runs on rank 0 alone: the others wait for it in the store (dist.from_main), so work that outlasts the
    process group's timeout does not abort the job; a collective wait (the broadcast it replaced) did."""
    import torch.multiprocessing as tmp
    with tmp.Manager() as manager:
        results = manager.dict()
        tmp.spawn(_slow_main_worker, args=(str(tmp_path / "store"), mode, results), nprocs=2, join=True)
        results = dict(results)
    if mode == "from_main":
        assert results == {0: {"AP": 12.5}, 1: {"AP": 12.5}}
    else:
        assert results[1] == "error: RuntimeError"  # rank 1 timed out in the collective after 2 s
