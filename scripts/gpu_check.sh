#!/usr/bin/env bash
# The prepared GPU check: one call on a GPU machine without network (its torch, triton,
# nvcc and pytest are used as they are), sized to bring back what fails within a device
# session of 15 minutes (the machine's start included) and to leave room for a rerun:
#   1. build with the CUDA kernels (skipped with GPU_SKIP_BUILD=1: a rerun on the same
#      warm machine, whose build is still there);
#   2. the GPU-relevant tests only: tests/test_gpu.py and the cuda / triton cases of the op,
#      optimizer, fused-step, schedule and compile files, with -rfEs and JUnit XML, cut with
#      SIGINT at its limit, so that pytest still reports what failed and writes its XML;
#   3. the benchmarks in the order of what the targets need most, each sized to fit: the
#      ResNet-34 optimizer step, the ops, the training iteration, then the cheaper passes
#      and schedules, the ViT-B/16 step, the fused AdamW step and the host time.
# What comes back, in OUTDIR (5 files): env.txt run.log tests.log tests.xml bench.tar.gz
# (every benchmark's JSON, packed again after each one, so that a cut run keeps what ended).
#
#   bash scripts/gpu_check.sh OUTDIR
#
# GPU_CHECK_BUDGET_S (default 330) bounds the whole call; a stage that would overrun it is
# cut or skipped, and the rest reported. GPU_CHECK_DRY=1 runs it on the CPU with the device
# parts stubbed (no build; the GPU tests, which skip there; each benchmark on the CPU at its
# smallest), as CI does, to prove that it runs end to end and writes what it promises.
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG="$OUT/run.log"
BUDGET=${GPU_CHECK_BUDGET_S:-330}
DRY=${GPU_CHECK_DRY:-0}
BENCH=$(mktemp -d)  # the JSON files, packed into one archive: the device tool returns few files
source scripts/gpu_common.sh
record_machine "$OUT/env.txt"

if [[ $DRY == 1 ]]; then
  DEVICE=cpu
  echo "== build: skipped (GPU_CHECK_DRY=1: the installed package)" | tee -a "$LOG"
elif [[ ${GPU_SKIP_BUILD:-0} == 1 ]]; then
  DEVICE=cuda
  echo "== build: skipped (GPU_SKIP_BUILD=1)" | tee -a "$LOG"
else
  DEVICE=cuda
  build_with_cuda
fi
stage backends 30 "$PY" -c "import imbsam; print('available backends:', imbsam.available_backends())"

# The GPU tests first; the others only their cuda / triton cases (on the GPU their backend
# lists gain cuda and triton). The emulator, sanitizer and packaging files run on the CPU
# in CI and are left out. SIGINT, not SIGTERM: pytest ends the session and reports.
GPU_TESTS="tests/test_gpu.py"
[[ $DRY == 1 ]] || GPU_TESTS="$GPU_TESTS tests/test_ops.py tests/test_optimizers.py tests/test_fused_adam.py
  tests/test_adam_step.py tests/test_skip_flags.py tests/test_triton_plans.py tests/test_schedules.py tests/test_compile.py"
# With pytest-xdist (the GPU image has it) four workers share the 16 cores and the GPU.
PARALLEL=$([[ $DRY != 1 ]] && "$PY" -c "import xdist" 2>/dev/null && echo "-n 4 --dist loadfile")
# shellcheck disable=SC2086  # word lists
run_stage INT "$OUT/tests.log" tests 150 "$PY" -m pytest -q -rfEs -p no:cacheprovider $PARALLEL \
  --junitxml="$OUT/tests.xml" -k "gpu or cuda or triton" $GPU_TESTS
echo "   tests: $(tail -1 "$OUT/tests.log" 2>/dev/null)" | tee -a "$LOG"

bench() {  # NAME LIMIT_S SCRIPT ARGS...: one benchmark into BENCH/NAME.json, then the archive again
  local name=$1 limit=$2 script=$3
  shift 3
  stage "$name" "$limit" "$PY" "benchmarks/$script" --out "$BENCH/$name.json" "$@"
  tar czf "$OUT/bench.tar.gz.tmp" -C "$BENCH" . && mv "$OUT/bench.tar.gz.tmp" "$OUT/bench.tar.gz"
}
# Per benchmark, its GPU arguments, or in a dry run the same script at its smallest on the CPU
# (one small model, fp32, one method: bf16 and the full lists are slow there).
if [[ $DRY == 1 ]]; then
  STEP="--model resnet32 --dtypes float32 --methods imbsam --backends cpp --reps 1"
  OPS="--model resnet32 --dtypes float32 --reps 1"
  ITER="--model resnet32 --batch 2 --reps 1 --variants eager --methods sgd,imbsam"
  TAIL="--batch 8 --rounds 1 --reps 1 --methods sgd,imbsam-tail@periodic:4"
  VIT=$STEP ADAM="--model resnet32 --methods imbsam --reps 1" HOST="--model resnet32 --backends cpp --steps 2 --rounds 1"
else
  STEP="--model resnet34 --dtypes float32,bfloat16 --reps 20"
  OPS="--model resnet34 --dtypes float32,bfloat16 --reps 20"
  ITER="--model resnet34 --batch 64 --reps 20"
  TAIL="--batch 64 --rounds 3 --reps 8"
  VIT="--model vit_b_16 --dtypes float32,bfloat16 --reps 20"
  ADAM="--model vit_b_16 --reps 10" HOST="--backends cuda,triton --rounds 3"
fi
# shellcheck disable=SC2086  # word lists
{
  bench optimizer_step_resnet34 40 bench_optimizer_step.py --device $DEVICE $STEP
  bench ops 40 bench_ops.py --device $DEVICE $OPS
  bench train_iter 60 bench_train_iter.py --device $DEVICE $ITER
  bench tail_passes 50 bench_tail_passes.py --device $DEVICE $TAIL
  bench optimizer_step_vit_b_16 50 bench_optimizer_step.py --device $DEVICE $VIT
  bench adam_step_vit_b_16 30 bench_adam_step.py --device $DEVICE $ADAM
  bench python_overhead 30 bench_python_overhead.py --device $DEVICE $HOST
}
rm -rf "$BENCH"
echo "== done" | tee -a "$LOG"
