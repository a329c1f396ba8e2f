"""The command line: one click group, one subcommand per stage (DESIGN.md §4).

    python cli.py demo-data --out data/demo
    python cli.py check-data --config configs/demo.toml
    torchrun --nproc_per_node=N cli.py expand --config C
    python cli.py squeeze --config C --teacher RUN/checkpoint.pt
    python cli.py transfer --config C --backbone P [--backbone P2 ...]
    python cli.py export --checkpoint RUN/checkpoint.pt --out backbone.pth [--branch cls]
    python cli.py bench {loader,expand,squeeze,transfer,backbone} --config C
    python cli.py ablate --config configs/ablate.toml

Commands only parse options, load the config and call the stage's `run()`;
every engine takes objects, never this module's arguments. Expected failures
(bad config, bad data, bad checkpoint) print one clear line and exit 1.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from .checkpoint import CheckpointError
from .config import ConfigError, load_config

SET_HELP = "Override a config key, e.g. --set expand.steps=50 (repeatable; sources.NAME.key for a source)."


def _expected_errors():
    from .data import DataError
    return (ConfigError, CheckpointError, DataError, FileNotFoundError)


def _load(config: str | None, sets: tuple[str, ...], out_key: str | None = None, out: str | None = None):
    overrides = list(sets)
    if out and out_key:
        overrides.append(f'{out_key}="{out}"')
    return load_config(config, overrides)


def _guard(fn):
    """Turn the errors a user can fix into one readable line (and exit 1), not a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _expected_errors() as e:
            raise click.ClickException(str(e)) from None
    return wrapper


config_opt = click.option("--config", "config", type=click.Path(dir_okay=False), required=True,
                          help="TOML run config (see configs/).")
set_opt = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main():
    """X-Learner: learn one universal backbone across sources and tasks (expand -> squeeze -> transfer)."""


@main.command("demo-data")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Where to write it (default: data/WORLD).")
@click.option("--seed", default=0, help="Seed of the procedural generator (same seed = same bytes).")
@click.option("--scale", default=1.0, help="Multiplier on the number of images per split.")
@click.option("--world", default="demo", type=click.Choice(["demo", "standin"]),
              help="demo: the small demo world; standin: configs/xlearner_r50.toml's six sources at full size "
                   "(JPEG; configs/standin.sets points the recipe at it).")
@_guard
def demo_data(out, seed, scale, world):
    """Write the embedded demo world (shapes, textures, boxes, masks) in the real data formats."""
    from .demo import generate
    out = out or f"data/{world}"
    summary = generate(out, seed=seed, scale=scale, world=world)
    click.echo(json.dumps(summary, indent=1))
    click.echo(f"demo world written to {out}")


@main.command("check-data")
@config_opt
@set_opt
@click.option("--out", default=None, help="Unused; accepted for uniformity with the other commands.")
@_guard
def check_data_cmd(config, sets, out):
    """Validate every upstream source and transfer dataset of a config; list every problem; exit 1 if any."""
    from .data import check_data
    cfg = _load(config, sets)
    problems = check_data(cfg.sources + cfg.transfer.datasets)
    for p in problems:
        click.echo(p)
    n = len(cfg.sources) + len(cfg.transfer.datasets)
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s) in {n} source(s)")
    click.echo(f"ok: {n} source(s) checked, no problems")


@main.command()
@config_opt
@set_opt
@click.option("--out", default=None, help="Run directory (default: expand.out). Re-running on it resumes.")
@_guard
def expand(config, sets, out):
    """Expansion stage: task-specific backbones + reconciliation layers (python or torchrun)."""
    from . import expand as stage
    from .dist import cleanup
    try:
        stage.run(_load(config, sets, "expand.out", out))
    finally:
        cleanup()


@main.command()
@config_opt
@set_opt
@click.option("--teacher", required=True, type=click.Path(dir_okay=False), help="RUN/checkpoint.pt of an expand run.")
@click.option("--out", default=None, help="Run directory (default: squeeze.out). Re-running on it resumes.")
@_guard
def squeeze(config, sets, teacher, out):
    """Squeeze stage: distil the expanded teacher into one standard backbone (python or torchrun)."""
    from . import squeeze as stage
    from .dist import cleanup
    try:
        stage.run(_load(config, sets, "squeeze.out", out), teacher)
    finally:
        cleanup()


@main.command()
@config_opt
@set_opt
@click.option("--backbone", "backbones", multiple=True, required=True,
              help="A torchvision state_dict, a run checkpoint, a torchvision weights name, or 'random' (repeatable).")
@click.option("--name", "names", multiple=True, help="Column name for each --backbone, in order.")
@click.option("--branch", default=None, help="Which branch of an expand checkpoint to evaluate (default: first task).")
@click.option("--out", default=None, help="Output directory (default: transfer.out).")
@_guard
def transfer(config, sets, backbones, names, branch, out):
    """Transfer evaluation on [[transfer.datasets]]: writes results.json and results.md."""
    from . import transfer as stage
    from .dist import cleanup
    cfg = _load(config, sets, "transfer.out", out)
    if names and len(names) != len(backbones):
        raise click.ClickException(f"got {len(names)} --name for {len(backbones)} --backbone")
    try:
        stage.run(cfg, list(backbones), list(names) or None, branch, cfg.transfer.out)
    finally:
        cleanup()


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="An expand or squeeze run checkpoint.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the torchvision state_dict.")
@click.option("--branch", default=None, help="Branch of an expand checkpoint (default: first task).")
@set_opt
@_guard
def export(checkpoint, out, branch, sets):
    """Write a torchvision-format backbone state_dict (loads into torchvision.models.<arch>(), fc.* missing)."""
    from .checkpoint import load_checkpoint, save_atomic
    from .model import backbone_state_dict, model_from_checkpoint
    model = model_from_checkpoint(load_checkpoint(checkpoint))
    save_atomic(backbone_state_dict(model, branch), out)
    click.echo(f"wrote {out}")


@main.command()
@click.argument("what", type=click.Choice(["loader", "expand", "squeeze", "transfer", "backbone"]))
@config_opt
@set_opt
@click.option("--steps", default=20, help="Timed steps (loader: batches per source).")
@click.option("--teacher", default=None, help="bench squeeze: the teacher checkpoint (default: a fresh expanded model).")
@click.option("--backbone", default="random", help="bench transfer: the backbone to probe.")
@click.option("--out", default=None, help="Append the JSON line to this file as well.")
@_guard
def bench(what, config, sets, steps, teacher, backbone, out):
    """Measure a stage against its floor and print one JSON line with the ratio (DESIGN.md §7)."""
    cfg = _load(config, sets)
    if what == "loader":
        from .bench import bench_loader
        result = bench_loader(cfg, steps=steps)
    elif what == "transfer":
        from .transfer import bench_transfer
        result = bench_transfer(cfg, backbone)
    elif what == "backbone":
        from .bench import bench_backbone
        result = bench_backbone(cfg, steps)
    else:
        from . import bench as b
        result = b.bench_expand(cfg, steps) if what == "expand" else b.bench_squeeze(cfg, steps, teacher)
    line = json.dumps(result)
    click.echo(line)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


@main.command()
@config_opt
@set_opt
@click.option("--out", default=None, help="Where to write ablation.md/json/png (default: ablate.out, where the runs go).")
@click.option("--quick", is_flag=True, help="Tiny sizes: a smoke test of every variant in a few minutes.")
@click.option("--seeds", default=None, type=int, help="Number of seeds (default: from the config).")
@_guard
def ablate(config, sets, out, quick, seeds):
    """Train and transfer SSST / SSMT / expand / X-Learner variants on one data budget (the paper's table)."""
    from .ablate import run
    run(_load(config, sets), Path(out) if out else None, quick_mode=quick, n_seeds=seeds)


if __name__ == "__main__":
    main()
