#!/usr/bin/env bash
# The prepared GPU check, one call on a GPU machine without network (its torch, triton,
# nvcc and pytest are used as they are): build with the CUDA kernels, run the whole
# test suite (GPU tests included), then the kernel, optimizer-step and training-
# iteration benchmarks. Everything lands in OUTDIR (at most 9 files):
#   env.txt  run.log  tests.log  ops.json  optimizer_step_resnet34.json
#   optimizer_step_vit_b_16.json  train_iter.json  adam_step_vit_b_16.json  python_overhead.json
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
source scripts/gpu_common.sh
record_machine "$OUT/env.txt"

build_with_cuda
# The tests keep their own log file. The GPU-relevant files first, so a cut run has them.
FIRST="tests/test_gpu.py tests/test_ops.py tests/test_optimizers.py tests/test_engine_phases.py"
FIRST="$FIRST tests/test_paper_semantics.py tests/test_errors.py tests/test_compile.py"
# With pytest-xdist (the GPU image has it) four workers share the 16 cores and the GPU,
# one test file each at a time; without it the files run in the order above.
PARALLEL=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4 --dist loadfile")
stage tests 150 bash -c "\"$PY\" -m pytest -q -rs $PARALLEL $FIRST tests > \"$OUT/tests.log\" 2>&1"
echo "   tests: $(tail -1 "$OUT/tests.log" 2>/dev/null)" | tee -a "$LOG"
# The benchmarks in the order of what the targets need most, should the budget run out.
step_bench() {  # MODEL LIMIT_S
  stage "optimizer_step $1" "$2" "$PY" benchmarks/bench_optimizer_step.py --device cuda --model "$1" \
    --dtypes float32,bfloat16 --reps 20 --out "$OUT/optimizer_step_$1.json"
}
step_bench resnet34 40
stage bench_ops 40 "$PY" benchmarks/bench_ops.py --device cuda --dtypes float32,bfloat16 --out "$OUT/ops.json"
stage train_iter 60 "$PY" benchmarks/bench_train_iter.py --device cuda --reps 30 --out "$OUT/train_iter.json"
step_bench vit_b_16 50
# SAM / ImbSAM with AdamW: the fused restore_adam_step_ against restore + combine + torch's AdamW.
stage adam_step 30 "$PY" benchmarks/bench_adam_step.py --device cuda --model vit_b_16 --reps 10 \
  --out "$OUT/adam_step_vit_b_16.json"
stage python_overhead 30 "$PY" benchmarks/bench_python_overhead.py --device cuda --backends cuda,triton --rounds 3 --out "$OUT/python_overhead.json"
echo "== done" | tee -a "$LOG"
