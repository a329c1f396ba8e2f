#!/usr/bin/env bash
# GPU check: expand-step throughput of 2 x ResNet-50 (cls 224 px + seg 256 px) with bf16 and
# channels_last, against its bare-torchvision floor. Prints one JSON line per run with
# images/s, the ratio (quality bar: <= 1.15) and peak memory. Under 5 minutes on one H100.
#   bash scripts/gpu_check.sh            (uses .venv if present, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)"
[ -f data/demo/.complete ] || $PY cli.py demo-data --out data/demo --scale 0.5
for bs in "64 32" "128 64"; do
  set -- $bs
  $PY cli.py bench expand --config configs/bench_r50.toml --steps 20 \
    --set expand.amp='"bf16"' --set model.channels_last=true --set expand.workers=8 \
    --set sources.shapes-cls.batch_size=$1 --set sources.shapes-seg.batch_size=$2
done
# the same with full-width HRNet RL paths, for comparison (the recipe uses reconcile_width = 1/16)
$PY cli.py bench expand --config configs/bench_r50.toml --steps 20 \
  --set expand.amp='"bf16"' --set model.channels_last=true --set expand.workers=8 \
  --set sources.shapes-cls.batch_size=64 --set sources.shapes-seg.batch_size=32 --set model.reconcile_width=1.0
$PY cli.py bench squeeze --config configs/bench_r50.toml --steps 20 \
  --set squeeze.amp='"bf16"' --set model.channels_last=true --set squeeze.workers=8 \
  --set sources.shapes-cls.batch_size=64 --set sources.shapes-seg.batch_size=32
