#!/usr/bin/env bash
# The GPU figures the open issues ask for, as ONE prepared command for the device tool (a session gets ~15 minutes of
# GPU time and 10 minutes per command). Here first: `bash scripts/gpu_wheels.sh` (py3.12 wheels into .whl/). Then:
#   device run  command="bash scripts/gpu_figures.sh"  carry=[".whl"]  timeout_s=600
# Every step writes its log (and CSV) under $OUT, which comes back; the steps run by priority and each is cut off so
# the whole stays inside BUDGET_S. QUICK=1 runs the same commands at toy sizes on the CPU (a dry run of the script).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-figures}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

PY=${PY:-python}
if [ "${QUICK:-0}" != 1 ] && [ -d .whl ] && ! $PY -c "import deepspeed, webdataset, fvcore" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/mrconv-site .whl/*.whl
  export PYTHONPATH="/tmp/mrconv-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "${QUICK:-0}" = 1 ]; then
  PY=.venv/bin/python DEV=cpu TINY=mrconvnext_atto PEER=convnext_atto IMG=64 BATCH=8 IBATCH=8 ITERS="--iters 2 --rounds 1 --warmup 1"
  LAYER="--batch-size 2 --iters 1 --rounds 1" LOADER="--workers 1 --num-images 40 --batch-size 8 --rounds 1"
else
  DEV=cuda TINY=mrconvnext_tiny PEER=convnext_tiny IMG=224 BATCH=128 IBATCH=256 ITERS=""
  LAYER="--batch-size 64" LOADER="--workers 4 --num-images 3000 --batch-size 128 --rounds 2"
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PY -c "import torch, timm, triton, deepspeed; print('torch', torch.__version__, 'timm', timm.__version__,
'triton', triton.__version__, 'deepspeed', deepspeed.__version__)"; } 2>&1 | tee "$OUT/machine.txt"

start=$SECONDS
step() {  # step NAME CAP_S COMMAND...: run with the smaller of its cap and what is left of the budget
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET_S - (SECONDS - start)))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 20 ]; then echo "[$name] skipped: budget spent" | tee -a "$OUT/summary.txt"; return; fi
  echo "[$name] $* (at most ${cap}s)"
  local t0=$SECONDS
  timeout -k 10 "$cap" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "[$name] rc=$rc in $((SECONDS - t0))s: $(grep -E '^summary|passed|failed' "$OUT/$name.log" | tail -1)" \
    | tee -a "$OUT/summary.txt"
}
B="$PY -m pipelines.benchmark"
COMMON="--img-size $IMG --amp bf16 --channels-last --device $DEV $ITERS"

# 1. the GPU tests (Triton at stage shapes, nvJPEG decode, the models on CUDA)
[ "$DEV" = cuda ] && step tests 150 $PY -m pytest -q tests/test_gpu.py tests/test_triton.py tests/test_triton_fft.py -x
# 2. issue 11/12: training throughput and peak memory vs ConvNeXt, batch 128, bf16, channels-last
step train 130 $B models --models $TINY $PEER --train --batch-size $BATCH $COMMON --csv "$OUT/train.csv"
# 3. issue 12: the same with the Triton kernels (in the dry run, on the CPU without Triton's interpreter,
# conv_impl=triton takes the PyTorch path: the commands are checked, not the kernels)
step train_triton 110 $B models --models $TINY $PEER --train --batch-size $BATCH $COMMON \
  --model-kwargs "$TINY:conv_impl=triton" --csv "$OUT/train_triton.csv"
# 4. issue 12: inference, fused vs unfused vs ConvNeXt, batch 256
step infer 80 $B models --models "$TINY@fused" "$TINY@unfused" $PEER --batch-size $IBATCH $COMMON --csv "$OUT/infer.csv"
# 5. issue 12: the layer alone at the stage shapes (achieved GB/s), Triton, inference and training
step layer_triton 60 $B layer --device $DEV --conv-impl triton --amp bf16 $LAYER
step layer_train 60 $B layer --device $DEV --conv-impl triton --amp bf16 --train $LAYER
# 6. issue 14: the loader, GPU decode beside the CPU path and ImageFolder
step loader 90 $B loader --decode gpu $LOADER
# 7. issue 12: the Triton training form with fp32 FMA products instead of 3xTF32 (models.kernels.TRITON_FP32_PRECISION)
step layer_train_ieee 60 $B layer --device $DEV --conv-impl triton --amp bf16 --train \
  --fp32-precision ieee $LAYER
echo "summary: $(wc -l <"$OUT/summary.txt") steps in $((SECONDS - start))s; logs and CSVs in $OUT"
