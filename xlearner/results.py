"""Transfer's bookkeeping: one record per finished result, and the results table.

A transfer suite (transfer.py) is many independent (backbone, dataset, seed)
results, each minutes to hours of work. Each one is written as soon as it is
finished, atomically, to <out>/records/<backbone>_<dataset>_<protocol>_seed<N>.json,
so a killed suite loses at most the result in progress and a re-run on the same
out computes only the rest. What a record's name depends on (the backbone's
hash and transfer.dataset_key) decides whether it can be reused.

The table is the shape of the paper's headline (docs/DESIGN.md §1, "Transfer"):
datasets as rows, backbones as columns (mean ± std over seeds), per-task means,
and each backbone's gain over the first; written as results.json and results.md.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .run import dist
from .config import TransferDatasetConfig


# ----------------------------------------------------------------------------
# records: one finished (backbone, dataset, seed)

def record_path(out: Path, backbone_hash: str, dataset_key: str, src: TransferDatasetConfig, seed: int) -> Path:
    """out/records/<backbone>_<dataset>_<protocol>_seed<N>.json: one finished (backbone, dataset, seed)."""
    protocol = src.protocol if src.task == "cls" else ("frozen" if src.freeze_backbone else "finetune")
    return out / "records" / f"{backbone_hash[:16]}_{dataset_key[:16]}_{protocol}_seed{seed}.json"


def read_record(path: Path) -> dict | None:
    """The result recorded at `path`, or None if there is none (or it is unusable: then it is computed again)."""
    try:
        return json.loads(path.read_text())["result"]
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, KeyError) as e:  # written atomically, so only a hand edit gets here
        dist.log(f"{path}: unusable result record ({e!r}); computing it again")
        return None


def write_record(path: Path, key: dict, result: dict) -> None:
    """Atomically (temp file + rename, rank 0): a killed suite never leaves a half-written record."""
    if not dist.is_main_process():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps({"key": key, "result": result}, indent=1, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------
# the results table

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for one seed)."""
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)


def write_results(results: dict, out: Path) -> None:
    """results.json and results.md under `out` (rank 0)."""
    if not dist.is_main_process():
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(results_markdown(results))


def _fmt(mean, std=0.0, n=1) -> str:
    if mean is None or math.isnan(mean):
        return "n/a"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def _gain(a, b) -> str:
    return "n/a" if a is None or b is None or math.isnan(a) or math.isnan(b) else f"{b - a:+.2f}"


def results_markdown(results: dict) -> str:
    """Datasets x backbones (mean ± std over seeds), per-task means, and each backbone's gain over the first."""
    names = [b["name"] for b in results["backbones"]]
    first, others = (names[0] if names else ""), names[1:]
    head = ["dataset", "metric", *names, *[f"{n} gain over {first}" for n in others]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_task: dict[str, dict[str, list[float]]] = {}
    for d in results["datasets"]:
        row = results["results"].get(d["name"], {})
        means = {n: row[n]["mean"] if n in row else None for n in names}
        cells = [_fmt(row[n]["mean"], row[n]["std"], len(row[n]["per_seed"])) if n in row else "" for n in names]
        lines.append("| " + " | ".join([d["name"], d["metric"], *cells,
                                        *[_gain(means[first], means[n]) for n in others]]) + " |")
        for n in names:
            if means[n] is not None:
                by_task.setdefault(d["task"], {}).setdefault(n, []).append(means[n])
    for task in ("cls", "det", "seg"):
        if task not in by_task:
            continue
        m = {n: (sum(v) / len(v) if (v := by_task[task].get(n)) else None) for n in names}
        lines.append("| " + " | ".join([f"**{task} mean**", "", *[_fmt(m[n]) if m[n] is not None else "" for n in names],
                                        *[_gain(m[first], m[n]) for n in others]]) + " |")
    return "\n".join(lines) + "\n"
