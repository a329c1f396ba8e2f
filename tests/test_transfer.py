"""Transfer evaluator: the linear probe, the feature cache, train_fraction subsets and the results table."""
import copy
import json
from collections import Counter

import pytest
import torch
import torchvision

from runner import REPO, image_folder
from xlearner import probe, results, transfer, weights
from xlearner.backbone import to_input
from xlearner.run.checkpoint import CheckpointError
from xlearner.config import Config, ConfigError, SourceConfig, TransferConfig, TransferDatasetConfig
from xlearner.formats.files import DataError

README = str(REPO / "README.md")


# ----------------------------------------------------------------------------- linear probe

def _clusters(n_per_class=60, k=4, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, dim, generator=g) * 4
    y = torch.arange(k).repeat_interleave(n_per_class)
    x = centers[y] + torch.randn(len(y), dim, generator=g)
    return x, y


def test_linear_probe_separable_and_deterministic():
    xtr, ytr = _clusters(seed=0)
    xva, yva = _clusters(n_per_class=30, seed=0)  # same centers (same seed), fresh noise below
    xva = xva + 0.1 * torch.randn(xva.shape, generator=torch.Generator().manual_seed(1))
    grid = [1e-5, 1e-3, 1e-1]
    a = probe.linear_probe(xtr, ytr, xva, yva, num_classes=4, l2_grid=grid, seed=3)
    b = probe.linear_probe(xtr, ytr, xva, yva, num_classes=4, l2_grid=grid, seed=3)
    assert a["top1"] >= 99.0
    assert a["l2"] in grid
    assert (a["l2"], a["top1"], a["sweep"]) == (b["l2"], b["top1"], b["sweep"])


def test_linear_probe_mean_per_class_metric():
    xtr, ytr = _clusters(seed=1)
    res = probe.linear_probe(xtr, ytr, xtr, ytr, num_classes=4, l2_grid=[1e-3], metric="mean_per_class")
    assert res["mean_per_class"] >= 99.0 and res["l2"] == 1e-3


# ----------------------------------------------------------------------------- subsets

def test_stratified_subset():
    labels = [0] * 50 + [1] * 30 + [2] * 20 + [3] * 3
    idx = probe.stratified_subset(labels, 0.1, seed=7)
    counts = Counter(labels[i] for i in idx)
    assert counts == {0: 5, 1: 3, 2: 2, 3: 1}  # at least one per class
    assert idx == sorted(idx) and len(set(idx)) == len(idx)
    assert idx == probe.stratified_subset(labels, 0.1, seed=7)
    assert idx != probe.stratified_subset(labels, 0.1, seed=8)
    assert probe.stratified_subset(labels, 1.0, seed=0) == list(range(len(labels)))
    sub = probe.random_subset(100, 0.25, seed=0)
    assert len(sub) == 25 and sub == probe.random_subset(100, 0.25, seed=0)


# ----------------------------------------------------------------------------- results table

def _fake_results(names, per_seed):
    datasets = [{"name": "a", "task": "cls", "metric": "top1"}, {"name": "b", "task": "cls", "metric": "mean_per_class"},
                {"name": "d", "task": "det", "metric": "AP"}, {"name": "s", "task": "seg", "metric": "mIoU"}]
    results = {d["name"]: {} for d in datasets}
    for j, n in enumerate(names):
        for i, d in enumerate(datasets):
            vals = [10.0 * (i + 1) + j + s for s in range(per_seed)]
            results[d["name"]][n] = {"mean": sum(vals) / len(vals), "std": 0.5 if per_seed > 1 else 0.0,
                                     "per_seed": [{"seed": s, d["metric"]: v} for s, v in enumerate(vals)]}
    return {"backbones": [{"name": n} for n in names], "datasets": datasets, "results": results}


def test_results_markdown_shape():
    md = results.results_markdown(_fake_results(["base", "x", "y"], per_seed=2))
    rows = [r for r in md.strip().splitlines()]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header == ["dataset", "metric", "base", "x", "y", "x gain over base", "y gain over base"]
    body = [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]
    assert [r[0] for r in body] == ["a", "b", "d", "s", "**cls mean**", "**det mean**", "**seg mean**"]
    assert all(len(r) == len(header) for r in body)
    a = body[0]
    assert a[1] == "top1" and a[2] == "10.50 ± 0.50" and a[5] == "+1.00" and a[6] == "+2.00"
    cls_mean = body[4]
    assert cls_mean[2] == "15.50" and cls_mean[5] == "+1.00"  # mean of 10.5 and 20.5
    # one seed: no ± ; one backbone: no gain column
    md1 = results.results_markdown(_fake_results(["only"], per_seed=1))
    assert "±" not in md1 and "gain" not in md1.splitlines()[0]


# ----------------------------------------------------------------------------- end to end on a tiny imagefolder

def _imagefolder(root, n_train=6, n_val=3, size=24):
    """Two colour classes: red-ish vs blue-ish squares with noise."""
    return image_folder(root, {"blue": (26, 26, 230), "red": (230, 26, 26)}, {"train": n_train, "val": n_val}, size,
                        noise=51)


@pytest.fixture
def tiny_cfg(tmp_path):
    root = _imagefolder(tmp_path / "colors")
    ds = TransferDatasetConfig(name="colors", task="cls", format="imagefolder", train=str(root / "train"),
                      val=str(root / "val"), image_size=32, batch_size=8)
    return Config(transfer=TransferConfig(datasets=[ds], workers=0, l2_grid=[1e-4, 1e-2], seeds=[0, 1],
                                          out=str(tmp_path / "out")))


def _count_extractions(monkeypatch):
    calls = []
    real = probe.extract_features

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    # patched where the feature cache looks it up
    monkeypatch.setattr(probe, "extract_features", counting)
    return calls


def test_linear_transfer_cache_hits_and_invalidation(tiny_cfg, tmp_path, monkeypatch):
    calls = _count_extractions(monkeypatch)
    pth = tmp_path / "r18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), pth)
    out = tmp_path / "out"

    first = transfer.run(tiny_cfg, [str(pth)], ["r18"], None, str(out))
    assert len(calls) == 2  # train + val, once for both seeds
    second = transfer.run(tiny_cfg, [str(pth)], ["r18"], None, str(out))
    assert len(calls) == 2  # the cache served both splits
    def scores(res):
        return [(r["top1"], r["l2"]) for r in res["results"]["colors"]["r18"]["per_seed"]]
    assert scores(first) == scores(second)  # cached features give the same probe
    assert len(list((out / "cache").glob("*.pt"))) == 2

    torch.manual_seed(1)  # different weights under the same file name: a different backbone
    torch.save(torchvision.models.resnet18().state_dict(), pth)
    transfer.run(tiny_cfg, [str(pth)], ["r18"], None, str(out))
    assert len(calls) == 4
    assert len(list((out / "cache").glob("*.pt"))) == 4


def test_run_writes_results_for_several_backbones(tiny_cfg, tmp_path):
    pth = tmp_path / "r18.pth"
    sd = torchvision.models.resnet18().state_dict()
    torch.save(sd, pth)
    out = tmp_path / "out"
    res = transfer.run(tiny_cfg, ["random", str(pth)], None, None, str(out))
    saved = json.loads((out / "results.json").read_text())
    assert [b["name"] for b in saved["backbones"]] == ["random", "r18"]
    assert saved["backbones"][1]["hash"] == saved["backbones"][1]["file_sha256"]
    row = saved["results"]["colors"]
    for name in ("random", "r18"):
        top1 = [r["top1"] for r in row[name]["per_seed"]]
        assert len(top1) == 2 and row[name]["mean"] == pytest.approx(sum(top1) / 2)
    assert res["results"]["colors"]["r18"]["mean"] == row["r18"]["mean"]
    md = (out / "results.md").read_text().splitlines()
    assert md[0] == "| dataset | metric | random | r18 | r18 gain over random |"
    assert [line.split(" | ")[:2] for line in md[2:]] == [["| colors", "top1"], ["| **cls mean**", ""]]


def test_load_backbone_specs(tmp_path):
    a, info_a = weights.load_backbone("random", "resnet18")
    b, info_b = weights.load_backbone("random", "resnet18")
    assert info_a["hash"] == info_b["hash"] and info_a["seed"] == 0
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    _, info_c = weights.load_backbone("random:1", "resnet18")
    assert info_c["hash"] != info_a["hash"]
    pth = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), pth)  # with fc.*: ignored
    bb, info = weights.load_backbone(str(pth), "resnet18")
    assert len(info["hash"]) == 64 and info["hash"] == info["file_sha256"]
    # a plain state_dict says its own arch (block layout), whatever model.arch is
    assert weights.load_backbone(str(pth), "resnet34")[1]["arch"] == "resnet18"
    for arch in ("resnet34", "resnet50"):  # the same block counts: told apart by the block type
        assert weights.infer_arch(getattr(torchvision.models, arch)().state_dict()) == arch
    other = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, other)  # not a ResNet: model.arch is tried, and named
    from xlearner.config import ConfigError
    with pytest.raises(ConfigError, match=r"other\.pth: not a state_dict of this architecture.*model\.arch is 'resnet34'"):
        weights.load_backbone(str(other), "resnet34")


def test_load_backbone_from_expand_checkpoint(tmp_path):
    from xlearner.config import ModelConfig
    from xlearner.expand import XLearnerModel
    cfg = Config(model=ModelConfig(arch="resnet18", tasks=["cls", "seg"]),
                 sources=[SourceConfig(name="c", task="cls"), SourceConfig(name="s", task="seg")])
    torch.manual_seed(0)
    model = XLearnerModel(cfg.model, cfg.sources, {"c": 3, "s": 2})
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(),
                "meta": {"kind": "expanded", "num_classes": {"c": 3, "s": 2}, "arch": "resnet18"}}, ckpt)
    default, info_default = weights.load_backbone(str(ckpt), "resnet50")  # the checkpoint's arch wins
    seg, info_seg = weights.load_backbone(str(ckpt), "resnet18", branch="seg")
    assert info_default["branch"] == "cls" and info_default["arch"] == "resnet18"
    assert info_default["hash"] == weights.load_backbone(str(ckpt), "resnet18", branch="cls")[1]["hash"]
    assert info_seg["hash"] != info_default["hash"]
    for name, branch in (("cls", default), ("seg", seg)):
        ref = model.backbone.branches[name].state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in branch.state_dict().items())


def test_trained_protocols_smoke(demo_config, tmp_path):
    """finetune (cls), det and seg: one short epoch each on the tiny demo world, metrics in range."""
    cfg = demo_config
    cfg.transfer.epochs, cfg.transfer.workers, cfg.transfer.seeds = 1, 0, [0]
    cfg.transfer.train_fraction = 0.5
    for d in cfg.transfer.datasets:
        d.protocol = "finetune" if d.name == "novel-cls" else d.protocol
        d.image_size = min(d.image_size, 64)  # CPU time: detection at 128 px is 4x dearer
    cfg.transfer.datasets = [d for d in cfg.transfer.datasets if d.name != "count-cls"]
    res = transfer.run(cfg, ["random"], ["rnd"], None, str(tmp_path / "out"))
    r = {name: row["rnd"]["per_seed"][0] for name, row in res["results"].items()}
    assert set(r["novel-det"]) >= {"AP", "AP50", "AP75"} and len(r["novel-seg"]["per_class_iou"]) == 5
    # regression pin: this run is deterministic, the numbers measured with torch 2.14.1 on CPU (1 and 2 threads alike)
    got = {"cls top1": r["novel-cls"]["top1"], "det AP": r["novel-det"]["AP"], "det AP50": r["novel-det"]["AP50"],
           "det AP75": r["novel-det"]["AP75"], "seg mIoU": r["novel-seg"]["mIoU"]}
    assert got == pytest.approx({"cls top1": 0.0, "det AP": 0.011424, "det AP50": 0.057121, "det AP75": 0.0,
                                 "seg mIoU": 0.364153}, abs=1e-4)


class _HugeGradModel(torch.nn.Module):
    """loss = 1e6 * w * mean(images): a gradient of ~1e6 on the single weight w."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Identity()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, batch):
        return 1e6 * self.w * to_input(batch["images"]).mean().abs()


@pytest.mark.parametrize("clip", [0.0, 0.01])
def test_train_loop_clips_the_gradient_norm(tiny_cfg, clip):
    from xlearner import data
    src = tiny_cfg.transfer.datasets[0]
    ds = data.build_dataset(src, "train", train=False)
    model = _HugeGradModel()
    # one epoch, one batch (12 images <= batch 16): one SGD step at the full lr (no warmup for 1 step)
    transfer.train_loop(model, ds, "cls", epochs=1, lr=1.0, batch_size=16, workers=0, device=torch.device("cpu"),
                        seed=0, freeze_backbone=False, desc="clip", clip_grad=clip)
    step = 1.0 - model.w.item()
    if clip:
        # clipped gradient (norm 0.01) plus weight decay on w = 1
        assert step == pytest.approx(clip + transfer.WEIGHT_DECAY, rel=1e-4)
    else:
        assert step > 1e3


def test_train_loop_follows_the_one_lr_schedule(tiny_cfg, monkeypatch):
    """transfer's heads train on engine.warmup_cosine (warmup = a tenth of the steps), not a schedule of their own."""
    from xlearner import data, engine
    ds = data.build_dataset(tiny_cfg.transfer.datasets[0], "train", train=False)
    lrs, step = [], torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: (lrs.append(self.param_groups[0]["lr"]), step(self, *a, **k))[1])
    model = _HugeGradModel()
    transfer.train_loop(model, ds, "cls", epochs=10, lr=2.0, batch_size=4, workers=0, device=torch.device("cpu"),
                        seed=0, freeze_backbone=False, desc="lr", clip_grad=0.01)
    total = 10 * -(-len(ds) // 4)
    assert len(lrs) == total and lrs == [2.0 * engine.warmup_cosine(s, total // 10, total) for s in range(total)]
    assert lrs[0] == 2.0 / (total // 10)  # the warmup's first step (1 / (warmup + 1) before)


# ----------------------------------------------------------------------------- fail fast, resume

def _r18(path, seed=0):
    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return str(path)


def test_bad_backbone_or_dataset_fails_before_any_work(tiny_cfg, tmp_path, monkeypatch):
    calls = _count_extractions(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"README\.md: corrupt or truncated checkpoint"):
        transfer.run(tiny_cfg, [_r18(tmp_path / "r18.pth"), README], ["good", "bad"], None, str(out))
    broken = TransferDatasetConfig(**{**vars(tiny_cfg.transfer.datasets[0]), "name": "broken", "val": str(tmp_path / "nowhere")})
    tiny_cfg.transfer.datasets.append(broken)
    with pytest.raises(DataError, match=r"source 'broken' \(val\)"):
        transfer.run(tiny_cfg, [_r18(tmp_path / "r18.pth")], ["good"], None, str(out))
    assert calls == [] and not out.exists()  # no feature extracted, no record, no results file


def _without_seconds(res):
    return {d: {n: [{k: v for k, v in r.items() if k != "seconds"} for r in row[n]["per_seed"]] for n in row}
            for d, row in res["results"].items()}


def test_rerun_reuses_finished_results(tiny_cfg, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    specs, names = ["random", _r18(tmp_path / "r18.pth")], ["rnd", "r18"]
    first = transfer.run(tiny_cfg, specs, names, None, str(out))
    records = sorted((out / "records").glob("*.json"))
    assert len(records) == 4  # 2 backbones x 1 dataset x 2 seeds
    capsys.readouterr()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished result was computed again")

    monkeypatch.setattr(transfer, "transfer_one", must_not_run)
    second = transfer.run(tiny_cfg, specs, names, None, str(out))
    assert f"[transfer] reusing 4 of 4 finished results from {out / 'records'}" in capsys.readouterr().out
    assert second["results"] == first["results"]  # the same numbers, seconds included
    assert json.loads((out / "results.json").read_text())["results"] == first["results"]

    # a suite killed after 3 results: only the missing one is computed
    lost = json.loads(records[1].read_text())["key"]
    records[1].unlink()
    computed = []
    monkeypatch.undo()
    real = transfer.transfer_one

    def counting(backbone, info, cfg, src, seed, *args):
        computed.append((info["hash"], src.name, seed))
        return real(backbone, info, cfg, src, seed, *args)

    monkeypatch.setattr(transfer, "transfer_one", counting)
    third = transfer.run(tiny_cfg, specs, names, None, str(out))
    assert computed == [(lost["backbone_hash"], "colors", lost["seed"])]
    assert "reusing 3 of 4 finished results" in capsys.readouterr().out
    assert _without_seconds(third) == _without_seconds(first) and records[1].is_file()

    # a changed value that changes the result (the probe's L2 grid) is a new result, not a reused one
    tiny_cfg.transfer.l2_grid = [1e-3]
    computed.clear()
    transfer.run(tiny_cfg, specs, names, None, str(out))
    assert len(computed) == 4 and len(list((out / "records").glob("*.json"))) == 8


def test_det_seg_heads_use_the_backbones_arch(demo_config, tmp_path):
    """A ResNet-50 state_dict on det and seg with a config whose model.arch is resnet18."""
    cfg = demo_config
    assert cfg.model.arch == "resnet18"
    cfg.transfer.epochs, cfg.transfer.workers, cfg.transfer.seeds, cfg.transfer.train_fraction = 1, 0, [0], 0.25
    cfg.transfer.datasets = [d for d in cfg.transfer.datasets if d.task in ("det", "seg")]
    for d in cfg.transfer.datasets:
        d.image_size, d.batch_size = 64, 2
    pth = tmp_path / "r50.pth"
    torch.manual_seed(0)  # the same random ResNet-50 every run: its numbers are pinned below
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), pth)
    res = transfer.run(cfg, [str(pth)], ["r50"], None, str(tmp_path / "out"))
    assert res["backbones"][0]["arch"] == "resnet50"
    r = {name: row["r50"]["per_seed"][0] for name, row in res["results"].items()}
    assert set(r) == {"novel-det", "novel-seg"}
    # regression pin: this run is deterministic, the numbers measured with torch 2.14.1 on CPU (1 and 2 threads alike)
    assert (r["novel-det"]["AP"], r["novel-det"]["AP50"], r["novel-seg"]["mIoU"]) == pytest.approx((0.0, 0.0, 0.307789),
                                                                                                abs=1e-4)


def _expand_checkpoint(tmp_path, arch="resnet10", reconcile="hrnet"):
    """A tiny 3-task expanded model saved as an expand run checkpoint; (model, path)."""
    from xlearner.config import ModelConfig
    from xlearner.expand import XLearnerModel
    cfg = Config(model=ModelConfig(arch=arch, tasks=["cls", "det", "seg"], reconcile=reconcile, fpn_channels=16,
                                   seg_channels=16, box_head_dim=32),
                 sources=[SourceConfig(name="c", task="cls"), SourceConfig(name="d", task="det"),
                          SourceConfig(name="s", task="seg")])
    torch.manual_seed(0)
    model = XLearnerModel(cfg.model, cfg.sources, {"c": 3, "d": 2, "s": 2})
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(),
                "meta": {"kind": "expanded", "num_classes": {"c": 3, "d": 2, "s": 2}, "arch": arch}}, path)
    return model, path


def test_with_rl_extractor_equals_branch_alone_at_zero_init_and_differs_after(tmp_path):
    from xlearner.model import BranchWithRL
    model, path = _expand_checkpoint(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    for task in ("cls", "det", "seg"):
        alone, info_alone = weights.load_backbone(str(path), "resnet18", branch=task)
        with_rl, info_rl = weights.load_backbone(str(path), "resnet18", branch=task, with_rl=True)
        assert isinstance(with_rl, BranchWithRL) and with_rl.arch == alone.arch == "resnet10"
        assert info_rl["hash"] != info_alone["hash"]  # their features are cached apart
        with torch.no_grad():
            fa, fr = alone.eval()(x), with_rl.eval()(x)
        # the RLs' last BN starts at gamma = beta = 0: they add exactly nothing
        assert all(torch.equal(fa[k], fr[k]) for k in fa), task
    # train the RLs' mixing away from zero: the branch now reads the other branches
    for name, p in model.backbone.reconcile.named_parameters():
        torch.nn.init.normal_(p, std=0.5)
    nonzero = tmp_path / "nonzero.pt"
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "model": model.state_dict()}, nonzero)
    alone, _ = weights.load_backbone(str(nonzero), "resnet18", branch="det")
    with_rl, _ = weights.load_backbone(str(nonzero), "resnet18", branch="det", with_rl=True)
    with torch.no_grad():
        fa, fr = alone.eval()(x), with_rl.eval()(x)
    diffs = {k: (fa[k] - fr[k]).abs().max().item() for k in fa}
    assert all(d > 1e-3 for d in diffs.values()), diffs  # RLs at layers 1..3, and layer4 reads layer3
    # the branch's own weights are the same in both: only the RL inputs differ
    assert all(torch.equal(v, with_rl.net.branches["det"].state_dict()[k]) for k, v in alone.state_dict().items())


def test_with_rl_needs_an_expand_checkpoint_with_branches(tmp_path):
    pth = tmp_path / "plain.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), pth)
    with pytest.raises(ConfigError, match=r"plain.pth: --with-rl needs an expand run checkpoint \(not a plain state_dict\)"):
        weights.load_backbone(str(pth), "resnet18", with_rl=True)
    with pytest.raises(ConfigError, match="random: --with-rl needs an expand run checkpoint"):
        weights.load_backbone("random", "resnet18", with_rl=True)


def test_with_rl_probe_det_and_seg_heads_run(demo_config, tmp_path):
    """The linear probe, the det head and the seg head all train and score on the with-RL extractor."""
    # each score is a regression pin: this run is deterministic (the checkpoint is seeded), the numbers
    # measured with torch 2.14.1 on CPU (1 and 2 threads alike)
    pinned = {"cls": 25.0, "det": 0.056500, "seg": 7.635653}
    _, path = _expand_checkpoint(tmp_path)
    cfg = demo_config
    cfg.transfer.epochs, cfg.transfer.workers, cfg.transfer.seeds, cfg.transfer.train_fraction = 1, 0, [0], 0.25
    cfg.transfer.datasets = [d for d in cfg.transfer.datasets if d.name != "count-cls"]
    for d in cfg.transfer.datasets:
        d.image_size, d.batch_size = 64, 2
    for task in ("cls", "det", "seg"):
        c = copy.deepcopy(cfg)
        c.transfer.datasets = [d for d in cfg.transfer.datasets if d.task == task]
        res = transfer.run(c, [str(path)], ["x"], task, str(tmp_path / task), with_rl=True)
        assert res["backbones"][0]["with_rl"] and res["backbones"][0]["branch"] == task
        (d,) = c.transfer.datasets
        score = res["results"][d.name]["x"]["per_seed"][0][{"cls": "top1", "det": "AP50", "seg": "mIoU"}[task]]
        assert score == pytest.approx(pinned[task], abs=1e-4), task


def test_resnet10_exports_into_torchvisions_resnet_class(tmp_path):
    """model.arch = "resnet10" is torchvision's own ResNet(BasicBlock, [1, 1, 1, 1]): its export loads there."""
    from torchvision.models.resnet import BasicBlock, ResNet
    from xlearner.backbone import build_backbone
    from xlearner.backbone import backbone_state_dict
    torch.manual_seed(0)
    backbone = build_backbone("resnet10")
    sd = backbone_state_dict(backbone)
    target = ResNet(BasicBlock, [1, 1, 1, 1])
    result = target.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []
    assert weights.infer_arch(sd) == "resnet10"
    pth = tmp_path / "r10.pth"
    torch.save(sd, pth)
    loaded, info = weights.load_backbone(str(pth), "resnet50")  # the file says its own arch
    assert info["arch"] == loaded.arch == "resnet10"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        target.eval(), loaded.eval(), backbone.eval()
        pooled = loaded(x)["layer4"].mean((2, 3))
        tv = torch.flatten(target.avgpool(target.layer4(target.layer3(target.layer2(target.layer1(
            target.maxpool(target.relu(target.bn1(target.conv1(x))))))))), 1)
    assert torch.equal(pooled, tv)


def test_fixed_train_and_val_subsets_are_class_stratified(tmp_path):
    """train_subset / val_subset: one class-stratified subset, the same whatever the seed."""
    root = image_folder(tmp_path / "ds", {"a": (200, 0, 0), "b": (0, 200, 0), "c": (0, 0, 200)}, {"train": 12, "val": 6},
                        16)
    src = TransferDatasetConfig(name="d", task="cls", format="imagefolder", train=str(root / "train"), val=str(root / "val"),
                       image_size=16, train_subset=9, val_subset=6)
    train, val = probe.open_split(src, "train", False), probe.open_split(src, "val", False)
    assert len(train) == 9 and len(val) == 6
    assert Counter(probe.dataset_labels(train)) == {0: 3, 1: 3, 2: 3}
    assert Counter(probe.dataset_labels(val)) == {0: 2, 1: 2, 2: 2}
    assert [train[i][1] for i in range(9)] == probe.dataset_labels(train)  # the labels follow the subset
    again = probe.open_split(src, "train", False)
    assert again.indices == train.indices  # fixed: not drawn per seed
    full = probe.open_split(TransferDatasetConfig(**{**src.__dict__, "train_subset": 0}), "train", False)
    assert len(full) == 36 and full.indices is None
