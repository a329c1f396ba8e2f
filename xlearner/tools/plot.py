"""Training curves as a picture: `python cli.py plot RUN [RUN ...]` writes RUN/curves.png.

A tool around the method: after an expand or squeeze run (or an ablation's), it reads each
run's `log.jsonl` (engine.py: one JSON object per event, `start` / `train` / `eval` / `end`) and
draws, over steps, every run overlaid in its own colour:
- the total loss, and one panel per source with its losses (a squeeze logs its terms as
  "source/term" keys: one line style per term);
- the learning rate, the throughput (images/s) and the data-wait fraction of the step time;
- one panel per evaluation metric (`source metric`; lists such as per-class IoU are not drawn),
  a metric's majority-class baseline (`top1_majority`) dotted in the same panel.
The picture of all the runs goes to the first RUN's curves.png (or `out`). The panel titles are
stored in the PNG's text chunk `xlearner:panels` (JSON), so that a reader can tell what it holds.

matplotlib is an optional extra (`pip install .[plots]`): without it `plot_runs` raises PlotError,
which the command prints as one line.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

PANEL_KEY = "xlearner:panels"
# a squeeze's loss terms and an expand's plain per-source loss (""), each in its own line style
TERM_STYLES = {"": "-", "task": "-", "feat": "--", "kd": ":", "majority": ":"}
BASELINE = "_majority"  # evaluate.py's trivial baseline of a metric ("top1_majority"): drawn in the metric's panel
COLUMNS = 3


class PlotError(ValueError):
    """A run that cannot be drawn, or no matplotlib; the message names the file and the reason."""


def read_log(run: str | Path) -> dict:
    """One run's log: {"label", "sources", "train": [records], "eval": [records]} (steps in order)."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: not found (is {run} a run directory of expand or squeeze?)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PlotError(f"{path}:{n}: not a JSON line ({e})") from None
    start = next((r for r in records if r.get("event") == "start"), {})
    sources = [s["name"] for s in start.get("config", {}).get("sources", [])]
    train = [r for r in records if r.get("event") == "train"]
    if not train:
        raise PlotError(f"{path}: no train records yet (the first comes after expand.log_every steps)")
    return {"label": str(run), "sources": sources, "train": train,
            "eval": [r for r in records if r.get("event") == "eval"]}


def split_loss_key(key: str, sources: list[str]) -> tuple[str, str]:
    """(source, term) of a logged loss key: "coco" -> ("coco", ""), "coco/feat" -> ("coco", "feat").
    A source name may itself hold '/', so the names from the run's config decide where the term starts."""
    if key in sources:
        return key, ""
    owners = [s for s in sources if key.startswith(s + "/")]
    if owners:
        source = max(owners, key=len)
        return source, key[len(source) + 1:]
    source, _, term = key.rpartition("/")
    return (source, term) if source else (key, "")


def _series(runs: list[dict]) -> dict[str, list[tuple[str, str, list, list]]]:
    """{panel title: [(run label, line label, steps, values)]}, panels in drawing order."""
    panels: dict[str, list] = {"total loss": []}
    losses: dict[str, list] = {}
    for run in runs:
        steps = [r["step"] for r in run["train"]]
        panels["total loss"].append((run["label"], "", steps, [r["loss"] for r in run["train"]]))
        keys = list(dict.fromkeys(k for r in run["train"] for k in r.get("losses", {})))
        for key in keys:
            source, term = split_loss_key(key, run["sources"])
            points = [(r["step"], r["losses"][key]) for r in run["train"] if key in r.get("losses", {})]
            losses.setdefault(f"loss: {source}", []).append((run["label"], term, *map(list, zip(*points))))
    panels.update(losses)
    for title, field in (("learning rate", "lr"), ("images/s", "images_per_s"), ("data-wait (share of time)",
                                                                                 "data_wait")):
        panels[title] = [(run["label"], "", [r["step"] for r in run["train"] if field in r],
                          [r[field] for r in run["train"] if field in r]) for run in runs]
    for run in runs:
        for r in run["eval"]:
            for source, metrics in r.get("metrics", {}).items():
                for name, value in metrics.items():
                    if not isinstance(value, (int, float)) or isinstance(value, bool):
                        continue
                    base = name[:-len(BASELINE)]
                    if name.endswith(BASELINE) and base in metrics:
                        title, term = f"{source} {base}", "majority"
                    else:
                        title, term = f"{source} {name}", ""
                    _append_point(panels.setdefault(title, []), run["label"], term, r["step"], value)
    return panels


def _append_point(lines: list, run: str, term: str, step: int, value: float) -> None:
    for label, t, steps, values in lines:
        if (label, t) == (run, term):
            steps.append(step)
            values.append(value)
            return
    lines.append((run, term, [step], [value]))


def _figure_class():
    """matplotlib's Figure (no pyplot: no global state, no display backend), or PlotError saying how to get it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("plot needs matplotlib, an optional extra: pip install '.[plots]' "
                        "(or pip install matplotlib)") from None
    return Figure


def plot_runs(runs: list[str | Path], out: str | Path | None = None) -> Path:
    """Draw every run's curves into one picture; returns its path (default: the first run's curves.png)."""
    if not runs:
        raise PlotError("plot: name at least one run directory")
    Figure = _figure_class()
    logs = [read_log(r) for r in runs]
    panels = _series(logs)
    rows = math.ceil(len(panels) / COLUMNS)
    fig = Figure(figsize=(5 * COLUMNS, 3.2 * rows), dpi=100, layout="constrained")
    colours = {log["label"]: f"C{k % 10}" for k, log in enumerate(logs)}
    for k, (title, lines) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, COLUMNS, k + 1)
        for run, term, steps, values in lines:
            label = f"{run} {term}".strip() if len(logs) > 1 or term else run
            ax.plot(steps, values, TERM_STYLES.get(term, "-."), color=colours[run], label=label,
                    marker=("x" if term == "majority" else "o") if len(steps) == 1 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    path = Path(out) if out else Path(runs[0]) / "curves.png"
    fig.savefig(path, metadata={PANEL_KEY: json.dumps(list(panels))})
    return path
