"""Does the README's demo table say what `make demo` printed? `make demo-check` fails when it does not.

    python scripts/check_demo_table.py README.md runs/demo/transfer/results.md [--warn]

The README's table is the fenced block after the line `<!-- demo-table -->`. Exit 1 (with both tables) when they
differ; with --warn, print the same and exit 0 (`make demo` itself: digits can move with the CPU's kernels).
"""
from __future__ import annotations

import sys
from pathlib import Path

MARK = "<!-- demo-table -->"


def readme_table(readme: str) -> str:
    lines = readme.splitlines()
    if MARK not in lines:
        raise SystemExit(f"Error: no line {MARK!r} before the demo table")
    start = lines.index(MARK) + 2  # the marker, the opening fence
    end = lines.index("```", start)
    return "\n".join(lines[start:end]).strip()


def main(argv: list[str]) -> int:
    warn = "--warn" in argv
    readme_path, results_path = [a for a in argv if a != "--warn"]
    expected = readme_table(Path(readme_path).read_text())
    printed = Path(results_path).read_text().strip()
    if expected == printed:
        print(f"{results_path}: the same table as {readme_path}")
        return 0
    print(f"{'warning' if warn else 'Error'}: {results_path} differs from the demo table in {readme_path}\n"
          f"README:\n{expected}\nprinted:\n{printed}\n(update the README's table with the command and threads it names, "
          "or find what changed the numbers)", file=sys.stderr)
    return 0 if warn else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
