#!/usr/bin/env bash
# One command on a fresh machine: a virtualenv in .venv, torch, the compiled extension
# (CPU kernels, plus the CUDA ones when nvcc is found), then the main job: the
# optimizer-step benchmark on this machine, every backend side by side.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
echo "== installing requirements (torch pinned in requirements.txt)"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q -r requirements.txt

# torch finds nvcc through CUDA_HOME; toolkits in /usr/local/cuda-X.Y are found by setup.py.
echo "== building imbsam._C (IMBSAM_BUILD_CUDA=${IMBSAM_BUILD_CUDA:-auto}, MAX_JOBS=${MAX_JOBS:-$(nproc)})"
start=$(date +%s)
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
echo "   built in $(( $(date +%s) - start )) s"
"$PY" -c "import imbsam; print('available backends:', imbsam.available_backends())"

echo "== optimizer-step benchmark: ResNet-34 (CIFAR stem) parameter list"
"$PY" benchmarks/bench_optimizer_step.py --reps "${BENCH_REPS:-10}" --out runs/bench/optimizer_step_cpu.json
