#!/usr/bin/env bash
# One command on a fresh machine: a virtualenv in .venv, torch, the compiled extension
# (CPU kernels, plus the CUDA ones when nvcc is found), Fashion-MNIST (Debian's
# package), then the main jobs, offline: the optimizer-step benchmark with every
# backend side by side, and a short long-tailed demo (Fashion-MNIST-LT, IF 100) with
# SGD, SAM and ImbSAM on the fused backend, ending in their Many/Medium/Few/All table.
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
# Without a GPU nothing here runs the CUDA kernels: one architecture (Hopper, whose SASS
# the tests read) keeps the build about a minute; setup.py's default would build the
# release set. With a GPU, setup.py builds for the GPUs it sees.
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2> /dev/null; then
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0+PTX}
fi
echo "== building imbsam._C (IMBSAM_BUILD_CUDA=${IMBSAM_BUILD_CUDA:-auto}, MAX_JOBS=${MAX_JOBS:-$(nproc)})"
start=$(date +%s)
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
echo "   built in $(( $(date +%s) - start )) s"
"$PY" -c "import imbsam; print('available backends:', imbsam.available_backends())"

echo "== optimizer-step benchmark: ResNet-34 (CIFAR stem) parameter list"
"$PY" benchmarks/bench_optimizer_step.py --reps "${BENCH_REPS:-10}" --out runs/bench/optimizer_step_cpu.json

# Debian packages: Fashion-MNIST for the demo, clang++ for the tests' CUDA emulator
# (tests/cuda_emu/: it needs a section attribute that GCC drops in templates), and
# clang-format for the C++ style check (tests/test_style.py).
FMNIST=/usr/share/datasets/fashion-mnist
APT=()
[ -f "$FMNIST/train-images-idx3-ubyte.gz" ] || APT+=(dataset-fashion-mnist)
command -v clang++ > /dev/null || APT+=(clang)
command -v clang-format > /dev/null || APT+=(clang-format)
if [ ${#APT[@]} -gt 0 ]; then
  echo "== installing ${APT[*]} (Debian packages)"
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get install -y -qq "${APT[@]}" > /dev/null || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${APT[@]}" > /dev/null; }
fi

# The demo: ResNet-32 on Fashion-MNIST-LT, the paper's optimizer recipe, a few epochs
# (CPU-sized; the full 200-epoch runs are in imbsam/train/README.md). In torch's
# schedule order: the paper's would run the last of 3 epochs at lr 0.
EPOCHS=${DEMO_EPOCHS:-3}
DEMO=runs/demo-fmnist-lt
rm -rf "$DEMO"  # a demo starts fresh (the trainer never overwrites a checkpoint by itself)
for opt in sgd sam imbsam; do
  echo "== demo: $opt, $EPOCHS epochs"
  "$PY" -m imbsam.train --dataset fmnist-lt --imb-factor 100 --model resnet32 --opt "$opt" \
    --epochs "$EPOCHS" --lr-schedule torch --no-download --out "$DEMO/$opt" ${DEMO_FLAGS:-}
done
echo
"$PY" -m imbsam.train.table "$DEMO/sgd" "$DEMO/sam" "$DEMO/imbsam" --plot "$DEMO/comparison.png"
