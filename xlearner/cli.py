"""The command line: one click group, one subcommand per stage (docs/DESIGN.md §4).

    python cli.py demo-data --out data/demo
    python cli.py check-data --config configs/demo.toml
    torchrun --nproc_per_node=N cli.py expand --config C
    python cli.py squeeze --config C --teacher RUN/checkpoint.pt
    python cli.py transfer --config C --backbone P [--backbone P2 ...]
    python cli.py export --checkpoint RUN/checkpoint.pt --out backbone.pth [--branch cls]
    python cli.py bench {loader,expand,squeeze,transfer,backbone} --config C
    python cli.py ablate --config configs/ablate.toml
    python cli.py plot RUN [RUN ...]

Commands only parse options, load the config and call the stage's `run()`;
every engine takes objects, never this module's arguments. Expected failures
print one clear line, no traceback: exit 2 for a bad config (checked when it
loads, before torch is imported; also a resume whose config changes the
model, rundir.ResumeError), 1 for bad data, a bad checkpoint or a run
directory that cannot be used (a file, unwritable, locked by another run);
`--debug` (or XLEARNER_DEBUG=1) shows their traceback too.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from .config import ROOT_FORMATS, ConfigError
from .configfile import load_config  # no torch: a bad config is refused in a fraction of a second

SET_HELP = "Override a config key, e.g. --set expand.steps=50 (repeatable; sources.NAME.key for a source)."
# --debug or XLEARNER_DEBUG=1: show the traceback of expected errors too (set by main())
_debug = False


def _expected_errors() -> tuple[type[Exception], ...]:
    """The errors a user can fix, besides ConfigError. Anything else is a bug and keeps its traceback."""
    from .run.checkpoint import CheckpointError  # imports torch: only evaluated once a command has failed
    from .formats.files import DataError
    from .run.rundir import RunDirError
    from .tools.plot import PlotError
    return (CheckpointError, DataError, RunDirError, PlotError, FileNotFoundError)


def _load(config: str | None, sets: tuple[str, ...], out_key: str | None = None, out: str | None = None):
    overrides = list(sets)
    if out and out_key:
        overrides.append(f'{out_key}="{out}"')
    return load_config(config, overrides)


def _guard(fn):
    """Turn the errors a user can fix into one line on stderr, not a traceback: exit 2 for a
    config error (like click's own usage errors), 1 for bad data or a bad checkpoint."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            _fail(e, exit_code=2)
        except _expected_errors() as e:
            _fail(e, exit_code=1)
    return wrapper


def _fail(e: Exception, exit_code: int):
    if _debug:
        raise e
    error = click.ClickException(str(e))
    error.exit_code = exit_code
    raise error from None


def _preflight(cfg, stage: str, config: str) -> None:
    """What expand / squeeze would otherwise find late: a bad pretrained or student_init file when the
    model is built, a bad val split at the first evaluation (often the end of the run)."""
    from .data import build_dataset
    from .weights import check_weights
    init = cfg.squeeze.student_init
    try:
        if cfg.model.pretrained and stage == "expand":
            check_weights(cfg.model.pretrained, cfg.model.arch, "model.pretrained")
        if stage == "squeeze" and init not in ("", "mean", "scratch") and not init.startswith("task:"):
            check_weights(init, cfg.model.arch, "squeeze.student_init")
    except ConfigError as e:
        raise ConfigError(f"{config}: {e}") from None
    for s in cfg.sources:
        if s.val or s.format in ROOT_FORMATS:
            build_dataset(s, "val", train=False)  # DataError naming the source, the file and the reason


config_opt = click.option("--config", "config", type=click.Path(dir_okay=False), required=True,
                          help="TOML run config (see configs/).")
set_opt = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--debug", is_flag=True, envvar="XLEARNER_DEBUG",
              help="Show the Python traceback of expected errors too (or set XLEARNER_DEBUG=1).")
def main(debug):
    """X-Learner: learn one universal backbone across sources and tasks (expand -> squeeze -> transfer)."""
    global _debug
    _debug = debug


@main.command("demo-data")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Where to write it (default: data/WORLD).")
@click.option("--seed", default=0, help="Seed of the procedural generator (same seed = same bytes).")
@click.option("--scale", default=1.0, help="Multiplier on the number of images per split.")
@click.option("--downstream-scale", default=1.0,
              help="A further multiplier for the downstream (transfer) datasets only; the upstream bytes stay the "
                   "same (make paper-table writes data/ablate with 5).")
@click.option("--world", default="demo", type=click.Choice(["demo", "standin"]),
              help="demo: the small demo world; standin: configs/xlearner_r50.toml's six sources at full size "
                   "(JPEG; configs/standin.sets points the recipe at it).")
@click.option("--workers", default=2, help="Processes drawing the images (the bytes do not depend on it).")
@_guard
def demo_data(out, seed, scale, world, downstream_scale, workers):
    """Write the embedded demo world (shapes, textures, boxes, masks) in the real data formats."""
    from .tools.demo import generate
    out = out or f"data/{world}"
    summary = generate(out, seed=seed, scale=scale, world=world, downstream_scale=downstream_scale, workers=workers)
    click.echo(json.dumps(summary, indent=1))
    click.echo(f"demo world written to {out}")


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Where to write the imagefolder.")
@click.option("--root", default="/usr/share/openclipart/png", show_default=True, type=click.Path(file_okay=False),
              help="Debian's openclipart-png folder of categories.")
@_guard
def clipart(out, root):
    """A second real downstream set: openclipart-png's categories as a small class-stratified imagefolder."""
    from .tools.clipart import write_clipart
    counts = write_clipart(out, root)
    skipped = ", ".join(f"{n} {why}" for why, n in counts["skipped"].items()) or "none"
    click.echo(f"wrote {out}: {len(counts['classes'])} classes, {counts['train']} train / {counts['val']} val "
               f"images; skipped: {skipped}")


@main.command("check-data")
@config_opt
@set_opt
@_guard
def check_data_cmd(config, sets):
    """Validate every upstream source and transfer dataset of a config; list every problem; exit 1 if any."""
    from .formats import check_data
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
@click.option("--init", default=None, type=click.Path(dir_okay=False),
              help="Train on: start from the weights of RUN/checkpoint.pt of an expand run of the same model, with a "
                   "fresh optimiser and schedule, continuing its data stream (default: a fresh model).")
@_guard
def expand(config, sets, out, init):
    """Expansion stage: task-specific backbones + reconciliation layers (python or torchrun)."""
    cfg = _load(config, sets, "expand.out", out)  # before importing torch: a bad config fails at once
    from . import expand as stage
    from .run.dist import cleanup
    _preflight(cfg, "expand", config)
    try:
        stage.run(cfg, init=init)
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
    cfg = _load(config, sets, "squeeze.out", out)  # before importing torch: a bad config fails at once
    from . import squeeze as stage
    from .run.dist import cleanup
    _preflight(cfg, "squeeze", config)
    try:
        stage.run(cfg, teacher)
    finally:
        cleanup()


@main.command()
@config_opt
@set_opt
@click.option("--backbone", "backbones", multiple=True, required=True,
              help="A torchvision state_dict, a run checkpoint, a torchvision weights name, or 'random' (repeatable).")
@click.option("--name", "names", multiple=True, help="Column name for each --backbone, in order.")
@click.option("--branch", default=None, help="Which branch of an expand checkpoint to evaluate (default: first task).")
@click.option("--with-rl", is_flag=True, help="Expand checkpoints: the branch with its RL inputs from the other "
              "branches, as it was trained (default: the branch alone).")
@click.option("--out", default=None, help="Output directory (default: transfer.out).")
@_guard
def transfer(config, sets, backbones, names, branch, with_rl, out):
    """Transfer evaluation on [[transfer.datasets]]: writes results.json and results.md."""
    cfg = _load(config, sets, "transfer.out", out)  # before importing torch: a bad config fails at once
    from . import transfer as stage
    from .run.dist import cleanup
    if names and len(names) != len(backbones):
        raise click.UsageError(f"got {len(names)} --name for {len(backbones)} --backbone")
    try:
        stage.run(cfg, list(backbones), list(names) or None, branch, cfg.transfer.out, with_rl)
    finally:
        cleanup()


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="An expand or squeeze run checkpoint.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the torchvision state_dict.")
@click.option("--branch", default=None, help="Branch of an expand checkpoint (default: first task).")
@_guard
def export(checkpoint, out, branch):
    """Write a torchvision-format backbone state_dict (loads into torchvision.models.<arch>(), fc.* missing)."""
    from .run.checkpoint import CheckpointError, load_checkpoint, save_atomic
    from .weights import backbone_state_dict, model_from_checkpoint
    try:  # not a run checkpoint, or no such branch: the model says which, as a ValueError
        state = backbone_state_dict(model_from_checkpoint(load_checkpoint(checkpoint)), branch)
    except ValueError as e:
        raise CheckpointError(f"{checkpoint}: {e}") from None
    save_atomic(state, out)
    click.echo(f"wrote {out}")


@main.command()
@click.argument("what", type=click.Choice(["loader", "expand", "squeeze", "transfer", "backbone"]))
@config_opt
@set_opt
@click.option("--steps", default=20,
              help="Timed steps (loader: batches per source; not used by transfer, which times whole passes).")
@click.option("--teacher", default=None, help="bench squeeze: the teacher checkpoint (default: a fresh expanded model).")
@click.option("--backbone", default="random", help="bench transfer: the backbone to probe.")
@click.option("--out", default=None, help="Append the JSON line to this file as well.")
@_guard
def bench(what, config, sets, steps, teacher, backbone, out):
    """Measure a stage against its floor and print one JSON line with the ratio (docs/DESIGN.md §7)."""
    cfg = _load(config, sets)
    from .tools import bench as b
    if what == "loader":
        result = b.bench_loader(cfg, steps=steps)
    elif what == "transfer":
        result = b.bench_transfer(cfg, backbone)
    elif what == "backbone":
        result = b.bench_backbone(cfg, steps)
    else:
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
@click.option("--jobs", default=None, type=int, help="Processes sharing the runs (default: ablate.jobs).")
@_guard
def ablate(config, sets, out, quick, seeds, jobs):
    """Train and transfer SSST / MSST / MSMT / expand / X-Learner variants on one step budget (the paper's table)."""
    from .tools.ablate_config import load_ablation_config
    cfg = load_ablation_config(config, sets)
    from .tools.ablate import run
    run(cfg, Path(out) if out else None, quick_mode=quick, n_seeds=seeds, jobs=jobs)


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Where to write the PNG "
              "(default: the first RUN's curves.png).")
@_guard
def plot(runs, out):
    """Training curves of one or more runs (overlaid) from RUN/log.jsonl: losses, lr, throughput, metrics."""
    from .tools.plot import plot_runs
    click.echo(f"wrote {plot_runs(list(runs), out)}")


if __name__ == "__main__":
    main()
