"""The paper's central comparison, in miniature: does learning across sources and tasks help?

Every variant is trained on the same data budget (the same steps and the same
per-source batch sizes, so the same number of images per source it uses) and
then transferred to the same downstream datasets, for several seeds:

    ssst          one backbone, one cls source (single-source single-task)
    ssmt          one shared backbone with every head (hard sharing)
    expand_norl   task-specific backbones, no reconciliation (reconcile = "none")
    expand_rl     task-specific backbones + reconciliation layers (the config's reconcile)
    xlearner      expand_rl, then squeeze: X-Learner
    squeeze_norl  expand_norl, then squeeze: what the RL adds after condensing

Expanded variants are transferred with the branch that matches each downstream
task (cls branch for cls datasets, ...). The output (`ablation.md`,
`ablation.json`, and `ablation.png` if matplotlib is installed) has datasets as
rows, variants as columns (mean ± std over seeds), per-task means, and each
variant's gain over SSST in points.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import dist, expand, squeeze, transfer
from ..config import Config, ConfigError
from ..results import mean_std


@dataclass
class Variant:
    stage: str                                   # expand | squeeze
    model: dict = field(default_factory=dict)    # ModelConfig changes (expand)
    teacher: str = ""                            # squeeze: which expand variant teaches
    branch_per_task: bool = False                # transfer with the branch matching the task


VARIANTS = {
    "ssst": Variant("expand", {"tasks": ["cls"], "reconcile": "none"}),
    "ssmt": Variant("expand", {"shared_backbone": True, "reconcile": "none"}),
    "expand_norl": Variant("expand", {"reconcile": "none"}, branch_per_task=True),
    "expand_rl": Variant("expand", {}, branch_per_task=True),
    "xlearner": Variant("squeeze", teacher="expand_rl"),
    "squeeze_norl": Variant("squeeze", teacher="expand_norl"),
}
LABELS = {"ssst": "SSST", "ssmt": "SSMT (hard sharing)", "expand_norl": "Expand, no RL", "expand_rl": "Expand + RL",
          "xlearner": "X-Learner (expand+RL, squeeze)", "squeeze_norl": "Squeeze of no-RL expand"}


def quick(cfg: Config) -> Config:
    """Smoke-test sizes: a handful of steps, one transfer epoch, two seeds."""
    cfg = copy.deepcopy(cfg)
    for tc in (cfg.expand, cfg.squeeze):
        tc.steps, tc.warmup_steps, tc.eval_every, tc.ckpt_every, tc.log_every = 4, 1, 0, 100, 2
    cfg.transfer.epochs = 1
    cfg.ablate.seeds = cfg.ablate.seeds[:2]
    return cfg


def variant_config(cfg: Config, name: str, seed: int, out: Path) -> Config:
    v = VARIANTS[name]
    c = copy.deepcopy(cfg)
    c.expand.seed = c.squeeze.seed = seed
    c.expand.out = str(out / f"seed{seed}" / name)
    c.squeeze.out = str(out / f"seed{seed}" / name)
    if v.stage == "expand":
        for k, val in v.model.items():
            setattr(c.model, k, val)
        if name == "ssst":
            cls_sources = [s for s in c.sources if s.task == "cls"]
            pick = cfg.ablate.ssst_source or (cls_sources[0].name if cls_sources else "")
            c.sources = [s for s in c.sources if s.name == pick]
            if not c.sources:
                raise ConfigError(f"ablate.ssst_source: no cls source named {pick!r}")
    return c


def train_variant(cfg: Config, name: str, seed: int, out: Path) -> Path:
    """Train one variant (resuming if its run dir has a checkpoint); returns its checkpoint."""
    c = variant_config(cfg, name, seed, out)
    v = VARIANTS[name]
    dist.log(f"[ablate] seed {seed}: {name} ({v.stage})")
    if v.stage == "expand":
        return expand.run(c)
    teacher = out / f"seed{seed}" / v.teacher / "checkpoint.pt"
    squeeze.run(c, teacher)
    return Path(c.squeeze.out) / "checkpoint.pt"


def transfer_variant(cfg: Config, name: str, ckpt: Path, seed: int, out: Path) -> dict[str, float]:
    """{downstream dataset: primary metric} for one trained variant and seed."""
    scores = {}
    tasks = sorted({d.task for d in cfg.transfer.datasets})
    for task in tasks:
        c = copy.deepcopy(cfg)
        c.transfer.datasets = [d for d in cfg.transfer.datasets if d.task == task]
        c.transfer.seeds = [seed]
        v = VARIANTS[name]
        branch = task if v.branch_per_task else ("cls" if name == "ssst" else None)
        res = transfer.run(c, [str(ckpt)], [name], branch, str(out / f"seed{seed}" / "transfer" / f"{name}-{task}"))
        for d in c.transfer.datasets:
            scores[d.name] = res["results"][d.name][name]["mean"]
    return scores


def summarise(cfg: Config, scores: dict[str, dict[int, dict[str, float]]]) -> dict:
    """scores[variant][seed][dataset] -> per dataset and per task mean ± std, and gains over the first variant."""
    variants = list(scores)
    tasks = {d.name: d.task for d in cfg.transfer.datasets}
    rows = {}
    for d in tasks:
        rows[d] = {v: mean_std([scores[v][s][d] for s in scores[v]]) for v in variants}
    for task in ("cls", "det", "seg"):
        names = [d for d, t in tasks.items() if t == task]
        if names:  # per-seed task mean first, then mean ± std over seeds
            rows[f"{task} mean"] = {v: mean_std([sum(scores[v][s][d] for d in names) / len(names) for s in scores[v]])
                                    for v in variants}
    return {"variants": variants, "seeds": sorted(next(iter(scores.values()))), "rows": rows, "scores": scores}


def to_markdown(summary: dict) -> str:
    variants, base = summary["variants"], summary["variants"][0]
    head = ["dataset", *[LABELS.get(v, v) for v in variants], *[f"{v} − {base}" for v in variants[1:]]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, vals in summary["rows"].items():
        cells = [f"{vals[v][0]:.2f} ± {vals[v][1]:.2f}" for v in variants]
        gains = [f"{vals[v][0] - vals[base][0]:+.2f}" for v in variants[1:]]
        name = f"**{row}**" if row.endswith(" mean") else row
        lines.append("| " + " | ".join([name, *cells, *gains]) + " |")
    return "\n".join(lines) + f"\n\nmean ± std over seeds {summary['seeds']}; gains in points over {LABELS.get(base, base)}.\n"


def plot(summary: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        dist.log("[ablate] matplotlib not installed (pip install .[plots]): ablation.png skipped")
        return False
    rows, variants = list(summary["rows"]), summary["variants"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        means = [summary["rows"][r][v][0] for r in rows]
        stds = [summary["rows"][r][v][1] for r in rows]
        ax.bar([j + i * width for j in range(len(rows))], means, width, yerr=stds, label=LABELS.get(v, v), capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], rows, rotation=20)
    ax.set_ylabel("score (%)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def run(cfg: Config, report_dir: Path | None = None, quick_mode: bool = False, n_seeds: int | None = None) -> dict:
    """Train and transfer every variant for every seed under `ablate.out`; write the table to `report_dir`."""
    out = Path(cfg.ablate.out)
    report_dir = Path(report_dir or out)
    if quick_mode:
        cfg = quick(cfg)
    if n_seeds:
        cfg.ablate.seeds = list(range(n_seeds))
    unknown = [v for v in cfg.ablate.variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"ablate.variants: unknown {unknown} (choose from {list(VARIANTS)})")
    # Squeeze variants need their teacher, so train in registry order.
    variants = [v for v in VARIANTS if v in cfg.ablate.variants or
                any(VARIANTS[w].teacher == v for w in cfg.ablate.variants)]
    scores: dict[str, dict[int, dict[str, float]]] = {v: {} for v in cfg.ablate.variants}
    for seed in cfg.ablate.seeds:
        for v in variants:
            ckpt = train_variant(cfg, v, seed, out)
            if v in scores:
                scores[v][seed] = transfer_variant(cfg, v, ckpt, seed, out)
    summary = summarise(cfg, scores)
    if dist.is_main_process():
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / "ablation.json").write_text(json.dumps(summary, indent=2))
        md = to_markdown(summary)
        (report_dir / "ablation.md").write_text(md)
        plot(summary, report_dir / "ablation.png")
        dist.log("\n" + md)
        dist.log(f"[ablate] wrote {report_dir / 'ablation.md'} and ablation.json (runs in {out})")
    return summary
