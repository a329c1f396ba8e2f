#!/usr/bin/env bash
# The paper's comparison at 8x the data a step, on one GPU (configs/ablate_gpu.toml; docs/ablation/gpu/).
#   bash scripts/gpu_ablate.sh [SECONDS [ABLATE OPTIONS...]]   (options go to `cli.py ablate`, e.g. --seeds 1)
# writes the ablation's world if missing (data/ablate: 70 MB, too large to carry, so it is drawn there with
# 16 processes; same seed, same generator as on the CPU), then runs `ablate` for at most SECONDS (default 300)
# and packs what finished (every run's metrics.json, every transfer's scores.json, the report) into
# $OUT/ablate_gpu.tgz, a few hundred kB. ablate resumes from those files: unpack into runs/ablate_gpu and
# run the same command again to continue, or to rebuild the report.
# GPU_CHECK_TINY=1: the same plumbing on a CPU with --quick (toy sizes), as tests/test_gpucheck.py runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT=${1:-300}
shift $(( $# > 0 ? 1 : 0 ))
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DATA=${ABLATE_DATA:-data/ablate}
RUNS=${ABLATE_RUNS:-runs/ablate_gpu}
PACK=${OUT:-runs}/ablate_gpu.tgz
export PYTHONUNBUFFERED=1
if ls gpu/whl/*.whl > /dev/null 2>&1 && ! $PY -c "import pycocotools" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu_site gpu/whl/*.whl \
    && export PYTHONPATH="/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi
t0=$SECONDS
[ -f "$DATA/.complete" ] || $PY cli.py demo-data --out "$DATA" --downstream-scale 5 --workers "$(nproc)" > /dev/null || exit 1
echo "gpu_ablate: world ready after $((SECONDS - t0)) s"
QUICK=""; [ "${GPU_CHECK_TINY:-0}" = 1 ] && QUICK="--quick --jobs 2"
LEFT=$((LIMIT - (SECONDS - t0))); [ $LEFT -ge 10 ] || LEFT=10  # timeout 0 would mean no limit
timeout -k 10 $LEFT $PY cli.py ablate --config configs/ablate_gpu.toml --set ablate.out="$RUNS" \
  --out "$RUNS/report" $QUICK "$@"
rc=$?
echo "gpu_ablate: ablate exit $rc after $((SECONDS - t0)) s"
mkdir -p "$(dirname "$PACK")" "$RUNS"
(cd "$RUNS" && find . \( -name metrics.json -o -name scores.json -o -name 'ablation.*' -o -name log.jsonl \) -print0 \
  | tar czf - --null -T -) > "$PACK"
echo "gpu_ablate: packed $(tar tzf "$PACK" | wc -l) files into $PACK ($(du -k "$PACK" | cut -f1) kB)"
exit $rc
