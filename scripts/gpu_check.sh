#!/usr/bin/env bash
# The prepared GPU check, one call on a GPU machine without network (its torch, triton,
# nvcc and pytest are used as they are): build with the CUDA kernels, run the whole
# test suite (GPU tests included), then the kernel, optimizer-step and training-
# iteration benchmarks. Everything lands in OUTDIR (at most 8 files):
#   env.txt  run.log  tests.log  ops.json  optimizer_step_resnet34.json
#   optimizer_step_vit_b_16.json  train_iter.json  python_overhead.json
# Each stage has its own time limit, and all of them together stay inside an overall
# budget (GPU_CHECK_BUDGET_S, default 330 s: a device session has 15 minutes in all, and
# this leaves room for a rerun); a stage that would overrun is cut, the rest reported.
#
#   bash scripts/gpu_check.sh OUTDIR
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG="$OUT/run.log"
BUDGET=${GPU_CHECK_BUDGET_S:-330}
START=$(date +%s)

limit_for() {  # the stage's own limit, or what is left of the budget if less
  local left=$(( BUDGET - ($(date +%s) - START) - 5 ))
  (( left < $1 )) && echo "$left" || echo "$1"
}

{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2
  git rev-parse HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1

stage() {  # stage NAME LIMIT_S COMMAND...: runs, logs, never stops the script
  local name=$1 limit
  limit=$(limit_for "$2")
  shift 2
  if (( limit < 10 )); then
    echo "== $name: skipped, the budget is spent" | tee -a "$LOG"
    return
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0
  t0=$(date +%s)
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
}

stage build 150 env IMBSAM_BUILD_CUDA=1 MAX_JOBS="$(nproc)" "$PY" -m pip install --no-deps --no-build-isolation -e .
stage backends 30 "$PY" -c "import imbsam; print('available backends:', imbsam.available_backends())"
# The tests keep their own log file.
stage tests 180 bash -c "\"$PY\" -m pytest -q -rs tests > \"$OUT/tests.log\" 2>&1"
echo "   tests: $(tail -1 "$OUT/tests.log" 2>/dev/null)" | tee -a "$LOG"
stage bench_ops 40 "$PY" benchmarks/bench_ops.py --device cuda --dtypes float32,bfloat16 --out "$OUT/ops.json"
for model in resnet34 vit_b_16; do
  stage "optimizer_step $model" 40 "$PY" benchmarks/bench_optimizer_step.py --device cuda --model "$model" \
    --dtypes float32,bfloat16 --reps 30 --out "$OUT/optimizer_step_$model.json"
done
stage train_iter 60 "$PY" benchmarks/bench_train_iter.py --device cuda --reps 30 --out "$OUT/train_iter.json"
stage python_overhead 20 "$PY" benchmarks/bench_python_overhead.py --device cuda --out "$OUT/python_overhead.json"
echo "== done" | tee -a "$LOG"
