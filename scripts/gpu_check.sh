#!/usr/bin/env bash
# The GPU check of the full-scale recipe (configs/xlearner_r50.toml over the stand-in world), as one prepared
# command for a lent GPU machine that carries its own torch and nothing else. Prepare here, once:
#     bash scripts/gpu_prepare.sh     # gpu/whl: a pycocotools wheel for the device's Python 3.12;
#                                     # gpu/standin: the stand-in world at --scale 0.5 (36 MB)
# then run there with `gpu` carried (under the 64 MiB a call can carry):
#     bash scripts/gpu_check.sh
# Every case runs in its own process under its own time limit and appends one JSON line to
# $RESULTS (default $OUT/gpu_check.jsonl when $OUT is set, else runs/gpu_check/gpu_check.jsonl),
# so partial results survive; a case that fails or overruns appends {"case", "error", "stderr_tail"}.
# Checkpoints and logs go to $SCRATCH (default /tmp/gpu_check), never under $OUT: only the JSON lines
# and one log (gpu_check.log, tails of each case's output) are written there, a few kB.
#   1 env        GPU, torch / torchvision / CUDA / cuDNN versions, /dev/shm, cores
#   2 boxes      one detection batch's anchors and boxes under bf16 autocast vs fp32 (800 x 1088): max error, px
#   3 backbone   a bare torchvision ResNet-50 training step, batch 256, bf16, cudnn.benchmark off and on
#   4 recipe     the recipe, eager, real loader and engine, 20 steps: step time, images/s per source,
#                data-wait, peak memory (the last 10 steps), and its final checkpoint
#   5 squeeze    20 squeeze steps from case 4's checkpoint (norm_steps 5): step time and peak memory
#   6 syncbn-*   case 4 under a one-rank NCCL process group (torchrun), DDP, SyncBatchNorm forced onto its
#                collective path: only the BNs that learn (learning, the default), then every BN (all,
#                sync_bn_no_grad): the sync path's cost per step against case 4
#   7 profile    case 4 in-process for a few steps: host syncs per step by call site, top kernels, det batch
#                shapes, checkpoint write time
# About 4 minutes on one H200 (the limits add up to 415 s). GPU_CHECK_CASES="env profile" runs only those.
#   GPU_CHECK_TINY=1 bash scripts/gpu_check.sh   (CPU, toy sizes, time limits x 10: proves the plumbing,
#                                                 measures nothing; tests/test_gpucheck.py runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=${GPU_CHECK_TINY:-0}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
TORCHRUN=${TORCHRUN:-$PY -m torch.distributed.run}
if [ -n "${OUT:-}" ]; then RESULTS=${RESULTS:-$OUT/gpu_check.jsonl}; else RESULTS=${RESULTS:-runs/gpu_check/gpu_check.jsonl}; fi
LOG=$(dirname "$RESULTS")/gpu_check.log
SCRATCH=${SCRATCH:-/tmp/gpu_check}
mkdir -p "$(dirname "$RESULTS")" "$SCRATCH"
: > "$RESULTS"; : > "$LOG"
export PYTHONUNBUFFERED=1

# what the device lacks, carried in gpu/: pycocotools as a wheel, installed outside the image's site-packages
if ! $PY -c "import pycocotools" 2>/dev/null && ls gpu/whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SCRATCH/site" gpu/whl/*.whl \
    && export PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$TINY" = 1 ]; then
  WORLD=${WORLD:-$SCRATCH/standin-tiny}
  [ -f "$WORLD/.complete" ] || $PY cli.py demo-data --world standin --out "$WORLD" --scale 0.02 >> "$LOG" 2>&1 || exit 1
  SIZES="--set model.arch=\"resnet10\" --set model.channels_last=false --set expand.amp=\"off\" --set squeeze.amp=\"off\""
  SIZES+=" --set model.fpn_channels=64 --set model.box_batch_size_per_image=64 --set model.box_head_dim=256"
  SIZES+=" --set model.rpn_pre_nms_top_n=300 --set model.rpn_post_nms_top_n=150 --set model.seg_channels=64"
  for s in imagenet places365 inat2021; do SIZES+=" --set sources.$s.image_size=32 --set sources.$s.batch_size=2 --set sources.$s.num_classes=0"; done
  for s in coco objects365 ade20k; do SIZES+=" --set sources.$s.image_size=64 --set sources.$s.batch_size=2"; done
  SIZES+=" --set expand.workers=1 --set squeeze.workers=1 --set squeeze.norm_steps=1"
  STEPS=2; LOG_EVERY=1; SQ_STEPS=2; PROFILE_STEPS=6; BATCH=2; BB_STEPS=1; SLOW=10
else
  WORLD=${WORLD:-gpu/standin}
  [ -f "$WORLD/.complete" ] || { echo "{\"case\": \"world\", \"error\": \"$WORLD missing: run scripts/gpu_prepare.sh here and carry gpu\"}" | tee -a "$RESULTS"; exit 1; }
  SIZES="--set squeeze.norm_steps=5"  # the teacher's statistics from 5 batches: this check times steps
  STEPS=20; LOG_EVERY=10; SQ_STEPS=20; PROFILE_STEPS=6; BATCH=256; BB_STEPS=15; SLOW=1
fi
STANDIN="$(grep -v '^#' configs/standin.sets | sed 's/^/--set /') --set data_root=$WORLD"
NO_VAL=""  # this check times training: no evaluation
for s in imagenet places365 inat2021 coco objects365 ade20k; do NO_VAL+=" --set sources.$s.val=\"\""; done
R50="--config configs/xlearner_r50.toml $STANDIN $NO_VAL $SIZES"

want() {  # GPU_CHECK_CASES="env profile" runs only those cases (default: all)
  [ -z "${GPU_CHECK_CASES:-}" ] || [[ " $GPU_CHECK_CASES " == *" $1 "* ]]
}
case_() {  # case_ NAME SECONDS COMMAND...: run under a time limit; append its last line if JSON, or an error line
  local name=$1 limit=$(($2 * SLOW)) rc last
  shift 2
  want "${name%%-*}" || return 0
  local t0=$SECONDS
  timeout -k 5 $limit "$@" > "$SCRATCH/$name.out" 2> "$SCRATCH/$name.err"
  rc=$?
  { echo "== $name: exit $rc, $((SECONDS - t0)) s"; tail -n 15 "$SCRATCH/$name.out"; tail -n 15 "$SCRATCH/$name.err"; } >> "$LOG"
  if [ $rc -ne 0 ]; then
    local why="exit $rc"; [ $rc -eq 124 ] && why="timeout after ${limit}s"
    $PY -c 'import json, sys; print(json.dumps({"case": sys.argv[1], "error": sys.argv[2], "seconds": int(sys.argv[3]),
      "stderr_tail": open(sys.argv[4], errors="replace").read()[-600:]}))' "$name" "$why" $((SECONDS - t0)) "$SCRATCH/$name.err" | tee -a "$RESULTS"
    return $rc
  fi
  last=$(tail -n 1 "$SCRATCH/$name.out")
  if [ "${last:0:1}" = "{" ]; then echo "$last" | tee -a "$RESULTS"; fi
}
summary() {  # summary NAME RUN_DIR [BASELINE_STEP_S]: the run's last logged window as a JSON line
  want "${1%%-*}" || return 0
  $PY -c 'import json, sys; from xlearner.tools.bench import summarise_run
r = {**summarise_run(sys.argv[2]), "case": sys.argv[1]}
if len(sys.argv) > 3: r["overhead_vs_recipe"] = round(r["step_s"] / float(sys.argv[3]) - 1, 3)
print(json.dumps(r))' "$@" | tee -a "$RESULTS"
}

case_ env 20 $PY -m xlearner.tools.gpucheck env
case_ boxes 20 $PY -m xlearner.tools.gpucheck boxes
case_ backbone 45 $PY -m xlearner.tools.gpucheck backbone --batch $BATCH --steps $BB_STEPS

rm -rf "$SCRATCH/recipe" "$SCRATCH/squeeze" "$SCRATCH/syncbn-"* "$SCRATCH/profile"
case_ recipe 75 $PY cli.py expand $R50 --set expand.steps=$STEPS --set expand.log_every=$LOG_EVERY \
  --set expand.ckpt_every=100000 --out "$SCRATCH/recipe" && summary recipe "$SCRATCH/recipe"
RECIPE_STEP_S=$($PY -c 'import json, sys; print(next((json.loads(l)["step_s"] for l in open(sys.argv[1]) if "\"case\": \"recipe\"" in l and "step_s" in l), ""))' "$RESULTS")

if [ -f "$SCRATCH/recipe/checkpoint.pt" ]; then
  case_ squeeze 60 $PY cli.py squeeze $R50 --teacher "$SCRATCH/recipe/checkpoint.pt" --set squeeze.steps=$SQ_STEPS \
    --set squeeze.log_every=$LOG_EVERY --set squeeze.ckpt_every=100000 --out "$SCRATCH/squeeze" \
    && summary squeeze "$SCRATCH/squeeze"
elif want squeeze; then
  echo '{"case": "squeeze", "error": "no checkpoint from the recipe case"}' | tee -a "$RESULTS"
fi
rm -f "$SCRATCH/recipe/checkpoint"*.pt  # about 1 GB each at full size

# (on a CPU, TINY: gloo, and the engine converts no BN: the plumbing only)
for scope in learning all; do  # sync_bn as it is now (only the BNs that learn), then every BN (sync_bn_no_grad)
  case_ syncbn-$scope 50 $TORCHRUN --standalone --nproc_per_node=1 -m xlearner.tools.gpucheck syncbn expand $R50 \
    --set expand.sync_bn=true --set expand.sync_bn_no_grad=$([ $scope = all ] && echo true || echo false) \
    --set expand.steps=$STEPS --set expand.log_every=$LOG_EVERY --set expand.ckpt_every=100000 \
    --out "$SCRATCH/syncbn-$scope" && summary syncbn-$scope "$SCRATCH/syncbn-$scope" $RECIPE_STEP_S
  rm -f "$SCRATCH/syncbn-$scope/checkpoint"*.pt
done

case_ profile 75 $PY -m xlearner.tools.gpucheck profile $R50 --set expand.steps=$PROFILE_STEPS \
  --set expand.log_every=$PROFILE_STEPS --set expand.ckpt_every=100000 --out "$SCRATCH/profile"
rm -f "$SCRATCH/profile/checkpoint"*.pt
echo "gpu_check: $(grep -c . "$RESULTS") JSON lines in $RESULTS ($(grep -c '"error"' "$RESULTS") errors)"
