#!/usr/bin/env bash
# Issue 7's accuracy table on one GPU: cvforge's Faster R-CNN and Mask R-CNN against torchvision's, with
# torchvision's settings on cvforge's side (benchmarks/vs_torchvision.py), for each seed in SEEDS.
#
#   bash benchmarks/vs_torchvision_gpu.sh                     # OUT=runs/vs_tv_gpu SEEDS="0 1"
#   # or in two calls of under ~6 minutes each on an H200 (estimated from single runs there), the second on the
#   # same warm machine, which keeps runs/:
#   SEEDS=0 SKIP_SPEED=1 bash benchmarks/vs_torchvision_gpu.sh
#   SEEDS=1 SKIP_PREPARE=1 bash benchmarks/vs_torchvision_gpu.sh
# It needs cvforge importable where it runs (pip install -e ., or PYTHONPATH=src with torch, torchvision, pyyaml,
# pillow, opencv, tqdm, matplotlib and pycocotools installed); PYTHON picks the interpreter (default python3).
#
# First the data sets and both pretrained backbones (the two pairs side by side; a data set is made once, under
# a file lock), so that the training runs find them; then every (pair, seed, side) trains in a process of its
# own, all side by side on the one GPU: the two sides of a pair share the machine alike, so their `train min` compare, and the wall time is
# that of the slowest run. Mask R-CNN trains in float32: under float16 AMP it diverged on both sides
# (BENCHMARKS.md); MASK_AMP="--amp on --amp-dtype bfloat16" tries bfloat16 instead. Last, the speeds, one pair at a time on the idle GPU. Each run's table lands in
# $OUT/<pair>-<seed>-<side>.md, all of them together in $OUT/table.md.
set -u
OUT=${OUT:-runs/vs_tv_gpu}
SEEDS=${SEEDS:-0 1}
DATA=${DATA:-shapes:train=512,val=128,size=256}
COMMON="--device ${DEVICE:-cuda} --imgsz ${IMGSZ:-256} --batch ${BATCH:-8} --data $DATA --workers ${WORKERS:-2}"
FASTER="--pairs faster --pretrain-epochs 30 --epochs ${FASTER_EPOCHS:-24}"
MASK="--pairs mask --pretrain-epochs 36 --epochs ${MASK_EPOCHS:-12} ${MASK_AMP:---amp off}"
PY=${PYTHON:-python3}
mkdir -p "$OUT"
start=$SECONDS

if [ -z "${SKIP_PREPARE:-}" ]; then
  $PY benchmarks/vs_torchvision.py $COMMON $FASTER --project "$OUT" --prepare > "$OUT/prepare-faster.log" 2>&1 &
  $PY benchmarks/vs_torchvision.py $COMMON $MASK --project "$OUT" --prepare > "$OUT/prepare-mask.log" 2>&1
  wait
  grep -h "top-1" "$OUT"/prepare-*.log
  echo "prepared in $((SECONDS - start)) s"
fi

for seed in $SEEDS; do
  for side in cvforge torchvision; do
    $PY benchmarks/vs_torchvision.py $COMMON $FASTER --seed "$seed" --sides $side --speed-steps 0 \
      --project "$OUT" --out "$OUT/faster-$seed-$side.md" > "$OUT/faster-$seed-$side.log" 2>&1 &
    $PY benchmarks/vs_torchvision.py $COMMON $MASK --seed "$seed" --sides $side --speed-steps 0 \
      --project "$OUT" --out "$OUT/mask-$seed-$side.md" > "$OUT/mask-$seed-$side.log" 2>&1 &
  done
done
wait
echo "trained in $((SECONDS - start)) s"

if [ -z "${SKIP_SPEED:-}" ]; then
  for pair in faster mask; do
    $PY benchmarks/vs_torchvision.py $COMMON --pairs $pair --epochs 0 --speed-steps 20 \
      --out "$OUT/speed-$pair.md" > "$OUT/speed-$pair.log" 2>&1
  done
fi

for table in "$OUT"/faster-*.md "$OUT"/mask-*.md "$OUT"/speed-*.md; do
  [ -f "$table" ] && { echo "## $(basename "$table" .md)"; cat "$table"; echo; }
done > "$OUT/table.md"
grep -h "^| [ct]" "$OUT"/*.md | sort -u
grep -l "Traceback" "$OUT"/*.log && echo "(a run failed: its log is named above)"
echo "done in $((SECONDS - start)) s: $OUT/table.md"
