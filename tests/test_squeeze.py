"""The squeeze distiller: frozen teacher, distillation signal, export, DDP run and exact resume."""
from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import torchvision

from xlearner import data, expand, squeeze
from xlearner.backbone import backbone_state_dict
from xlearner.config import ConfigError, ModelConfig, SourceConfig, SqueezeConfig
from xlearner.configfile import load_config
from xlearner.expand import XLearnerModel
from xlearner.probe import dataset_labels, open_split
from xlearner.run.checkpoint import CheckpointError
from xlearner.squeeze import (Distiller, SqueezedModel, estimate_teacher_norm, feature_loss_cos_smoothl1, kd_loss, pixels, teacher_features)

from runner import (assert_same_state, demo_toml, model_state, run, run_and_signal, tiny_sizes, train_steps, write_config)
from test_model import NUM_CLASSES, TASKS, make_batches, make_model


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
def test_expand_init_takes_only_an_expand_checkpoint_of_this_model(setup, tmp_path):
    """`expand --init`: the weights of an expand run of the same model, or one line that says why not."""
    teacher = torch.load(setup["teacher"], weights_only=False)
    num_classes = teacher["meta"]["num_classes"]
    model = XLearnerModel(setup["cfg"].model, setup["cfg"].sources, num_classes)
    assert expand.load_init(setup["teacher"], model)["meta"]["kind"] == "expanded"
    assert_same_state(model.state_dict(), teacher["model"])
    squeezed, foreign = tmp_path / "squeezed.pt", tmp_path / "foreign.pt"
    torch.save({"meta": {"kind": "squeezed"}, "model": {}}, squeezed)
    torch.save({"meta": {"kind": "expanded"}, "model": {"extra.weight": torch.zeros(1)}}, foreign)
    with pytest.raises(CheckpointError, match=r"squeezed.pt: not an expand checkpoint \(meta.kind = 'squeezed'\); "
                                              r"--init takes RUN/checkpoint.pt of an `expand` run"):
        expand.load_init(squeezed, model)
    with pytest.raises(CheckpointError, match=r"foreign.pt: not a checkpoint of this model \(\d+ missing keys, e.g. "
                                              r"\['.*'\]; 1 unexpected, e.g. \['extra.weight'\]\); --init needs"):
        expand.load_init(foreign, model)
    other = XLearnerModel(setup["cfg"].model, setup["cfg"].sources, {**num_classes, "shapes-seg": 5})
    with pytest.raises(CheckpointError, match=r"not a checkpoint of this model \(size mismatch for .*shapes-seg.*\); "
                                              r"--init needs the same \[model\] and \[\[sources\]\]"):
        expand.load_init(setup["teacher"], other)
    # the CLI says it in one line, before a step is taken
    bad = run("expand", "--config", str(setup["toml"]), "--init", str(squeezed), "--out", str(tmp_path / "x"),
              *sets(), check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines()[-1] == (f"Error: {squeezed}: not an expand checkpoint (meta.kind = 'squeezed'); "
                                           "--init takes RUN/checkpoint.pt of an `expand` run")
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


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


def test_squeezed_model_mean_init_and_api():
    torch.manual_seed(0)
    teacher = make_model("hrnet")
    with torch.no_grad():  # make the branches (weights and BN statistics) differ
        for t in TASKS:
            for name, b in teacher.backbone.branches[t].named_buffers():
                if b.is_floating_point():
                    b.uniform_(0.5, 1.5)
            teacher.backbone.branches[t].layer1[0].bn1.num_batches_tracked.fill_(TASKS.index(t) + 3)
    teacher.mcfg = dataclasses.replace(teacher.mcfg, pretrained="weights.pth")  # branches from the same start
    student = SqueezedModel.from_expanded(teacher, "mean", SqueezeConfig(distill_stages=[2, 3, 4]))
    sds = [teacher.backbone.branches[t].state_dict() for t in TASKS]
    for k, v in student.backbone.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sum(sd[k] for sd in sds) / 3)
    assert int(student.backbone.layer1[0].bn1.num_batches_tracked) == 5
    # heads are copies, not shared
    for (k, a), b in zip(teacher.heads.state_dict().items(), student.heads.state_dict().values()):
        assert torch.equal(a, b), k
    assert student.heads["cls"].predictors["cls_a"].weight is not teacher.heads["cls"].predictors["cls_a"].weight
    # adapters: identity at init
    x = torch.randn(2, 3, 64, 64)
    feats = student.features(x, "cls")
    adapted = {k: a(feats[k]) for k, a in student.adapters["det"].items()}
    assert set(adapted) == {"layer2", "layer3", "layer4"}
    torch.testing.assert_close(adapted["layer3"], feats["layer3"])
    losses = student(make_batches())
    assert set(losses) == set(NUM_CLASSES)
    student.total_loss(losses).backward()


def test_squeezed_model_task_init_scratch_and_path(tmp_path):
    torch.manual_seed(0)
    teacher = make_model("scalar")
    s = SqueezedModel.from_expanded(teacher, "task:seg")
    assert torch.equal(s.backbone.conv1.weight, teacher.backbone.branches["seg"].conv1.weight)
    s = SqueezedModel.from_expanded(teacher)  # default: the first task
    assert torch.equal(s.backbone.conv1.weight, teacher.backbone.branches["cls"].conv1.weight)
    s = SqueezedModel.from_expanded(teacher, "scratch")
    assert not torch.equal(s.backbone.conv1.weight, teacher.backbone.branches["cls"].conv1.weight)
    path = tmp_path / "bb.pth"
    torch.save(backbone_state_dict(teacher, "det"), path)
    s = SqueezedModel.from_expanded(teacher, str(path))
    assert torch.equal(s.backbone.conv1.weight, teacher.backbone.branches["det"].conv1.weight)
    with pytest.raises(ValueError, match="student_init"):
        SqueezedModel.from_expanded(teacher, "task:nope")
    with pytest.raises(ValueError, match="student_init"):
        SqueezedModel.from_expanded(teacher, "bogus")
    shared = make_model(shared_backbone=True)
    s = SqueezedModel.from_expanded(shared, "mean")
    torch.testing.assert_close(s.backbone.conv1.weight, shared.backbone.conv1.weight)
    # independently initialised branches (pretrained = ""): their average is refused, naming the way out
    with pytest.raises(ConfigError, match=r"student_init = 'mean': the teacher's branches started from independent"
                                          r" random weights .* use task:<name>"):
        SqueezedModel.from_expanded(teacher, "mean")

# ----------------------------------------------------------------------------
# The squeeze loss by hand: feature losses, KD, standardisation, "all" targets, the total, the dev split.

SMALL_MODEL = dict(arch="resnet10", fpn_channels=16, rpn_pre_nms_top_n=50, rpn_post_nms_top_n=20,
             rpn_batch_size_per_image=16, box_batch_size_per_image=8, box_head_dim=32, seg_channels=8)
# a "/" in a source name is legal (only "." is not): the loss must not parse names
DISTILL_SOURCES = [SourceConfig(name="cls/a", task="cls", image_size=32), SourceConfig(name="cls-b", task="cls", image_size=32,
                                                                                weight=0.5),
           SourceConfig(name="det/a", task="det", image_size=32, weight=2.0),
           SourceConfig(name="seg-a", task="seg", image_size=32)]
DISTILL_CLASSES = {"cls/a": 5, "cls-b": 3, "det/a": 2, "seg-a": 4}
ALL = dict(distill_targets="all", distill_stages=[1, 2, 3, 4], distill_loss="cos_smoothl1")


def teacher() -> XLearnerModel:
    torch.manual_seed(0)
    return XLearnerModel(ModelConfig(**SMALL_MODEL), DISTILL_SOURCES, DISTILL_CLASSES).eval()


def batches(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"cls/a": {"images": torch.randn(2, 3, 32, 32, generator=g), "labels": torch.tensor([1, 4])},
            "cls-b": {"images": torch.randn(2, 3, 32, 32, generator=g), "labels": torch.tensor([0, 2])},
            "det/a": {"images": [torch.rand(3, 32, 32, generator=g), torch.rand(3, 32, 28, generator=g)],
                      "targets": [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0]]), "labels": torch.tensor([1])},
                                  {"boxes": torch.tensor([[4.0, 4.0, 16.0, 30.0]]), "labels": torch.tensor([2])}]},
            "seg-a": {"images": torch.randn(2, 3, 32, 32, generator=g),
                      "masks": torch.randint(0, 4, (2, 32, 32), generator=g)}}


def test_cos_smoothl1_by_hand():
    # pixel 1: s = (1, 0), t = (0, 2): cos 0 -> 1; smooth L1 (beta 1) of |1| = 0.5, of |2| = 1.5
    # pixel 2: s = t = (3, 4): 0 and 0.  Means: cosine (1 + 0) / 2 = 0.5, smooth L1 (0.5 + 1.5 + 0 + 0) / 4 = 0.5
    s = torch.tensor([[1.0, 3.0], [0.0, 4.0]]).view(1, 2, 1, 2)
    t = torch.tensor([[0.0, 3.0], [2.0, 4.0]]).view(1, 2, 1, 2)
    assert feature_loss_cos_smoothl1(s, t).item() == pytest.approx(1.0)
    assert feature_loss_cos_smoothl1(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_loss_by_hand():
    # teacher (ln 3, 0) -> p = (3/4, 1/4); student (0, 0) -> q = (1/2, 1/2); KL(p || q) = sum p ln(p / q)
    s, t = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss(s, t, 1.0, False).item() == pytest.approx(kl)  # 0.130812
    # T = 2: p = softmax(ln 3 / 2, 0) = (sqrt 3, 1) / (sqrt 3 + 1), times T^2 = 4
    p = (math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1))
    assert kd_loss(s, t, 2.0, False).item() == pytest.approx(4 * sum(pi * math.log(2 * pi) for pi in p))
    # two rows: batchmean averages them; pixels() turns [B, K, H, W] into rows of K
    logits = torch.arange(12.0).view(1, 3, 2, 2)
    assert pixels(logits).tolist() == [[0.0, 4.0, 8.0], [1.0, 5.0, 9.0], [2.0, 6.0, 10.0], [3.0, 7.0, 11.0]]
    assert kd_loss(torch.cat([s, s]), torch.cat([t, s]), 1.0, False).item() == pytest.approx(kl / 2)


def test_all_targets_branch_t_is_zero_and_the_others_are_not():
    t = teacher()  # fresh: every RL ends in a zero-initialised BN, so branch b with its RL = branch b alone
    sq = SqueezeConfig(**ALL)
    student = SqueezedModel.from_expanded(t, "task:det", sq).eval()  # identity adapters, N = identity
    x = batches()["cls/a"]["images"]
    with torch.no_grad():
        losses = Distiller(student, t, DISTILL_SOURCES, sq).feat_losses(student.features(x), teacher_features(t, x, t.tasks))
    assert set(losses) == {"cls", "det", "seg"}
    assert losses["det"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["cls"].item() > 0.1 and losses["seg"].item() > 0.1
    own = Distiller(student, t, DISTILL_SOURCES, SqueezeConfig(distill_targets="own"))
    assert own.branches("det") == ["det"] and Distiller(student, t, DISTILL_SOURCES, sq).branches("det") == t.tasks


def test_standardisation_statistics_and_adapters():
    t = teacher()
    sq = SqueezeConfig(**ALL, teacher_norm="standardize")
    student = SqueezedModel.from_expanded(t, "task:cls", sq)
    distiller = Distiller(student, t, DISTILL_SOURCES, sq)
    batch = batches()
    estimate_teacher_norm(distiller, iter([batch, batch]), 2, torch.device("cpu"))
    # by the definition: every source's images through every teacher branch, per channel over (N, H, W)
    with torch.no_grad():
        feats = [teacher_features(t, t.heads[s.task].prepare(batch[s.name], s.name)[0], t.tasks) for s in DISTILL_SOURCES]
    for b in t.tasks:
        for k in ("layer1", "layer4"):
            x = torch.cat([f[b][k].double().transpose(0, 1).flatten(1) for f in feats], 1)
            norm = student.norms[b][k]
            torch.testing.assert_close(norm.mean, x.mean(1).float(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(norm.std, (x.var(1, unbiased=False) + 1e-4).sqrt().float(), atol=1e-5,
                                       rtol=1e-5)
            # N(x) = (x - mean) / std per channel, and the adapter restarts as N
            y = torch.randn(2, len(norm.mean), 3, 3)
            expect = (y - norm.mean.view(1, -1, 1, 1)) / norm.std.view(1, -1, 1, 1)
            torch.testing.assert_close(norm(y), expect)
            torch.testing.assert_close(student.adapters[b][k](y), expect, atol=1e-5, rtol=1e-4)


def test_total_loss_and_kd_of_every_head_by_hand():
    t = teacher()
    sq = SqueezeConfig(**ALL, heads="frozen", lambda_task=0.5, lambda_feat=2.0, lambda_kd=3.0, kd_temperature=2.0)
    student = SqueezedModel.from_expanded(t, "task:cls", sq)
    distiller = Distiller(student, t, DISTILL_SOURCES, sq).train()
    losses = distiller(batches())
    assert set(losses) == {"cls/a", "cls-b", "det/a", "seg-a"} and set(losses["det/a"]) == {"task", "feat", "kd"}
    w = {"cls/a": 1.0, "cls-b": 0.5, "det/a": 2.0, "seg-a": 1.0}
    hand = sum(w[s] * (0.5 * L["task"] + 2.0 * L["feat"] + 3.0 * L["kd"]) for s, L in losses.items())
    torch.testing.assert_close(distiller.total_loss(losses), hand)
    constant = {s: {"task": torch.tensor(1.0), "feat": torch.tensor(2.0), "kd": torch.tensor(4.0)} for s in w}
    assert distiller.total_loss(constant).item() == pytest.approx(4.5 * (0.5 + 4.0 + 12.0))
    # KD on a det image ("all"): the mean over both cls heads and the seg head, each by its definition
    out = student.forward_source(batches()["det/a"], "det/a")
    with torch.no_grad():
        tf = teacher_features(t, out.images, t.tasks)
    hs, ht = student.heads, t.heads
    terms = [kd_loss(hs["cls"].logits(out.feats, s), ht["cls"].logits(tf["cls"], s), 2.0, False) for s in ("cls/a", "cls-b")]
    terms.append(kd_loss(pixels(hs["seg"].predictors["seg-a"](hs["seg"].decoder(out.feats))),
                         pixels(ht["seg"].predictors["seg-a"](ht["seg"].decoder(tf["seg"]))), 2.0, False))
    kd = distiller.kd_losses(DISTILL_SOURCES[2], out, tf)
    assert len(kd) == 3
    torch.testing.assert_close(torch.stack(kd).mean(), torch.stack(terms).mean())
    # "own": KD only for a cls source's own logits; a det batch has none
    own = Distiller(student, t, DISTILL_SOURCES, SqueezeConfig(distill_targets="own"))
    assert own.kd_losses(DISTILL_SOURCES[2], out, tf) == []
    # frozen heads: the task and KD losses reach the backbone only
    distiller.total_loss(losses).backward()
    assert all(p.grad is None for p in student.heads.parameters())
    assert student.backbone.conv1.weight.grad.abs().sum() > 0


def test_heads_copy_frozen_fresh():
    t = teacher()
    copied = SqueezedModel.from_expanded(t, "task:cls", SqueezeConfig(heads="copy"))
    frozen = SqueezedModel.from_expanded(t, "task:cls", SqueezeConfig(heads="frozen"))
    fresh = SqueezedModel.from_expanded(t, "task:cls", SqueezeConfig(heads="fresh"))
    w = t.heads["cls"].predictors["cls/a"].weight
    assert torch.equal(copied.heads["cls"].predictors["cls/a"].weight, w)
    assert torch.equal(frozen.heads["cls"].predictors["cls/a"].weight, w)
    assert not torch.equal(fresh.heads["cls"].predictors["cls/a"].weight, w)
    assert all(p.requires_grad for p in copied.heads.parameters()) and all(
        p.requires_grad for p in fresh.heads.parameters())
    assert not any(p.requires_grad for p in frozen.heads.parameters())


def test_dev_split_is_carved_from_train_and_never_opens_val(demo_config):
    src = copy.deepcopy(next(d for d in demo_config.transfer.datasets if d.name == "novel-cls"))
    full = open_split(src, "train", train=False)
    src.dev_fraction, src.val = 0.25, "/nowhere/val"  # val is never read
    tr, dev = open_split(src, "train", train=False), open_split(src, "val", train=False)
    assert sorted(tr.indices + dev.indices) == list(range(len(full))) and not set(tr.indices) & set(dev.indices)
    labels, dev_labels = dataset_labels(full), dataset_labels(dev)
    for c in set(labels):  # class-stratified: a quarter of every class
        assert dev_labels.count(c) == max(1, round(0.25 * labels.count(c)))
    assert dev.indices == open_split(src, "val", train=False).indices  # fixed: the same for every seed and backbone
    det = copy.deepcopy(next(d for d in demo_config.transfer.datasets if d.task == "det"))
    n = len(open_split(det, "train", train=False))
    det.dev_fraction = 0.2
    d_tr, d_dev = open_split(det, "train", train=False), open_split(det, "val", train=False)
    assert len(d_dev) == round(0.2 * n) and len(d_tr) + len(d_dev) == n
