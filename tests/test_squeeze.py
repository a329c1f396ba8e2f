"""The squeeze distiller: frozen teacher, distillation signal, export, DDP run and exact resume."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision

from runner import (assert_same_state, demo_toml, model_state, run, run_and_signal, tiny_sizes, train_steps,
                    write_config)
from xlearner import data, expand, squeeze
from xlearner.run.checkpoint import CheckpointError
from xlearner.configfile import load_config
from xlearner.squeeze import SqueezedModel

SMALL = ["expand.steps=3", "squeeze.steps=3", "expand.log_every=1", "squeeze.log_every=1", "expand.workers=0",
         "squeeze.workers=0", "expand.warmup_steps=1", "squeeze.warmup_steps=1",
         *tiny_sizes(cls_batch=8)]  # small images keep CI fast; the code path is the same at any size


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_world):
    """The 10% demo world, its config at tiny sizes, and a 3-step expand teacher."""
    root = tmp_path_factory.mktemp("sq")
    toml = demo_toml(make_world(0.1), root / "runs", root / "demo.toml")
    cfg = load_config(toml, SMALL)
    teacher = expand.run(cfg)
    return {"root": root, "toml": toml, "cfg": cfg, "teacher": teacher}


def sets(extra=()):
    out = []
    for s in [*SMALL, *extra]:
        out += ["--set", s]
    return out


@pytest.mark.slow
def test_squeeze_freezes_teacher_exports_backbone_and_compares(setup, tmp_path, monkeypatch):
    captured = {}
    original = squeeze.load_teacher

    def spy(path, cfg):
        teacher, ckpt = original(path, cfg)
        captured["before"] = copy.deepcopy(teacher.state_dict())
        captured["teacher"] = teacher
        return teacher, ckpt
    monkeypatch.setattr(squeeze, "load_teacher", spy)
    cfg = copy.deepcopy(setup["cfg"])
    cfg.squeeze.out = str(tmp_path / "sq")
    backbone_path = squeeze.run(cfg, setup["teacher"])

    after = captured["teacher"].state_dict()
    assert after.keys() == captured["before"].keys()
    assert any("running_mean" in k for k in after)  # BN buffers are part of the check
    for k, v in captured["before"].items():
        assert torch.equal(v, after[k]), f"teacher {k} changed during squeeze"

    sd = torch.load(backbone_path, weights_only=True)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []

    metrics = json.loads((tmp_path / "sq" / "metrics.json").read_text())
    names = {s.name for s in cfg.sources}
    assert set(metrics["student"]) == names and set(metrics["teacher"]) == names
    log = [json.loads(l) for l in (tmp_path / "sq" / "log.jsonl").read_text().splitlines()]
    losses = [r for r in log if r["event"] == "train"][-1]["losses"]
    assert {"shapes-cls/task", "shapes-cls/feat", "shapes-cls/kd", "shapes-det/task", "shapes-det/feat"} <= set(losses)
    # distill_targets = "all" (configs/demo.toml): a det image is distilled through every cls and seg head too
    assert losses["shapes-det/kd"] > 0 and cfg.squeeze.distill_targets == "all"

    # the squeeze continues the teacher's data stream: after its 3 steps every source's loader stands 3 batches
    # past where the teacher's stopped (it used to restart at batch 0 and replay the teacher's batches)
    t_state = torch.load(setup["teacher"], weights_only=False)["loader"]
    s_state = torch.load(tmp_path / "sq" / "checkpoint.pt", weights_only=False)["loader"]
    assert {n: (st["epoch"], st["batch"]) for n, st in s_state.items()} == {
        n: (st["epoch"], st["batch"] + cfg.squeeze.steps) for n, st in t_state.items()}
    assert all(st["batch"] == cfg.expand.steps for st in t_state.values())  # no epoch boundary in between


@pytest.mark.slow
def test_expand_from_init_continues_its_data_stream(setup, tmp_path):
    """The ablation's "Expand + RL at the same budget" (expand.run(init=...)) must not replay init's batches."""
    cfg = copy.deepcopy(setup["cfg"])
    cfg.expand.out = str(tmp_path / "more")
    expand.run(cfg, init=setup["teacher"])
    t_state = torch.load(setup["teacher"], weights_only=False)["loader"]
    state = torch.load(tmp_path / "more" / "checkpoint.pt", weights_only=False)["loader"]
    assert {n: (st["epoch"], st["batch"]) for n, st in state.items()} == {
        n: (st["epoch"], st["batch"] + cfg.expand.steps) for n, st in t_state.items()}


@pytest.mark.slow
def test_distillation_signal_alone_pulls_student_to_teacher(setup):
    cfg = copy.deepcopy(setup["cfg"])
    cfg.squeeze.lambda_task, cfg.squeeze.lambda_kd, cfg.squeeze.lambda_feat = 0.0, 0.0, 1.0
    teacher, _ = squeeze.load_teacher(setup["teacher"], cfg)
    torch.manual_seed(0)
    student = SqueezedModel.from_expanded(teacher, "scratch", cfg.squeeze)
    distiller = squeeze.Distiller(student, teacher, cfg.sources, cfg.squeeze).train()
    datasets = {s.name: data.build_dataset(s, "train", train=False) for s in cfg.sources}
    loader = data.MultiSourceLoader(cfg.sources, datasets, seed=0, workers=0)
    probe = next(loader)
    opt = torch.optim.Adam([p for p in distiller.parameters() if p.requires_grad], lr=1e-3)

    @torch.no_grad()
    def feat_loss(batch):
        """Distance of the adapted student features to the teacher's, in eval mode (BN running stats)."""
        total = 0.0
        for s in cfg.sources:
            x, _ = student.heads[s.task].prepare(batch[s.name], s.name)
            feats = student.features(x)
            adapted = {k: a(feats[k]) for k, a in student.adapters[s.task].items()}
            target = teacher.features(x, s.task)
            total += sum(squeeze.feature_loss_l2(adapted[k], target[k]).item() for k in adapted)
        return total

    distiller.eval()
    start = feat_loss(probe)
    distiller.train()
    curve = []
    for _ in range(20):
        losses = distiller(next(loader))
        total = distiller.total_loss(losses)
        opt.zero_grad()
        total.backward()
        opt.step()
        curve.append(total.item())
    distiller.eval()
    end = feat_loss(probe)
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5
    assert end < 0.8 * start, (start, end)


@pytest.mark.slow
def test_teacher_mismatch_is_named(setup, tmp_path):
    cfg = load_config(setup["toml"], SMALL + ["sources.shapes-seg.num_classes=5"])
    with pytest.raises(CheckpointError, match=r"source 'shapes-seg' has 9 classes in the teacher but num_classes = 5"):
        squeeze.load_teacher(setup["teacher"], cfg)
    cfg = load_config(setup["toml"], SMALL)
    cfg.sources[0].name = "imagenet"
    with pytest.raises(CheckpointError, match=r"not trained on source 'imagenet'"):
        squeeze.load_teacher(setup["teacher"], cfg)


# The squeeze recipe of configs/demo.toml on cls and seg sources only: detection samples its proposals at
# random, so a det source would make B x 2 processes and 2B x 1 draw different proposals.
SQUEEZE_CLS_SEG = """
[squeeze]
steps = 3
lr = 0.003
optimizer = "adamw"
warmup_steps = 1
log_every = 1
workers = 0
student_init = "task:cls"
distill_targets = "all"
teacher_norm = "standardize"
distill_stages = [1, 2, 3, 4]
distill_loss = "cos_smoothl1"
heads = "frozen"
"""


def train_losses(log) -> list[dict]:
    return [r["losses"] for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "train"]


@pytest.mark.slow
def test_two_process_squeeze_of_b_equals_one_process_of_2b(tmp_path, make_world):
    """torchrun x 2 (gloo) at batch B and one process at 2B: the same student, step for step. Frozen BN, since
    BN statistics of B and 2B differ by design; the teacher's norms are all-reduced over the ranks."""
    world, frozen = make_world(0.1), ["--set", "model.frozen_bn=true"]
    single = write_config(tmp_path, world, "teacher", steps=3, seg=True, bs=8, extra=SQUEEZE_CLS_SEG)
    ddp = write_config(tmp_path, world, "ddp", steps=3, seg=True, bs=4, extra=SQUEEZE_CLS_SEG)
    run("expand", "--config", str(single), *frozen)
    teacher = str(tmp_path / "teacher" / "checkpoint.pt")
    run("squeeze", "--config", str(ddp), "--teacher", teacher, "--out", str(tmp_path / "sq-ddp"), *frozen, nproc=2)
    run("squeeze", "--config", str(single), "--teacher", teacher, "--out", str(tmp_path / "sq-one"), *frozen)
    # every logged loss (the mean over both ranks' images) agrees to float rounding: measured within 1e-7
    ddp_losses, one_losses = train_losses(tmp_path / "sq-ddp" / "log.jsonl"), train_losses(tmp_path / "sq-one" / "log.jsonl")
    assert len(ddp_losses) == len(one_losses) == 3 and ddp_losses[0].keys() == one_losses[0].keys()
    for a, b in zip(ddp_losses, one_losses):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    # the weights: AdamW divides by sqrt(v), so where a gradient is ~0 the all-reduce's summation order moves an
    # update by up to lr; measured at most 3.3e-5 after 3 steps, while the student moved up to 7.5e-3 from its init
    # (the teacher's cls branch): a batch seen twice or missed would differ by about that much
    one, ddp = model_state(tmp_path / "sq-one" / "checkpoint.pt"), model_state(tmp_path / "sq-ddp" / "checkpoint.pt")
    assert_same_state(ddp, one, rtol=0, atol=1e-4)
    init = model_state(tmp_path / "teacher" / "checkpoint.pt")
    assert max((one[k] - init[k.replace("backbone.", "backbone.branches.cls.", 1)]).abs().max().item()
               for k in one if k.startswith("backbone.layer")) > 2e-3


@pytest.mark.slow
def test_squeeze_sigterm_then_rerun_resumes_exactly(setup, tmp_path):
    toml, teacher = str(setup["toml"]), str(setup["teacher"])
    s = sets(["squeeze.steps=5", "squeeze.ckpt_every=100", "squeeze.workers=2"])
    run("squeeze", "--config", toml, "--teacher", teacher, "--out", str(tmp_path / "full"), *s)
    code = run_and_signal("squeeze", "--config", toml, "--teacher", teacher, "--out", str(tmp_path / "cut"), *s,
                          log=tmp_path / "cut" / "log.jsonl", after_step=2)
    assert code == 128 + 15
    run("squeeze", "--config", toml, "--teacher", teacher, "--out", str(tmp_path / "cut"), *s)
    assert_same_state(model_state(tmp_path / "full" / "checkpoint.pt"), model_state(tmp_path / "cut" / "checkpoint.pt"))
    assert train_steps(tmp_path / "cut" / "log.jsonl") == [1, 2, 3, 4, 5]


def test_bench_floor_does_the_squeeze_work(demo_world, tmp_path):
    """bench squeeze's floor runs as many teacher-branch forwards and KD head forwards as the squeeze does, on the
    same images (counted with forward hooks over one step of each)."""
    from runner import demo_toml, tiny_sizes
    from xlearner.configfile import load_config
    from xlearner.tools.bench import squeeze_bench_parts
    cfg = load_config(demo_toml(demo_world, tmp_path / "runs", tmp_path / "c.toml"), tiny_sizes() + [
        "squeeze.workers=0", "model.channels_last=true"])
    parts = squeeze_bench_parts(cfg, torch.device("cpu"), n_batches=1)
    teacher = parts["distiller"].teacher
    counts: dict[str, int] = {}

    def count(name, module):
        module.register_forward_hook(lambda *a: counts.__setitem__(name, counts.get(name, 0) + 1))

    student_heads = parts["distiller"].student.heads
    for t in teacher.tasks:  # a branch's forward reaches its layer4 once
        count(f"stage teacher {t}", teacher.backbone.branches[t].layer4)
        count(f"floor teacher {t}", parts["teacher_bbs"][t].layer4)
    for side, heads, t_heads in (("stage", student_heads, teacher.heads), ("floor", parts["heads"], parts["t_heads"])):
        for who, h in (("student", heads), ("teacher", t_heads)):
            count(f"{side} {who} seg decoder", h["seg"].decoder)
            for name, p in h["cls"].predictors.items():
                count(f"{side} {who} cls {name}", p)
    batch = parts["batches"][0]
    parts["fns"]["stage"](batch)
    stage = dict(counts)
    counts.clear()
    parts["fns"]["floor"](batch)
    floor = dict(counts)
    assert {k.replace("stage ", ""): v for k, v in stage.items()} == {k.replace("floor ", ""): v for k, v in floor.items()}
    # every teacher branch on each of the 5 sources' images; the seg decoders: the KD of every source, plus the
    # student's own task loss on the seg source; each cls predictor: KD on the 5 images (+ the own loss for the student)
    assert stage["stage teacher det"] == 5 and stage["stage teacher seg decoder"] == 5
    assert stage["stage student seg decoder"] == 6 and stage["stage student cls shapes-cls"] == 5
    assert stage["stage teacher cls shapes-cls"] == 5
