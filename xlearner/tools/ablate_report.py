"""The miniature's statistics and table: paired differences over seeds, 95% t-intervals, verdicts.

Every variant of ablate.py is trained and transferred once per seed, so two
variants are compared *paired*: for each seed s the difference
d_s = score_A(s) - score_B(s) of their per-task means, then

    mean d ± t_{0.975, n-1} * sd(d) / sqrt(n)          (Student's t, n seeds)

and a plain verdict: **win** (the interval lies above 0), **loss** (below 0),
**tie** (it contains 0 and lies within ±TIE_POINTS: any difference is too small
to matter), else **undecided** (it contains 0 but is too wide to call a tie:
more seeds or steps are needed). The table itself shows mean ± the same
t-interval half-width over seeds, per dataset and per task.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..run import dist
from ..config import primary_metric

TIE_POINTS = 2.0   # the issue's target CI half-width: a difference inside ±2 points counts as no difference
# Student's t, 97.5% quantile (two-sided 95%), for 1..30 degrees of freedom; beyond, the value for 30
# (slightly conservative). From any t table, e.g. NIST/SEMATECH e-Handbook §1.3.6.7.2.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)
# (claim, A, B): A - B per seed. The paper's claims, and the two the RL design rests on.
CLAIMS = (("X-Learner vs SSST", "xlearner", "ssst"),
          ("X-Learner vs MSST", "xlearner", "msst"),
          ("X-Learner vs MSMT (hard sharing)", "xlearner", "msmt"),
          ("X-Learner vs its teacher (Expand + RL, with RL)", "xlearner", "teacher_rl"),
          ("X-Learner vs Expand + RL at the same budget", "xlearner", "expand_rl"),
          ("X-Learner: new squeeze vs squeeze v1", "xlearner", "xlearner_v1"),
          ("X-Learner: chosen recipe vs previous recipe", "xlearner", "xlearner_prev"),
          ("Previous X-Learner vs MSMT (hard sharing)", "xlearner_prev", "msmt"),
          ("Previous X-Learner vs its teacher (with RL)", "xlearner_prev", "teacher_prev"),
          ("Squeeze v1 vs its teacher (with RL)", "xlearner_v1", "teacher_rl"),
          ("RL vs no RL, before squeeze", "expand_rl", "expand_norl"),
          ("RL vs no RL, after squeeze", "xlearner", "squeeze_norl"),
          ("Expand + RL: with RL vs branch alone", "expand_rl", "expand_rl_alone"))


def t_interval(values: list[float]) -> tuple[float, float | None]:
    """(mean, 95% t-interval half-width); the half-width is None for fewer than two values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T975[min(n - 1, len(T975)) - 1] * sd / math.sqrt(n)


def verdict(mean: float, half: float | None) -> str:
    if half is None:
        return "undecided"
    if mean - half > 0:
        return "win"
    if mean + half < 0:
        return "loss"
    return "tie" if abs(mean) + half <= TIE_POINTS else "undecided"


def task_means(cfg, scores: dict[int, dict[str, float]]) -> dict[str, dict[int, float]]:
    """Per-dataset and per-task-mean score of every seed: {row: {seed: score}}."""
    tasks = {d.name: d.task for d in cfg.transfer.datasets}
    rows = {d: {s: sc[d] for s, sc in scores.items()} for d in tasks}
    for task in ("cls", "det", "seg"):
        names = [d for d, t in tasks.items() if t == task]
        if names:
            rows[f"{task} mean"] = {s: sum(sc[d] for d in names) / len(names) for s, sc in scores.items()}
    return rows


def ratio(student: float, teacher: float) -> float:
    """student / teacher; NaN where the teacher scored 0 (a tiny run's AP), which has no ratio."""
    return student / teacher if teacher else float("nan")


def summarise(cfg, scores: dict[str, dict[int, dict[str, float]]], budgets: dict[str, int],
              ratios: dict | None = None, skipped: list[str] | None = None, teachers: dict | None = None) -> dict:
    """scores[variant][seed][dataset] -> the table (mean ± half-width), the claims, the squeeze ratios
    (upstream, `ratios`; downstream, each squeeze variant's score over its teacher's in `teachers`)."""
    per_row = {v: task_means(cfg, s) for v, s in scores.items()}
    row_names = list(next(iter(per_row.values())))
    rows = {r: {v: t_interval(list(per_row[v][r].values())) for v in scores} for r in row_names}
    transfer_ratios = {v: {r: t_interval([ratio(per_row[v][r][s], per_row[t][r][s]) for s in sorted(scores[v])])
                           for r in row_names if r.endswith(" mean")}
                       for v, t in (teachers or {}).items() if v in scores and t in scores}
    claims = []
    for claim, a, b in CLAIMS:
        if a not in scores or b not in scores:
            continue
        seeds = sorted(set(scores[a]) & set(scores[b]))
        for r in row_names:
            mean, half = t_interval([per_row[a][r][s] - per_row[b][r][s] for s in seeds])
            claims.append({"claim": claim, "a": a, "b": b, "row": r, "diff": mean, "half": half,
                           "verdict": verdict(mean, half), "n": len(seeds)})
    return {"variants": list(scores), "seeds": sorted(next(iter(scores.values()))), "budgets": budgets,
            "rows": rows, "claims": claims, "squeeze_ratios": ratios or {}, "transfer_ratios": transfer_ratios,
            "teachers": teachers or {}, "skipped_datasets": skipped or [], "scores": scores}


def squeeze_ratios(out: Path, seeds: list[int], cfg, variants) -> dict:
    """Upstream val metric of each squeeze variant's student and teacher, and student/teacher, over seeds."""
    result = {}
    for v in variants:
        per = {}
        for seed in seeds:
            m = json.loads((out / f"seed{seed}" / v / "metrics.json").read_text())
            for s in cfg.sources:
                k = primary_metric(s)
                st, te = m["student"][s.name][k], m["teacher"][s.name][k]
                per.setdefault(f"{s.name} {k}", []).append((st, te, st / te if te else float("nan")))
        result[v] = {key: {"student": t_interval([x[0] for x in vals]), "teacher": t_interval([x[1] for x in vals]),
                           "ratio": t_interval([x[2] for x in vals])} for key, vals in per.items()}
    return result


def _pm(mean: float, half: float | None) -> str:
    return f"{mean:.2f}" if half is None else f"{mean:.2f} ± {half:.2f}"


def to_markdown(summary: dict, labels: dict[str, str]) -> str:
    vs = summary["variants"]
    lines = ["| dataset | " + " | ".join(labels.get(v, v) for v in vs) + " |", "|" + "---|" * (len(vs) + 1),
             "| steps | " + " | ".join(str(summary["budgets"][v]) for v in vs) + " |"]
    for row, vals in summary["rows"].items():
        name = f"**{row}**" if row.endswith(" mean") else row
        lines.append(f"| {name} | " + " | ".join(_pm(*vals[v]) for v in vs) + " |")
    lines += ["", f"Mean ± 95% t-interval half-width over seeds {summary['seeds']}."]
    if summary["claims"]:  # the grid of squeeze recipes has none of the paper's claims
        lines += ["", verdict_table(summary), "", "Per dataset:", "", verdict_table(summary, per_dataset=True)]
    if summary["transfer_ratios"]:
        tasks = list(next(iter(summary["transfer_ratios"].values())))
        lines += ["", "Squeeze: downstream transfer, student / its teacher (with RL), per seed, then mean ± 95% "
                  "t-interval", "", "| student (teacher) | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
        for v, r in summary["transfer_ratios"].items():
            who = f"{labels.get(v, v)} ({labels.get(summary['teachers'][v], summary['teachers'][v])})"
            lines.append(f"| {who} | " + " | ".join(_pm(*r[t]) for t in tasks) + " |")
    for v, table in summary["squeeze_ratios"].items():
        lines += ["", f"Squeeze, {labels.get(v, v)}: upstream val metric, student vs teacher",
                  "| source metric | teacher | student | student/teacher |", "|---|---|---|---|"]
        for key, x in table.items():
            lines.append(f"| {key} | {_pm(*x['teacher'])} | {_pm(*x['student'])} | {_pm(*x['ratio'])} |")
    if summary["skipped_datasets"]:
        lines += ["", f"Skipped (files missing): {', '.join(summary['skipped_datasets'])}."]
    return "\n".join(lines) + "\n"


def verdict_table(summary: dict, per_dataset: bool = False) -> str:
    """Claims as rows, task means (or datasets) as columns: the paired difference (A - B) ± its 95%
    half-width, and the verdict."""
    tasks = [r for r in summary["rows"] if r.endswith(" mean") != per_dataset]
    cells: dict[str, dict[str, str]] = {}
    for c in summary["claims"]:
        if c["row"] in tasks:
            diff = "n/a" if c["half"] is None else f"{c['diff']:+.2f} ± {c['half']:.2f}"
            cells.setdefault(c["claim"], {})[c["row"]] = f"{diff} {c['verdict']}"
    names = tasks if per_dataset else [t[:-5] for t in tasks]
    lines = ["| claim (A − B, points) | " + " | ".join(names) + " |", "|" + "---|" * (len(tasks) + 1)]
    lines += [f"| {claim} | " + " | ".join(row[t] for t in tasks) + " |" for claim, row in cells.items()]
    return "\n".join(lines + ["", f"Paired over seeds; win / loss: the 95% interval lies above / below 0; tie: it "
                               f"lies within ±{TIE_POINTS:g} points; undecided: neither."])


def plot_chart(summary: dict, labels: dict[str, str], path: Path) -> bool:
    """A bar chart of every row, error bars the 95% t-interval; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        dist.log("[ablate] matplotlib not installed (pip install .[plots]): ablation.png skipped")
        return False
    rows, vs = list(summary["rows"]), summary["variants"]
    fig, ax = plt.subplots(figsize=(max(7, 1.4 * len(rows)), 4.5))
    width = 0.85 / len(vs)
    for i, v in enumerate(vs):
        vals = [summary["rows"][r][v] for r in rows]
        ax.bar([j + i * width for j in range(len(rows))], [m for m, _ in vals], width,
               yerr=[h or 0 for _, h in vals], label=labels.get(v, v), capsize=2)
    ax.set_xticks([j + 0.425 - width / 2 for j in range(len(rows))], rows, rotation=20)
    ax.set_ylabel("score (%), 95% CI over seeds")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write(summary: dict, report_dir: Path, labels: dict[str, str]) -> str:
    """ablation.json, ablation.md and ablation.png under `report_dir`; returns the markdown."""
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "ablation.json").write_text(json.dumps({**summary, "labels": labels}, indent=2))
    md = to_markdown(summary, labels)
    (report_dir / "ablation.md").write_text(md)
    plot_chart(summary, labels, report_dir / "ablation.png")
    dist.log("\n" + md)
    return md


def margin_rule(summary: dict, tasks_of: dict[str, str], recipes: list[str], bar: str = "msmt", band: float = 0.5,
                ratio_band: float = 0.01) -> dict:
    """Issue 28's selection rule (docs/ablation/README.md) on a summary (ablation.json): each recipe's margin over
    `bar` per task (the mean over seeds of recipe - bar, task means of the datasets in `tasks_of`), their min,
    and its student / teacher ratios. The winner: the largest min margin; within `band` points of the best, the
    largest min ratio; within `ratio_band` of that, the largest mean margin. {"table": {recipe: ...}, "winner"}."""
    def task_mean(v, seed, task):
        names = [d for d, t in tasks_of.items() if t == task]
        return sum(summary["scores"][v][seed][d] for d in names) / len(names)

    tasks = sorted(set(tasks_of.values()), key=("cls", "det", "seg").index)
    seeds = list(summary["scores"][bar])
    table = {}
    for r in recipes:
        m = {t: sum(task_mean(r, s, t) - task_mean(bar, s, t) for s in seeds) / len(seeds) for t in tasks}
        ratio = {t: summary["transfer_ratios"][r][f"{t} mean"][0] for t in tasks} if r in summary["transfer_ratios"] else {}
        table[r] = {"margin": m, "min_margin": min(m.values()), "mean_margin": sum(m.values()) / len(m),
                    "ratio": ratio, "min_ratio": min(ratio.values()) if ratio else float("nan")}
    best = max(v["min_margin"] for v in table.values())
    tied = [r for r in recipes if table[r]["min_margin"] >= best - band]
    top_ratio = max(table[r]["min_ratio"] for r in tied)
    tied = [r for r in tied if table[r]["min_ratio"] >= top_ratio - ratio_band]
    return {"table": table, "winner": max(tied, key=lambda r: table[r]["mean_margin"])}
