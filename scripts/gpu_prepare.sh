#!/usr/bin/env bash
# Prepare, on this (CPU) machine, what a lent GPU machine lacks, in gpu/ (git-ignored; carry it with the call):
#   gpu/whl/      a pycocotools wheel for the device's Python (3.12 by default: PYVER=3.11 for another)
#   gpu/standin/  the stand-in world at --scale 0.5 (about 36 MB), for scripts/gpu_check.sh
# The ablation's world (70 MB) does not fit a call's 64 MiB: scripts/gpu_ablate.sh writes it there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PYVER=${PYVER:-3.12}
mkdir -p gpu/whl
ls gpu/whl/pycocotools-*.whl > /dev/null 2>&1 || $PY -m pip download -q --no-deps --only-binary=:all: \
  --python-version "$PYVER" --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d gpu/whl pycocotools
[ -f gpu/standin/.complete ] || $PY cli.py demo-data --world standin --out gpu/standin --scale 0.5 > /dev/null
du -sh --apparent-size gpu
