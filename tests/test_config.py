"""Config: TOML -> dataclasses, --set overrides, errors that name the key or file."""
import json

import pytest

from xlearner.config import ConfigError
from xlearner.configfile import config_from_dict, load_config

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
