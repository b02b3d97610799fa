#!/usr/bin/env bash
# Deep SAD on Fashion-MNIST, every normal class x SEEDS, Adam / SAM / ImbSAM from one
# pre-training per setting: the runs behind results/anomaly/ (docs/anomaly.md).
# The paper's recipe is 150 + 150 epochs with the lr dropping after 50; this CPU affords
# EPOCHS + EPOCHS, the lr dropping after the same third (rounded).
#   EPOCHS=20 SEEDS="0 1" JOBS=2 bash scripts/anomaly_sweep.sh [OUT]
# CLASSES (default 0 to 9) picks normal classes; ANOMALY_ARGS adds options to every run.
# A rerun skips the finished settings and resumes the others.
set -euo pipefail
export SWEEP_OUT=${1:-runs/anomaly-fmnist} SWEEP_EPOCHS=${EPOCHS:-20} SWEEP_PYTHON=${PYTHON:-python}
export SWEEP_MILESTONE=$(( (SWEEP_EPOCHS + 1) / 3 )) SWEEP_ARGS=${ANOMALY_ARGS:-}
mkdir -p "$SWEEP_OUT"
for seed in ${SEEDS:-0 1}; do
  for normal in ${CLASSES:-0 1 2 3 4 5 6 7 8 9}; do
    echo "$normal $seed"
  done
done | OMP_NUM_THREADS=1 xargs -P "${JOBS:-2}" -n 2 sh -c '
  dir="$SWEEP_OUT/class$0-seed$1"
  if [ -f "$dir/adam/metrics.json" ] && [ -f "$dir/sam/metrics.json" ] && [ -f "$dir/imbsam/metrics.json" ]; then
    exit 0
  fi
  resume=""; if [ -d "$dir" ]; then resume="--resume"; fi
  # SWEEP_ARGS unquoted on purpose: several options in one variable.
  if "$SWEEP_PYTHON" -m imbsam.anomaly --normal-class "$0" --seed "$1" --ae-epochs "$SWEEP_EPOCHS" \
      --ae-lr-milestone "$SWEEP_MILESTONE" --epochs "$SWEEP_EPOCHS" --lr-milestone "$SWEEP_MILESTONE" \
      --opt adam sam imbsam --out "$dir" --no-progress $resume $SWEEP_ARGS > "$dir.log" 2>&1; then
    echo "class $0 seed $1: done ($(date +%T))"
  else
    echo "class $0 seed $1: FAILED, see $dir.log"; exit 255
  fi'
