"""Reading a config: a TOML file (with `--set` overrides) or a checkpoint's stored dict, into config.py's dataclasses.

config.py says what a run's configuration is (every key, type, default and value rule); this
module turns text into it: `load_config` reads a TOML file, applies `--set a.b=value`, checks every
key and type (`_from_dict`), then the values (`config.validate`), and joins relative data paths to
`data_root`; `config_from_dict` rebuilds the Config a checkpoint stored, in today's schema. No torch.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from .config import PATH_KEYS, Config, ConfigError, SourceConfig, TransferDatasetConfig, validate

# ----------------------------------------------------------------------------
# dict -> dataclass with type checks

# scalar type -> (what an error calls it, the test a TOML value must pass); a bool is an int to Python
_SCALARS = {bool: ("true/false", lambda v: isinstance(v, bool)),
            int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
            float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
            str: ("a string", lambda v: isinstance(v, str))}


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return `value` coerced to `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]  # Optional[X]: None or an X
        return None if value is None else _check_type(value, args[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        # a named table is addressed by its name, as --set addresses it: sources.NAME.key
        return [_check_type(v, item_tp, f"{key}.{v['name']}" if isinstance(v, dict) and isinstance(v.get("name"), str)
                            and v["name"] else f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return _from_dict(tp, value, key)
    if tp in _SCALARS:
        what, ok = _SCALARS[tp]
        if not ok(value):
            raise ConfigError(f"{key}: expected {what}, got {value!r}")
        return float(value) if tp is float else value  # an integer is a fine float: 1 -> 1.0
    raise ConfigError(f"{key}: unsupported type {tp}")  # a bug in this file, not in the TOML


# keys that were once part of the schema: a TOML that sets one is told why it went; a checkpoint that stored
# one (config_from_dict) loads without it
RETIRED = {"model.det_head": "detection is always Faster R-CNN; delete the line"}
# Sections of a config file that a tool reads with its own schema (a Config subclass), not the stages: one file
# can describe the runs and the table made of them (configs/ablate.toml). The other commands, and a checkpoint's
# stored config (config_from_dict), read past them.
TOOL_SECTIONS = ("ablate",)  # python cli.py ablate: tools/ablate_config.py


def _without_tool_sections(data: dict, schema: type) -> dict:
    fields = {f.name for f in dataclasses.fields(schema)}
    return {k: v for k, v in data.items() if k not in TOOL_SECTIONS or k in fields}


def _from_dict(cls, data: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        if key in RETIRED:
            raise ConfigError(f"{key}: no longer a key ({RETIRED[key]})")
        if cls is SourceConfig and unknown[0] in {f.name for f in dataclasses.fields(TransferDatasetConfig)}:
            raise ConfigError(f"{key}: a [[transfer.datasets]] key; a [[sources]] entry does not take it")
        raise ConfigError(f"unknown key {key} (known keys: {', '.join(sorted(names))})")
    kwargs = {k: _check_type(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


# ----------------------------------------------------------------------------
# --set overrides and loading

def apply_override(data: dict, text: str) -> None:
    """Apply one `a.b=value` to the raw TOML dict. `sources.NAME.key` addresses a source by name."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. expand.steps=50")
    key, raw = text.split("=", 1)
    try:  # TOML literal first (numbers, booleans, lists, quoted strings) ...
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # ... else a bare string such as expand.out=runs/x
    path = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):  # a list of named tables: pick by name
            match = [t for t in node if t.get("name") == part]
            if not match:
                raise ConfigError(f"--set {text}: no entry named {part!r} under {'.'.join(path[:i])}")
            node = match[0]
        else:
            node = node.setdefault(part, [] if part in ("sources", "datasets") else {})
    if isinstance(node, list):
        raise ConfigError(f"--set {text}: address a source as sources.NAME.key")
    node[path[-1]] = value


def load_config(path: str | Path | None, overrides: tuple[str, ...] | list[str] = (), schema: type = Config,
                section_check=None) -> Config:
    """Read a TOML file (or nothing: defaults), apply `--set` overrides, type-check, validate. `schema`: Config,
    or a tool's subclass of it that adds a TOOL_SECTIONS section, checked by `section_check(cfg)`."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: malformed TOML: {e}") from None
    for o in overrides:
        apply_override(data, o)
    try:
        cfg = _from_dict(schema, _without_tool_sections(data, schema), "")
        warnings = validate(cfg)
        if section_check is not None:
            section_check(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    for w in warnings:
        _warn(f"{path}: {w}" if path else w)
    resolve_data_paths(cfg)
    return cfg


def resolve_data_paths(cfg: Config) -> None:
    """Join every relative data path (PATH_KEYS) of every source and transfer dataset to `cfg.data_root`.

    Done once, when a TOML config loads: the resolved paths are what a run stores (config.json, the
    checkpoint), and config_from_dict reads them back as they are, so nothing is ever joined twice.
    Absolute paths, empty ones and every path of a config without data_root stay as written."""
    if not cfg.data_root:
        return
    root = os.path.expanduser(cfg.data_root)
    for s in cfg.sources + cfg.transfer.datasets:
        for key in PATH_KEYS:
            value = getattr(s, key)
            if value and not os.path.isabs(value):
                setattr(s, key, os.path.join(root, value))


_warned: set[str] = set()


def _warn(message: str) -> None:
    """One line on stderr, once per process, from rank 0 only (torchrun sets RANK; no torch import here)."""
    if message not in _warned and os.environ.get("RANK", "0") == "0":
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (a checkpoint's). Keys and types are checked, values
    are not: a checkpoint written before a rule was added (or by code that built its Config) must load. A tool's
    section (TOOL_SECTIONS: an ablation's run stores `ablate`) is left out."""
    return _from_dict(Config, _without_tool_sections(_as_schema_now(data), Config), "")


def _as_schema_now(data: dict) -> dict:
    """A stored config in today's schema: RETIRED keys dropped; and, from before [[sources]] and
    [[transfer.datasets]] had a schema each, the keys of the other one dropped from each entry."""
    out = {section: {k: v for k, v in entries.items() if f"{section}.{k}" not in RETIRED}
           if isinstance(entries, dict) else entries for section, entries in data.items()}
    own = {"sources": SourceConfig, "datasets": TransferDatasetConfig}
    shared = {f.name for cls in own.values() for f in dataclasses.fields(cls)}

    def entries(section: dict, key: str) -> None:
        keep = {f.name for f in dataclasses.fields(own[key])}
        if isinstance(section.get(key), list):
            section[key] = [{k: v for k, v in e.items() if k in keep or k not in shared} if isinstance(e, dict)
                            else e for e in section[key]]

    entries(out, "sources")
    if isinstance(out.get("transfer"), dict):
        entries(out["transfer"], "datasets")
    return out
