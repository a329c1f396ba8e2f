"""Copy the small files of every finished (seed, chain) of an ablation to a folder that git can hold, so that a
long table (docs/ablation/README.md, "Across sessions") resumes on another machine without the checkpoints.

    python scripts/pack_ablate_runs.py configs/ablate.toml runs/final docs/ablation/final/partial

Per run: metrics.json (its `finished` mark) and log.jsonl; per wanted variant: transfer's scores.json. A chain
is copied only when all of its runs and transfers are done: a later run of a chain starts from an earlier run's
checkpoint, which is not copied. Resume with `cp -r DEST/. RUNS/` and the same `ablate` command."""
import shutil
import sys
from pathlib import Path

from xlearner.tools import ablate
from xlearner.tools.ablate_config import load_ablation_config


def chain_files(cfg, runs: Path, seed: int, members: list[str]) -> list[Path] | None:
    """The small files of one finished (seed, chain); None if any of its runs or transfers is not done."""
    files = []
    for v in members:
        if ablate.VARIANTS[v].stage != "none":
            c = ablate.variant_config(cfg, v, seed, runs)
            steps = (c.squeeze if ablate.VARIANTS[v].stage == "squeeze" else c.expand).steps
            run = ablate.run_dir(runs, seed, v)
            if not ablate.finished(run, steps):
                return None
            files += [run / "metrics.json", run / "log.jsonl"]
        if v in cfg.ablate.variants:
            files.append(runs / f"seed{seed}" / "transfer" / v / "scores.json")
            if not files[-1].exists():
                return None
    return files


def main(config: str, runs: str, dest: str) -> None:
    cfg, runs, dest = load_ablation_config(config), Path(runs), Path(dest)
    need = ablate.needed(cfg.ablate.variants)
    for seed in cfg.ablate.seeds:
        for chain in ablate.CHAINS:
            members = [v for v in chain if v in need]
            files = chain_files(cfg, runs, seed, members) if members else None
            for f in files or []:
                if f.exists():
                    (dest / f.relative_to(runs)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, dest / f.relative_to(runs))
            if files:
                print(f"seed {seed}: {', '.join(members)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
