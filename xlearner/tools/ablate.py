"""The paper's central comparison, in miniature: does learning across sources and tasks help?

Every variant gets the same budget: expand.steps + squeeze.steps optimiser
steps, each step one batch of the same size from every source it uses. X-Learner
spends it as expand + RL (the teacher), then squeeze; the others spend it all
on training one model:

    ssst             one backbone, one cls source (single-source single-task)
    msst             one backbone, every cls source (multi-source single-task)
    msmt             one shared backbone with every head and source (hard sharing)
    teacher_rl       expand + RL for expand.steps: X-Learner's teacher, itself half the budget
    xlearner         teacher_rl, then squeeze for squeeze.steps ([squeeze] as configured): X-Learner
    xlearner_v1      the same with the first squeeze recipe (SQUEEZE_V1), so the change is measured
    expand_rl        teacher_rl trained on for squeeze.steps (a fresh warmup + cosine) instead of squeezed
    expand_rl_alone  expand_rl's branches transferred without their RL inputs (a second row, not a run)
    teacher_norl, expand_norl, squeeze_norl   the same three without RL (reconcile = "none")
    sq_*             the squeeze recipes of the selection grid (GRID; docs/ablation/README.md)

The paper's ladder is SSST -> MSST -> MSMT -> X-Learner. (The paper's SSMT, one
source labelled for several tasks, has no counterpart here: no demo source
carries two tasks' labels.)
Expanded variants are transferred as they were trained: the branch that
matches each downstream task *with* its RL inputs (model.BranchWithRL).
ssst, msst and msmt start from scratch with one warmup + cosine over the whole budget;
the expanded variants all share their first expand.steps with X-Learner's
teacher, so each comparison with X-Learner asks what the last squeeze.steps are
best spent on. Runs and transfers resume: a finished run (its metrics.json at
its last step) and a finished transfer (scores.json) are reused, a killed one
resumes from its checkpoint or transfer records, so the table can be built
across several sittings. `ablate.jobs` processes share the work, a seed at a
time. The statistics and the table are ablate_report.py's.
"""
from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .. import data, expand, probe, squeeze, transfer

from ..run import dist, preempt
from ..config import ConfigError, Registry
from ..formats.files import DataError
from . import ablate_report
from .ablate_config import VARIANT_NAMES, AblationConfig


@dataclass
class Variant:
    stage: str = "expand"                        # expand | squeeze | none (another run, transferred differently)
    model: dict = field(default_factory=dict)    # ModelConfig changes (expand)
    squeeze: dict = field(default_factory=dict)  # SqueezeConfig changes (squeeze)
    sources: str = "all"                         # all | cls (every cls source) | ssst (ablate.ssst_source)
    budget: str = "both"                         # steps: "expand", "squeeze" or "both" (expand + squeeze)
    init: str = ""                               # expand: start from this variant's final weights
    teacher: str = ""                            # squeeze: which expand variant teaches
    run: str = ""                                # stage "none": whose checkpoint to transfer
    transfer: str = "backbone"                   # backbone | branch (per task, alone) | branch+rl (per task, with RL)
    label: str = ""
    squeeze_share: float = 0.0                   # the budget's split: the squeeze's share of it (0 = ablate.squeeze_steps
                                                 # or squeeze.steps); the teacher gets the rest (steps_of)


NORL = {"reconcile": "none"}
# The first squeeze recipe (before docs/ablation's selection): own-task targets, init from the cls branch.
SQUEEZE_V1 = {"distill_targets": "own", "teacher_norm": "none", "distill_loss": "l2", "distill_stages": [2, 3, 4],
              "heads": "copy", "student_init": "task:cls", "lr": 0.001, "lambda_task": 1.0, "lambda_feat": 1.0,
              "lambda_kd": 1.0, "kd_temperature": 4.0}
# Every branch on every image (UNIC / AM-RADIO), standardised targets, heads that cannot carry the task.
SQUEEZE_ALL = {"distill_targets": "all", "teacher_norm": "standardize", "distill_loss": "cos_smoothl1",
               "distill_stages": [1, 2, 3, 4], "heads": "frozen", "student_init": "task:cls", "lr": 0.003}
# The selection grid: recipes squeezed from the same teachers, judged on dev splits (docs/ablation/README.md).
GRID = {"sq_v1": SQUEEZE_V1, "sq_all": SQUEEZE_ALL,
        "sq_all_det": {**SQUEEZE_ALL, "student_init": "task:det"},
        "sq_all_copy": {**SQUEEZE_ALL, "heads": "copy"},
        "sq_all_lr1": {**SQUEEZE_ALL, "lr": 0.001}}


def _squeeze_of(teacher: str, label: str, recipe: dict | None = None, squeeze_share: float = 0.0) -> Variant:
    return Variant(stage="squeeze", budget="squeeze", teacher=teacher, squeeze=recipe or {}, label=label,
                   squeeze_share=squeeze_share)


# The second grid (issue 28, docs/ablation/README.md): where the branches start x what the student starts from x
# the split of the 480 steps, each X-Learner squeezed with [squeeze] as configured from its own teacher.
# A name reads g{t|x}_{branch init}[_{student init}]_{squeeze steps of the 480}; "mean" needs branches that share
# their start. The split is a share of the budget, so that --quick's 8 steps keep it.
SQUEEZE_SHARES = {240: 0.5, 120: 0.25, 360: 0.75}        # squeeze steps of 480: the squeeze's share; the teacher gets the rest
BRANCH_INIT_NAMES = {"ind": "independent", "sh": "shared"}
STUDENT_INITS = {"cls": "task:cls", "mean": "mean"}
GRID2_RECIPES = (("ind", "cls"), ("sh", "cls"), ("sh", "mean"))
GRID2 = {f"gt_{b}_{n}": Variant(model={"branch_init": init}, budget="expand", transfer="branch+rl",
                                squeeze_share=share, label=f"teacher, {init} branches, {n} squeeze steps")
         for b, init in BRANCH_INIT_NAMES.items() for n, share in SQUEEZE_SHARES.items()}
GRID2.update({f"gx_{b}_{st}_{n}": _squeeze_of(f"gt_{b}_{n}", f"X-Learner, {BRANCH_INIT_NAMES[b]} branches, init "
                                              f"{STUDENT_INITS[st]}, {n} squeeze steps",
                                              {"student_init": STUDENT_INITS[st]}, share)
              for b, st in GRID2_RECIPES for n, share in SQUEEZE_SHARES.items()})


VARIANTS = Registry("ablate.variants", VARIANT_NAMES, **{
    "ssst": Variant(model={"tasks": ["cls"], "reconcile": "none"}, sources="ssst", label="SSST"),
    "msst": Variant(model={"tasks": ["cls"], "reconcile": "none"}, sources="cls", label="MSST"),
    "msmt": Variant(model={"shared_backbone": True, "reconcile": "none"}, label="MSMT (hard sharing)"),
    "teacher_rl": Variant(budget="expand", transfer="branch+rl", label="X-Learner's teacher (expand + RL)"),
    "teacher_norl": Variant(model=NORL, budget="expand", transfer="branch", label="Expand, no RL (teacher)"),
    "expand_rl": Variant(budget="squeeze", init="teacher_rl", transfer="branch+rl", label="Expand + RL"),
    "expand_rl_alone": Variant(stage="none", run="expand_rl", transfer="branch", label="Expand + RL, branch alone"),
    "expand_norl": Variant(model=NORL, budget="squeeze", init="teacher_norl", transfer="branch",
                           label="Expand, no RL"),
    "xlearner": _squeeze_of("teacher_rl", "X-Learner"),
    "xlearner_v1": _squeeze_of("teacher_rl", "X-Learner, squeeze v1", SQUEEZE_V1),
    "squeeze_norl": _squeeze_of("teacher_norl", "Squeeze of no-RL"),
    **{name: _squeeze_of("teacher_rl", name, recipe) for name, recipe in GRID.items()},
    **GRID2,
    # The recipe before issue 28's grid (independent branches, the cls branch as the student, 240 + 240 steps),
    # kept as a row of the final table next to the chosen one.
    "teacher_prev": Variant(model={"branch_init": "independent"}, budget="expand", transfer="branch+rl",
                            squeeze_share=0.5, label="X-Learner's teacher, previous recipe"),
    "xlearner_prev": _squeeze_of("teacher_prev", "X-Learner, previous recipe", {"student_init": "task:cls"}, 0.5),
})
# Work units: each chain is trained in this order by one process (a variant after the one it starts from).
CHAINS = (("teacher_rl", "expand_rl", "xlearner", "xlearner_v1", "expand_rl_alone", *GRID),
          ("teacher_norl", "expand_norl", "squeeze_norl"), ("msmt",), ("msst",), ("ssst",),
          ("teacher_prev", "xlearner_prev"),
          *((f"gt_{b}_{n}", *(f"gx_{b}_{st}_{n}" for bb, st in GRID2_RECIPES if bb == b))
            for n in (120, 360, 240) for b in BRANCH_INIT_NAMES))  # the longest squeezes not last: the jobs end together


def quick(cfg: AblationConfig) -> AblationConfig:
    """Smoke-test sizes: a handful of steps, one transfer epoch, small downstream subsets, two seeds."""
    cfg = copy.deepcopy(cfg)
    total = cfg.expand.steps + cfg.squeeze.steps
    for tc in (cfg.expand, cfg.squeeze):
        tc.steps, tc.warmup_steps, tc.eval_every, tc.ckpt_every, tc.log_every = 4, 1, 0, 100, 2
    if cfg.ablate.squeeze_steps:  # the split, kept as a share of the 8 steps
        cfg.ablate.squeeze_steps = min(max(round(8 * cfg.ablate.squeeze_steps / total), 1), 7)
    cfg.transfer.epochs = 1
    for d in cfg.transfer.datasets:
        d.train_subset, d.val_subset = min(d.train_subset, 200), min(d.val_subset, 100)
    cfg.ablate.seeds = cfg.ablate.seeds[:2]
    return cfg


def steps_of(cfg: AblationConfig, v: Variant) -> int:
    """A variant's own optimiser steps. The budget is expand.steps + squeeze.steps; its split gives the squeeze
    (and a "trained on instead") v.squeeze_share of it, else ablate.squeeze_steps, else squeeze.steps; the
    teacher the rest."""
    total = cfg.expand.steps + cfg.squeeze.steps
    if v.squeeze_share:
        squeeze_steps = min(max(round(v.squeeze_share * total), 1), total - 1)
    else:
        squeeze_steps = cfg.ablate.squeeze_steps or cfg.squeeze.steps
    return {"expand": total - squeeze_steps, "squeeze": squeeze_steps, "both": total}[v.budget]


def budget(cfg: AblationConfig, name: str) -> int:
    """Optimiser steps of one variant, counting the runs it starts from (its teacher or init)."""
    v = VARIANTS[name]
    if v.stage == "none":
        return budget(cfg, v.run)
    before = v.init or v.teacher
    return steps_of(cfg, v) + (budget(cfg, before) if before else 0)


def variant_config(cfg: AblationConfig, name: str, seed: int, out: Path) -> AblationConfig:
    v = VARIANTS[name]
    c = copy.deepcopy(cfg)
    c.expand.seed = c.squeeze.seed = seed
    c.expand.out = c.squeeze.out = str(run_dir(out, seed, name))
    steps = steps_of(cfg, v)
    tc = c.squeeze if v.stage == "squeeze" else c.expand
    tc.steps, tc.warmup_steps = steps, min(tc.warmup_steps, steps - 1)
    for k, val in v.model.items():
        setattr(c.model, k, val)
    for k, val in v.squeeze.items():
        setattr(c.squeeze, k, val)
    cls_sources = [s for s in c.sources if s.task == "cls"]
    if v.sources == "cls":
        c.sources = cls_sources
    elif v.sources == "ssst":
        pick = cfg.ablate.ssst_source or (cls_sources[0].name if cls_sources else "")
        c.sources = [s for s in c.sources if s.name == pick]
        if not c.sources:
            raise ConfigError(f"ablate.ssst_source: no cls source named {pick!r}")
    return c


def run_dir(out: Path, seed: int, name: str) -> Path:
    v = VARIANTS[name]
    return out / f"seed{seed}" / (v.run if v.stage == "none" else name)


def finished(run: Path, steps: int) -> bool:
    """A run whose final evaluation is written (engine: metrics.json at its last step)."""
    try:
        return json.loads((run / "metrics.json").read_text()).get("step") == steps
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def train_variant(cfg: AblationConfig, name: str, seed: int, out: Path) -> Path:
    """Train one variant (skipped when finished, resumed from its checkpoint when killed); its checkpoint."""
    v = VARIANTS[name]
    c = variant_config(cfg, name, seed, out)
    ckpt = run_dir(out, seed, name) / "checkpoint.pt"
    if v.stage == "none":
        return ckpt
    steps = (c.squeeze if v.stage == "squeeze" else c.expand).steps
    if finished(ckpt.parent, steps):
        return ckpt
    dist.log(f"[ablate] seed {seed}: {name} ({v.stage}, {steps} steps)")
    if v.stage == "expand":
        init = run_dir(out, seed, v.init) / "checkpoint.pt" if v.init else None
        return expand.run(c, init=init)
    squeeze.run(c, run_dir(out, seed, v.teacher) / "checkpoint.pt")
    return ckpt


def transfer_variant(cfg: AblationConfig, name: str, ckpt: Path, seed: int, out: Path) -> dict[str, float]:
    """{downstream dataset: primary metric} of one trained variant and seed (reused from scores.json)."""
    where = out / f"seed{seed}" / "transfer" / name
    done = where / "scores.json"
    names = [d.name for d in cfg.transfer.datasets]
    if done.exists() and sorted(scores := json.loads(done.read_text())) == sorted(names):
        return scores
    v, scores = VARIANTS[name], {}
    for task in sorted({d.task for d in cfg.transfer.datasets}):
        c = copy.deepcopy(cfg)
        c.transfer.datasets = [d for d in cfg.transfer.datasets if d.task == task]
        c.transfer.seeds = [seed]
        branch = task if v.transfer != "backbone" else ("cls" if v.sources != "all" else None)
        res = transfer.run(c, [str(ckpt)], [name], branch, str(where / task), with_rl=v.transfer == "branch+rl")
        scores.update({d.name: res["results"][d.name][name]["mean"] for d in c.transfer.datasets})
    where.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(scores, indent=2))
    return scores


def run_chain(cfg: AblationConfig, chain: tuple[str, ...], seed: int, out: Path) -> None:
    """Train, then transfer, every variant of one chain for one seed (the wanted ones only)."""
    for name in chain:
        if name in needed(cfg.ablate.variants):
            ckpt = train_variant(cfg, name, seed, out)
            if name in cfg.ablate.variants:
                transfer_variant(cfg, name, ckpt, seed, out)


def needed(variants: list[str]) -> set[str]:
    """The variants to train: the wanted ones and every run they start from."""
    todo = set(variants)
    for name in variants:
        v = VARIANTS[name]
        for before in (v.init, v.teacher, v.run):
            if before:
                todo |= needed([before])
    return todo


def drop_missing_datasets(cfg: AblationConfig) -> list[str]:
    """Remove the `ablate.optional_datasets` whose files are not there, saying why; returns their names."""
    dropped = []
    for d in list(cfg.transfer.datasets):
        if d.name not in cfg.ablate.optional_datasets:
            continue
        try:
            probe.open_split(transfer.resolve(d, cfg.transfer), "val", train=False)
        except DataError as e:
            dist.log(f"[ablate] skipping downstream dataset {d.name}: its files are missing "
                     f"({str(e).splitlines()[-1].strip()})")
            cfg.transfer.datasets.remove(d)
            dropped.append(d.name)
    return dropped


def check_data_present(cfg: AblationConfig) -> None:
    """Open every split the table will read, in this process, before any worker starts: a missing folder is one
    DataError line naming it (the CLI's Error:), not a traceback from each worker."""
    for s in cfg.sources:
        for split in ("train", "val"):
            data.build_dataset(s, split, train=False)
    for d in cfg.transfer.datasets:
        for split in ("train", "val"):
            probe.open_split(transfer.resolve(d, cfg.transfer), split, train=False)


def take_units(units) -> Iterator[tuple]:
    """The queue's units up to its None sentinel (one per worker). A blocking get: get_nowait() raises
    queue.Empty whenever another process holds the queue's read lock, which once sent a worker home
    at the start and left the whole table to the other."""
    while (unit := units.get()) is not None:
        yield unit


def _worker(cfg: AblationConfig, units: mp.Queue, threads: int) -> None:
    """One of ablate.jobs processes: take (chain, seed) units until none is left."""
    import torch
    torch.set_num_threads(threads)
    preempt.die_with_parent(signal.SIGTERM)  # a parent killed outright stops its workers as a signal would
    try:
        for chain, seed in take_units(units):
            run_chain(cfg, chain, seed, Path(cfg.ablate.out))
    finally:  # also on a stop (SystemExit): a multiprocessing child skips atexit, where this would run
        preempt.kill_loader_workers()


def train_all(cfg: AblationConfig, jobs: int) -> None:
    """Every (chain, seed) unit, seed by seed, in `jobs` processes (1: in this one)."""
    units = [(chain, seed) for seed in cfg.ablate.seeds for chain in CHAINS
             if any(n in needed(cfg.ablate.variants) for n in chain)]
    if jobs <= 1:
        for chain, seed in units:
            run_chain(cfg, chain, seed, Path(cfg.ablate.out))
        return
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    for u in units + [None] * jobs:  # the units, then one sentinel per worker
        q.put(u)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    procs = [ctx.Process(target=_worker, args=(cfg, q, threads), name=f"ablate-{k}") for k in range(jobs)]
    for p in procs:
        p.start()
    stopped = []

    def forward(sig, frame):  # a signal to this process alone reaches the workers too; each checkpoints
        stopped.append(sig)
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, sig)

    handlers = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for p in procs:
            p.join()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if stopped:
        dist.log("[ablate] stopped by a signal; run the same command again to resume")
        raise SystemExit(128 + stopped[0])
    failed = [f"{p.name} exited {p.exitcode}" for p in procs if p.exitcode]
    if failed:
        raise RuntimeError(f"ablate: {', '.join(failed)}; re-run the same command to resume")


def run(cfg: AblationConfig, report_dir: Path | None = None, quick_mode: bool = False, n_seeds: int | None = None,
        jobs: int | None = None) -> dict:
    """Train and transfer every variant for every seed under `ablate.out`; write the table to `report_dir`."""
    out = Path(cfg.ablate.out)
    report_dir = Path(report_dir or out)
    cfg = quick(cfg) if quick_mode else copy.deepcopy(cfg)
    if n_seeds:
        cfg.ablate.seeds = list(range(n_seeds))
    for v in cfg.ablate.variants:  # validated at load; a config edited in code meets the same line here
        VARIANTS[v]
    skipped = drop_missing_datasets(cfg)
    check_data_present(cfg)
    train_all(cfg, jobs or cfg.ablate.jobs)
    scores = {v: {} for v in VARIANTS if v in cfg.ablate.variants}
    for seed in cfg.ablate.seeds:
        for v in scores:
            scores[v][seed] = transfer_variant(cfg, v, run_dir(out, seed, v) / "checkpoint.pt", seed, out)
    teachers = {v: VARIANTS[v].teacher for v in scores if VARIANTS[v].stage == "squeeze"}
    summary = ablate_report.summarise(cfg, scores, {v: budget(cfg, v) for v in scores},
                                      ablate_report.squeeze_ratios(out, cfg.ablate.seeds, cfg, teachers), skipped,
                                      teachers)
    if dist.is_main_process():
        ablate_report.write(summary, report_dir, {v: VARIANTS[v].label for v in scores})
        dist.log(f"[ablate] wrote {report_dir / 'ablation.md'} and ablation.json (runs in {out})")
    return summary
