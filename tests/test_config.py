"""Config: TOML -> dataclasses, --set overrides, errors that name the key or file."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from xlearner import config
from xlearner.config import Config, ConfigError
from xlearner.configfile import config_from_dict, load_config
from xlearner.tools.ablate_config import load_ablation_config

from runner import REPO, cli, env, image_folder


GOOD = """
[model]
arch = "resnet18"
tasks = ["cls", "seg"]

[[sources]]
name = "a"
task = "cls"
format = "imagefolder"
train = "x/train"
batch_size = 4

[[sources]]
name = "b"
task = "seg"
format = "masks"
train = "y/train"
num_classes = 3

[expand]
steps = 10
lr = 0.1
"""


def write(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_loads_into_dataclasses_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.model.tasks == ["cls", "seg"] and cfg.model.reconcile == "hrnet"
    assert [s.name for s in cfg.sources] == ["a", "b"]
    assert cfg.sources[0].batch_size == 4 and cfg.sources[1].num_classes == 3
    assert cfg.expand.steps == 10 and cfg.expand.lr == 0.1 and cfg.squeeze.distill_stages == [1, 2, 3, 4]


def test_set_overrides_with_type_checks(tmp_path):
    p = write(tmp_path, GOOD)
    cfg = load_config(p, ["expand.steps=50", "expand.out=runs/x", "model.reconcile_stages=[1,2]",
                          "sources.a.batch_size=16", 'squeeze.student_init="scratch"', "expand.lr=1"])
    assert cfg.expand.steps == 50 and cfg.expand.out == "runs/x" and cfg.model.reconcile_stages == [1, 2]
    assert [s.batch_size for s in cfg.sources if s.name == "a"] == [16] and cfg.squeeze.student_init == "scratch"
    assert cfg.expand.lr == 1.0 and isinstance(cfg.expand.lr, float)  # an int is a valid float
    with pytest.raises(ConfigError, match=r"expand\.steps: expected an integer, got 'many'"):
        load_config(p, ["expand.steps=many"])
    with pytest.raises(ConfigError, match=r"sources\.0\.batch_size|batch_size: expected an integer"):
        load_config(p, ["sources.a.batch_size=1.5"])
    with pytest.raises(ConfigError, match=r"no entry named 'zz'"):
        load_config(p, ["sources.zz.batch_size=2"])
    with pytest.raises(ConfigError, match=r"expected key=value"):
        load_config(p, ["expand.steps"])


def test_unknown_key_is_named(tmp_path):
    p = write(tmp_path, GOOD.replace("lr = 0.1", "lr = 0.1\nlearning_rate = 3"))
    with pytest.raises(ConfigError, match=r"c\.toml: unknown key expand\.learning_rate"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"unknown key model\.depth"):
        load_config(write(tmp_path, GOOD), ["model.depth=50"])


def test_wrong_type_is_named(tmp_path):
    p = write(tmp_path, GOOD.replace('arch = "resnet18"', "arch = 18"))
    with pytest.raises(ConfigError, match=r"model\.arch: expected a string, got 18"):
        load_config(p)
    p = write(tmp_path, GOOD.replace('tasks = ["cls", "seg"]', 'tasks = "cls"'))
    with pytest.raises(ConfigError, match=r"model\.tasks: expected a list"):
        load_config(p)


def test_malformed_toml_names_the_file(tmp_path):
    p = write(tmp_path, GOOD + "\n[expand\nsteps = ", name="broken.toml")
    with pytest.raises(ConfigError, match=r"broken\.toml: malformed TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"missing\.toml: config file not found"):
        load_config(tmp_path / "missing.toml")


def test_semantic_validation(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.toml: sources\.b\.task: must be in model\.tasks \['cls'\], got 'seg'$"):
        load_config(write(tmp_path, GOOD), ['model.tasks=["cls"]'])
    with pytest.raises(ConfigError, match=r"expand\.amp: expected off\|bf16\|fp16"):
        load_config(write(tmp_path, GOOD), ['expand.amp="fp8"'])
    with pytest.raises(ConfigError, match=r"model\.reconcile_width: must be in \(0, 1\], got 0\.0"):
        load_config(write(tmp_path, GOOD), ["model.reconcile_width=0.0"])
    with pytest.raises(ConfigError, match=r"sources\.b\.format: expected imagefolder\|csv\|coco\|masks\|ade20k\|"
                                         r"cityscapes\|torchvision, got 'parquet'$"):
        load_config(write(tmp_path, GOOD.replace('format = "masks"', 'format = "parquet"')))


def test_json_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["expand.steps=7"])
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_stored_configs_are_type_checked_not_value_checked(tmp_path):
    """A checkpoint's config still loads if a value check added later refuses it; load_config refuses it."""
    data = json.loads(json.dumps(load_config(write(tmp_path, GOOD)).to_dict()))
    data["expand"]["steps"] = 0
    assert config_from_dict(data).expand.steps == 0
    with pytest.raises(ConfigError, match=r"c\.toml: expand\.steps: must be >= 1, got 0$"):
        load_config(write(tmp_path, GOOD), ["expand.steps=0"])
    data["expand"]["steps"] = "many"
    with pytest.raises(ConfigError, match=r"expand\.steps: expected an integer, got 'many'"):
        config_from_dict(data)

# ----------------------------------------------------------------------------
# Bad config values are refused at load time: one clean line naming the file, the key, the value

TOML = """
[model]
tasks = ["cls"]

[[sources]]
name = "a"
task = "cls"
format = "imagefolder"
train = "data/train"
val = "data/val"
image_size = 32
batch_size = 2

[expand]
steps = 1
warmup_steps = 0
workers = 0
out = "run"
"""

# (--set override, the exact error after "c.toml: ")
BAD = [
    # the values of the issue: a hang, raw tracebacks, or silently accepted
    ("sources.a.batch_size=-3", "sources.a.batch_size: must be >= 1, got -3"),
    ("sources.a.image_size=0", "sources.a.image_size: must be >= 1, got 0"),
    ("expand.lr=-0.1", "expand.lr: must be > 0, got -0.1"),
    ("expand.workers=-1", "expand.workers: must be >= 0, got -1"),
    ('model.arch="resnet9"', "model.arch: expected resnet10|resnet18|resnet34|resnet50|resnet101|resnet152, got 'resnet9'"),
    ("model.reconcile_stages=[5]", "model.reconcile_stages: stages are 1..4 (layer1..layer4), got [5]"),
    ("expand.steps=-3", "expand.steps: must be >= 1, got -3"),
    ("expand.ckpt_every=-5", "expand.ckpt_every: must be >= 0, got -5"),
    ("expand.clip_grad=-1.0", "expand.clip_grad: must be >= 0, got -1.0"),
    ("sources.a.ignore_index=-7", "sources.a.ignore_index: must be in [0, 255] (a label value of a uint8 mask), got -7"),
    ("sources.a.weight=-1.0", "sources.a.weight: must be >= 0, got -1.0"),
    ("expand.grad_accum=0", "expand.grad_accum: must be >= 1, got 0"),
    ('expand.amp="fp8"', "expand.amp: expected off|bf16|fp16, got 'fp8'"),
    # the other numeric keys and named choices
    ("sources.a.weight=0.0", "sources.weight: at least one source needs a weight > 0, got [0.0]"),
    ("sources.a.num_classes=-1", "sources.a.num_classes: must be >= 0, got -1"),
    ('sources.a.metric="top5"', "sources.a.metric: expected top1|mean_per_class, got 'top5'"),
    ('sources.a.format="coco"', "sources.a.format: format 'coco' holds det data, not task 'cls', got 'coco'"),
    ("sources.a.batch_size=1", "sources.a.image_size: must be >= 33 with batch_size = 1 (training BatchNorm "
                               "needs more than one value per channel at layer4), got 32"),
    ("expand.eval_every=-1", "expand.eval_every: must be >= 0, got -1"),
    ("expand.log_every=-1", "expand.log_every: must be >= 0, got -1"),
    ("expand.warmup_steps=-1", "expand.warmup_steps: must be >= 0, got -1"),
    ("expand.weight_decay=-0.1", "expand.weight_decay: must be >= 0, got -0.1"),
    ("expand.momentum=1.0", "expand.momentum: must be in [0, 1), got 1.0"),
    ("expand.seed=-1", "expand.seed: must be >= 0, got -1"),
    ('expand.optimizer="lamb"', "expand.optimizer: expected sgd|adamw, got 'lamb'"),
    ('expand.out=""', "expand.out: needs a directory, got ''"),
    ("model.tasks=[]", "model.tasks: expected distinct tasks, got []"),
    ('model.reconcile="attention"', "model.reconcile: expected hrnet|scalar|cross_stitch|none, got 'attention'"),
    ("model.reconcile_width=1.5", "model.reconcile_width: must be in (0, 1], got 1.5"),
    ('model.det_head="faster_rcnn"', "model.det_head: no longer a key (detection is always Faster R-CNN; delete the line)"),
    ('model.other_branches_bn="eval"', "model.other_branches_bn: expected batch|running, got 'eval'"),
    ('model.seg_head="unet"', "model.seg_head: expected fpn|deeplab, got 'unet'"),
    ("model.fpn_channels=0", "model.fpn_channels: must be >= 1, got 0"),
    ("model.rpn_post_nms_top_n=0", "model.rpn_post_nms_top_n: must be >= 1, got 0"),
    ("model.box_detections_per_img=-1", "model.box_detections_per_img: must be >= 1, got -1"),
    ("model.seg_channels=0", "model.seg_channels: must be >= 1, got 0"),
    ("squeeze.steps=0", "squeeze.steps: must be >= 1, got 0"),
    ("squeeze.lr=0", "squeeze.lr: must be > 0, got 0.0"),
    ('squeeze.student_init="task:det"', "squeeze.student_init (task:<name>): expected cls, got 'det'"),
    ("squeeze.distill_stages=[0, 2]", "squeeze.distill_stages: stages are 1..4 (layer1..layer4), got [0, 2]"),
    ("squeeze.distill_stages=[]", "squeeze.distill_stages: needs at least one stage, got []"),
    ('squeeze.distill_loss="l1"', "squeeze.distill_loss: expected l2|cka|cos_smoothl1, got 'l1'"),
    ('squeeze.distill_targets="some"', "squeeze.distill_targets: expected own|all, got 'some'"),
    ('squeeze.teacher_norm="whiten"', "squeeze.teacher_norm: expected none|standardize, got 'whiten'"),
    ('squeeze.heads="shared"', "squeeze.heads: expected copy|frozen|fresh, got 'shared'"),
    ("squeeze.norm_steps=0", "squeeze.norm_steps: must be >= 1, got 0"),
    ('model.branch_init="tied"', "model.branch_init: expected independent|shared, got 'tied'"),
    ("transfer.dev_fraction=0.6", "transfer.dev_fraction: must be in [0, 0.5], got 0.6"),
    ("squeeze.lambda_kd=-1", "squeeze.lambda_kd: must be >= 0, got -1.0"),
    ("squeeze.kd_temperature=0", "squeeze.kd_temperature: must be > 0, got 0.0"),
    ('transfer.protocol="knn"', "transfer.protocol: expected linear|finetune, got 'knn'"),
    ("transfer.train_fraction=1.5", "transfer.train_fraction: must be in (0, 1], got 1.5"),
    ("transfer.train_fraction=0", "transfer.train_fraction: must be in (0, 1], got 0.0"),
    ("transfer.epochs=0", "transfer.epochs: must be >= 1, got 0"),
    ("transfer.lr=-1", "transfer.lr: must be > 0, got -1.0"),
    ("transfer.batch_size=0", "transfer.batch_size: must be >= 1, got 0"),
    ("transfer.clip_grad=-1", "transfer.clip_grad: must be >= 0, got -1.0"),
    ("transfer.workers=-2", "transfer.workers: must be >= 0, got -2"),
    ("transfer.seeds=[]", "transfer.seeds: needs distinct seeds >= 0, got []"),
    ("transfer.l2_grid=[-1.0]", "transfer.l2_grid: needs values >= 0, got [-1.0]"),
    ("sources.a.train_subset=10", "sources.a.train_subset: a [[transfer.datasets]] key; a [[sources]] entry does not take it"),
    ('transfer.datasets=[{name="t", val_subset=-1}]', "transfer.datasets.t.val_subset: must be >= 0, got -1"),
]
# the [ablate] section is `python cli.py ablate`'s (tools/ablate_config.py): checked when that command loads the file
BAD_ABLATE = [
    ("ablate.seeds=[0, 0]", "ablate.seeds: needs distinct seeds >= 0, got [0, 0]"),
    ('ablate.variants=["ssst", "mtl"]', "ablate.variants: expected ssst|msst|msmt|teacher_rl|teacher_norl|expand_rl|"
                                        "expand_rl_alone|expand_norl|xlearner|xlearner_v1|squeeze_norl|sq_v1|sq_all|"
                                        "sq_all_det|sq_all_copy|sq_all_lr1|gt_ind_240|gt_ind_120|gt_ind_360|"
                                        "gt_sh_240|gt_sh_120|gt_sh_360|gx_ind_cls_240|gx_ind_cls_120|gx_ind_cls_360|gx_sh_cls_240|"
                                        "gx_sh_cls_120|gx_sh_cls_360|gx_sh_mean_240|gx_sh_mean_120|gx_sh_mean_360|"
                                        "teacher_prev|xlearner_prev, "
                                        "got 'mtl'"),
    ("ablate.jobs=0", "ablate.jobs: must be >= 1, got 0"),
    ('ablate.optional_datasets=["nope"]', "ablate.optional_datasets: must name transfer datasets [], got 'nope'"),
    ('ablate.ssst_source="b"', "ablate.ssst_source: must name a cls source ['a'], got 'b'"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A one-source cls config over 2 classes x 2 images of 32 px (train and val)."""
    root = tmp_path_factory.mktemp("bad_values")
    image_folder(root / "data", {"red": (220, 20, 20), "blue": (20, 20, 220)}, {"train": 2, "val": 2}, 32)
    (root / "c.toml").write_text(TOML)
    return root


def expand(root, *args: str, debug: bool = False, timeout: int = 60) -> subprocess.CompletedProcess:
    cmd = cli(*(["--debug"] if debug else []), "expand", "--config", "c.toml", *args)
    return subprocess.run(cmd, cwd=root, env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_one_clean_line(tiny, override, message):
    p = expand(tiny, "--set", override)
    assert p.returncode == 2, p.stderr
    assert p.stderr == f"Error: c.toml: {message}\n"  # one line: no traceback, nothing else
    assert not (tiny / "run").exists()  # refused before anything ran


@pytest.mark.parametrize("override,message", BAD_ABLATE, ids=[b[0] for b in BAD_ABLATE])
def test_bad_ablate_value_is_one_clean_line(tiny, override, message):
    p = subprocess.run(cli("ablate", "--config", "c.toml", "--set", override, "--set", 'ablate.out="ab"'), cwd=tiny,
                       env=env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert p.stderr == f"Error: c.toml: {message}\n"
    assert not (tiny / "ab").exists()


def test_the_ablate_section_is_the_ablate_commands_alone(tiny):
    """The stages read past [ablate] (configs/ablate.toml also serves `transfer`), and past the section that an
    ablation's runs store in their checkpoints; a misspelt section is still an unknown key."""
    cfg = load_config(tiny / "c.toml", ["ablate.jobs=0"])
    assert type(cfg) is Config and not hasattr(cfg, "ablate")
    with pytest.raises(ConfigError, match=r"c.toml: ablate.jobs: must be >= 1, got 0$"):
        load_ablation_config(tiny / "c.toml", ["ablate.jobs=0"])
    ablation = load_ablation_config(tiny / "c.toml", ["ablate.jobs=2"])
    assert ablation.ablate.jobs == 2 and list(ablation.to_dict())[-1] == "ablate"
    assert config_from_dict(ablation.to_dict()) == load_config(tiny / "c.toml")
    with pytest.raises(ConfigError, match=r"unknown key ablat \(known keys: data_root, dist_timeout_min, expand, "):
        load_config(tiny / "c.toml", ["ablat.jobs=2"])


def test_the_cli_loads_a_config_without_torch():
    """Why the cases above are fast: the config is checked before the command imports torch."""
    code = "import sys, xlearner.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), timeout=60).returncode == 0


def test_debug_shows_the_traceback(tiny):
    for p in (expand(tiny, "--set", "expand.lr=-0.1", debug=True),
              subprocess.run(cli("expand", "--config", "c.toml", "--set", "expand.lr=-0.1"), cwd=tiny,
                             env={**env(), "XLEARNER_DEBUG": "1"}, capture_output=True, text=True, timeout=60)):
        assert p.returncode == 1
        assert p.stderr.startswith("Traceback (most recent call last):")
        assert p.stderr.endswith("xlearner.config.ConfigError: c.toml: expand.lr: must be > 0, got -0.1\n")


@pytest.mark.slow
def test_long_warmup_warns_once_and_runs(tiny):
    p = expand(tiny, "--set", "expand.warmup_steps=5", "--set", 'expand.out="run-warmup"', timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: c.toml: expand.warmup_steps = 5 >= expand.steps = 1: "
                        "the whole run is warmup (no cosine decay)"]
    assert (tiny / "run-warmup" / "checkpoint.pt").is_file()


def test_warning_is_printed_once_per_process(tiny, capsys):
    for _ in range(2):
        load_config(tiny / "c.toml", ["squeeze.steps=7", "squeeze.warmup_steps=7"])
    assert capsys.readouterr().err == (f"warning: {tiny / 'c.toml'}: squeeze.warmup_steps = 7 >= squeeze.steps = 7: "
                                       "the whole run is warmup (no cosine decay)\n")


@pytest.mark.slow
def test_bad_files_fail_before_training(tiny):
    """Files the config names are opened before the first step: one message, no traceback, exit 2 or 1."""
    import torch
    import torchvision
    torch.save(torchvision.models.resnet34().state_dict(), tiny / "r34.pth")
    cases = [(["--set", 'model.pretrained="r34.pth"'], 2,
              "Error: c.toml: model.pretrained: r34.pth holds a resnet34 state_dict, but model.arch = 'resnet18'\n"),
             (["--set", 'model.pretrained="data/val/red/0.png"'], 2,
              "Error: c.toml: model.pretrained: data/val/red/0.png: cannot load a state_dict with weights_only=True"),
             (["--set", 'model.pretrained="ResNet50_Weights.IMAGENET1K_V2"'], 2,
              "Error: c.toml: model.pretrained = 'ResNet50_Weights.IMAGENET1K_V2': weights of another "
              "architecture than model.arch = 'resnet18'\n"),
             (["--set", 'sources.a.val="data/nowhere"'], 1, "Error: source 'a' (val): 1 problem(s) (`cli.py "
              "check-data` lists them all):\n  data/nowhere: split directory not found\n")]
    for args, code, message in cases:
        p = expand(tiny, *args, timeout=120)
        assert p.returncode == code and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.startswith(message), p.stderr
        assert not (tiny / "run").exists()


@pytest.mark.slow
def test_bad_teacher_or_student_init_fails_before_training(tiny):
    """squeeze: a student_init file is checked before the teacher is read; a bad teacher is one message."""
    cases = [(["--teacher", "c.toml"], 1, "Error: c.toml: corrupt or truncated checkpoint (not a complete "
                                          "torch.save archive)\n"),
             (["--teacher", "missing.pt"], 1, "Error: missing.pt: checkpoint not found\n"),
             (["--teacher", "missing.pt", "--set", 'squeeze.student_init="nowhere.pth"'], 2,
              "Error: c.toml: squeeze.student_init = 'nowhere.pth': no such file (nor a torchvision weights name "
              "such as 'ResNet50_Weights.IMAGENET1K_V2')\n")]
    for args, code, message in cases:
        p = subprocess.run(cli("squeeze", "--config", "c.toml", *args), cwd=tiny, env=env(), capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == code and p.stderr.endswith(message), p.stderr
        assert "Traceback" not in p.stderr and not (tiny / "runs").exists()


def test_the_registries_are_built_on_config_names():
    """config.py holds the one list of names (it imports no torch); each registry is built against it, refuses
    a name missing or extra when its module is imported, and answers an unknown name with validation's line."""
    from xlearner import backbone, heads, model, squeeze
    from xlearner.tools import ablate, ablate_config
    for reg, names in ((backbone.BACKBONES, config.ARCHS), (model.RECONCILE, config.RECONCILES),
                       (heads.SEG_DECODERS, config.SEG_HEADS), (squeeze.FEATURE_LOSSES, config.DISTILL_LOSSES),
                       (ablate.VARIANTS, ablate_config.VARIANT_NAMES)):
        assert isinstance(reg, config.Registry) and sorted(reg) == sorted(names), reg.key
    with pytest.raises(TypeError, match=r"^model.reconcile: implemented \['hrnet'\], the config allows \['cross_stitch', 'hrnet', 'none', 'scalar'\]$"):
        config.Registry("model.reconcile", config.RECONCILES, hrnet=object)
    with pytest.raises(ConfigError, match=r"^model.seg_head: expected fpn\|deeplab, got 'unet'$"):
        heads.SEG_DECODERS["unet"]
    assert heads.SEG_DECODERS["fpn"] is heads.FPNDecoder


@pytest.mark.slow
def test_ablate_on_missing_data_is_one_line(tmp_path):
    """ablate opens every split before its workers start: a missing folder is one Error line, no traceback."""
    p = subprocess.run(cli("ablate", "--config", str(REPO / "configs" / "ablate.toml"), "--set",
                           f'data_root="{tmp_path / "nowhere"}"', "--set", f'ablate.out="{tmp_path / "runs"}"'),
                       cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.splitlines()
    assert lines[0].startswith("Error: source 'shapes-cls' (train): 1 problem(s)"), p.stderr
    assert f"{tmp_path / 'nowhere' / 'data/ablate/shapes-cls/train'}: split directory not found" in p.stderr
    assert not (tmp_path / "runs").exists()
