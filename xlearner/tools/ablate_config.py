"""The ablation's own configuration: the `[ablate]` section of configs/ablate.toml (no torch).

`python cli.py ablate` reads one TOML file that describes the runs (config.py's Config: model, sources,
expand, squeeze, transfer) and how the table is made of them (AblateConfig below: seeds, columns, the
budget's split, the jobs). The method's own modules never see this section: the ablation's config is
`AblationConfig`, a Config with `ablate` added, and the other commands skip the section when they read
such a file (configfile.TOOL_SECTIONS). Its checks run at load time, like the core's, naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, check, check_seeds, one_of
from ..configfile import load_config

# The variants' one list of names (tools/ablate.py's VARIANTS registry is built against it)
VARIANT_NAMES = ("ssst", "msst", "msmt", "teacher_rl", "teacher_norl", "expand_rl", "expand_rl_alone",
                 "expand_norl", "xlearner", "xlearner_v1", "squeeze_norl", "sq_v1", "sq_all", "sq_all_det",
                 "sq_all_copy", "sq_all_lr1",
                 # the second grid (tools/ablate.py's GRID2): teachers gt_<branches>_<squeeze steps>, squeezes
                 # gx_<branches>_<student init>_<squeeze steps>
                 *(f"gt_{b}_{n}" for b in ("ind", "sh") for n in (240, 120, 360)),
                 *(f"gx_{b}_{st}_{n}" for b, st in (("ind", "cls"), ("sh", "cls"), ("sh", "mean"))
                   for n in (240, 120, 360)),
                 "teacher_prev", "xlearner_prev")


@dataclass
class AblateConfig:
    """`python cli.py ablate`, the paper's comparison in miniature. `variants` are the table's columns
    (tools/ablate.py's VARIANTS); the runs a variant starts from are trained whether listed or not."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    variants: list[str] = field(default_factory=lambda: [
        "ssst", "msst", "msmt", "teacher_rl", "xlearner", "xlearner_v1", "expand_rl", "expand_rl_alone", "expand_norl",
        "squeeze_norl"])
    ssst_source: str = ""               # the single source of SSST; default: the first cls source
    jobs: int = 1                       # processes sharing the runs (each takes cpu_count / jobs threads)
    squeeze_steps: int = 0              # the split of the budget expand.steps + squeeze.steps: X-Learner's squeeze
                                        # gets this many steps and its teacher the rest (0 = squeeze.steps as set)
    optional_datasets: list[str] = field(default_factory=list)  # skipped, saying why, if their files are missing
    out: str = "runs/ablate"


@dataclass
class AblationConfig(Config):
    """A run's Config plus the `[ablate]` section: what `python cli.py ablate` reads. A variant's runs get a
    copy of it, so their config.json and checkpoints store the section as well (the core reads past it)."""
    ablate: AblateConfig = field(default_factory=AblateConfig)


def validate_ablate(cfg: AblationConfig) -> None:
    """Raise ConfigError naming the first bad `ablate.*` key."""
    ab = cfg.ablate
    check_seeds(ab.seeds, "ablate.seeds")
    for v in ab.variants:
        one_of(v, "ablate.variants", VARIANT_NAMES)
    cls = [s.name for s in cfg.sources if s.task == "cls"]
    check(not ab.ssst_source or ab.ssst_source in cls, "ablate.ssst_source", f"must name a cls source {cls}",
          ab.ssst_source)
    check(bool(ab.out), "ablate.out", "needs a directory", ab.out)
    check(ab.jobs >= 1, "ablate.jobs", "must be >= 1", ab.jobs)
    total = cfg.expand.steps + cfg.squeeze.steps
    check(0 <= ab.squeeze_steps < total, "ablate.squeeze_steps", f"must be in [0, {total}) (0 = squeeze.steps; "
          f"the teacher gets the rest of expand.steps + squeeze.steps = {total})", ab.squeeze_steps)
    datasets = [x.name for x in cfg.transfer.datasets]
    for d in ab.optional_datasets:
        check(d in datasets, "ablate.optional_datasets", f"must name transfer datasets {datasets}", d)


def load_ablation_config(path: str | Path | None, overrides: tuple[str, ...] | list[str] = ()) -> AblationConfig:
    """configfile.load_config with the `[ablate]` section read and checked too."""
    return load_config(path, overrides, schema=AblationConfig, section_check=validate_ablate)
