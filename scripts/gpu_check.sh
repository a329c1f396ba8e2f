#!/usr/bin/env bash
# GPU check of the full-scale recipe (README, "Full scale"), on one H100/H200: at most 385 s of cases
# (their time limits; not yet run on a GPU) plus about 30 s to write the stand-in world if missing.
# configs/xlearner_r50.toml runs unchanged but for configs/standin.sets (data_root), over the full-size
# stand-in world in the real datasets' layouts (written first if missing). One JSON line per case:
#   backbone          a bare torchvision ResNet-50 training step, bf16, channels_last, batch 256: images/s
#   recipe            30 expand steps of the recipe, 6 sources, the real loader (8 workers per source):
#                     step time, images/s per source, data-wait fraction, peak memory (last 10 steps)
#   expand, squeeze   each stage against its bare-torchvision floor at the recipe's batch sizes, with
#                     model.compile false, then true (quality bar: ratio <= 1.15)
# Every case has its own time limit; one that fails or overruns prints {"case": ..., "error": ...}
# and the check goes on.
#   bash scripts/gpu_check.sh                  (uses .venv if present, else python3)
#   GPU_CHECK_TINY=1 bash scripts/gpu_check.sh (CPU: every case at toy sizes, compile cases skipped;
#                                               proves the plumbing, measures nothing)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WORLD=${WORLD:-data/standin}
OUT=${OUT:-runs/gpu_check}
TINY=${GPU_CHECK_TINY:-0}

case_() {  # case_ NAME SECONDS COMMAND...: run it under a time limit, output in $OUT/NAME.{out,err};
           # print its last line if that is JSON (a bench's result), or a JSON error line if it failed
  local name=$1 limit=$2 rc last
  shift 2
  timeout $((limit * SLOW)) "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  rc=$?
  if [ $rc -ne 0 ]; then
    local why="exit $rc"; [ $rc -eq 124 ] && why="timeout after $((limit * SLOW))s"
    echo "{\"case\": \"$name\", \"error\": \"$why\", \"stderr\": \"$OUT/$name.err\"}"
    return $rc
  fi
  last=$(tail -n 1 "$OUT/$name.out")
  if [ "${last:0:1}" = "{" ]; then echo "$last"; fi
}

mkdir -p "$OUT"
if [ "$TINY" = 1 ]; then
  SCALE=0.02
  # toy sizes: ResNet-18, small images and batches, one step, CPU-friendly
  SIZES="--set model.arch=\"resnet18\" --set model.channels_last=false --set expand.amp=\"off\" --set squeeze.amp=\"off\""
  SIZES+=" --set model.fpn_channels=64 --set model.box_batch_size_per_image=64 --set model.box_head_dim=256"
  SIZES+=" --set model.rpn_pre_nms_top_n=300 --set model.rpn_post_nms_top_n=150"
  for s in imagenet places365 inat2021; do SIZES+=" --set sources.$s.image_size=32 --set sources.$s.batch_size=2 --set sources.$s.num_classes=0"; done
  for s in coco objects365 ade20k; do SIZES+=" --set sources.$s.image_size=64 --set sources.$s.batch_size=2"; done
  SIZES+=" --set expand.workers=1 --set squeeze.workers=1"
  STEPS=2; RECIPE_STEPS=2; LOG_EVERY=1; BACKBONE_BATCH=2; SLOW=10  # time limits x 10 on a CPU
else
  $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)" || exit 1
  SCALE=0.5   # 160 images per cls source, 100 per det / seg source: enough for batch 64, written in ~30 s
  SIZES=""
  STEPS=8; RECIPE_STEPS=30; LOG_EVERY=10; BACKBONE_BATCH=256; SLOW=1
fi
# a world written before the stand-in took the real layouts has no coco/annotations/: write it again
[ -f "$WORLD/.complete" ] && [ -f "$WORLD/coco/annotations/instances_train2017.json" ] \
  || $PY cli.py demo-data --world standin --out "$WORLD" --scale $SCALE > "$OUT/world.log" || exit 1
# the recipe over the stand-in world; no evaluation (val = ""): this check times training only
STANDIN="$(grep -v '^#' configs/standin.sets | sed 's/^/--set /') --set data_root=$WORLD"
NO_VAL=""
for s in imagenet places365 inat2021 coco objects365 ade20k; do NO_VAL+=" --set sources.$s.val=\"\""; done
R50="--config configs/xlearner_r50.toml $STANDIN $NO_VAL $SIZES"

case_ backbone 45 $PY cli.py bench backbone $R50 --set sources.imagenet.batch_size=$BACKBONE_BATCH --steps 20

rm -rf "$OUT/recipe"
case_ recipe 90 $PY cli.py expand $R50 --set expand.steps=$RECIPE_STEPS --set expand.log_every=$LOG_EVERY \
  --set expand.ckpt_every=100000 --out "$OUT/recipe" \
  && $PY -c "import json, sys; from xlearner.tools.bench import summarise_run; print(json.dumps(summarise_run(sys.argv[1])))" "$OUT/recipe"

for compile in false true; do
  if [ "$TINY" = 1 ] && [ $compile = true ]; then
    echo "{\"case\": \"expand/squeeze compile\", \"skipped\": \"GPU_CHECK_TINY: inductor takes minutes on a CPU\"}"
    continue
  fi
  limit=$([ $compile = true ] && echo 80 || echo 45)
  case_ expand-compile-$compile $limit $PY cli.py bench expand $R50 --set model.compile=$compile --steps $STEPS
  case_ squeeze-compile-$compile $limit $PY cli.py bench squeeze $R50 --set model.compile=$compile --steps $STEPS
done
