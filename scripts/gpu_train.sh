#!/usr/bin/env bash
# The prepared GPU training run for the Fashion-MNIST-LT table: one call on a GPU machine
# without network. Builds the package, then trains each optimizer named, in order, with
# the paper's recipe (ResNet-34, one-channel stem, IF 100, 200 epochs, seed 9826) plus
# the GPU speed options, and packs each run into OUTDIR/<opt>.tar.gz (metrics.json,
# train.log, history.json, plots). A run gets what is left of the budget
# (GPU_TRAIN_BUDGET_S, default 570 s: give the call timeout_s 600) as --time-limit-s:
# one that cannot finish stops cleanly and its log says how far it got. Its checkpoint
# (~170 MB) cannot come back from the device machine (16 MiB per file), nor be carried to
# it (64 MiB in all), so a run must finish within one call: the 200-epoch runs do not fit a
# 15-minute device session and need a longer loan; within one, the script trains what fits
# (a shorter --epochs through GPU_TRAIN_EXTRA_ARGS) and the epoch times in the log tell how
# long the full runs would take.
#
#   bash scripts/gpu_train.sh OUTDIR sgd sam
#
# Data: the Fashion-MNIST .gz files in data/fashion-mnist (ignored by git: name it
# in the device tool's `carry`; `cp /usr/share/datasets/fashion-mnist/*.gz
# data/fashion-mnist/` first). Files in OUTDIR: env.txt, run.log, <opt>.tar.gz each.
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_train.sh OUTDIR OPT [OPT...]}
shift
(( $# )) || { echo "name at least one optimizer: sgd, sam, imbsam" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG="$OUT/run.log"
BUDGET=${GPU_TRAIN_BUDGET_S:-570}
DATA=${GPU_TRAIN_DATA:-data/fashion-mnist}
# bf16 autocast, channels-last and the CUDA-graph step: the speed options, not the recipe.
SPEED_ARGS=${GPU_TRAIN_SPEED_ARGS:---amp bf16 --channels-last --cuda-graph}
EXTRA_ARGS=${GPU_TRAIN_EXTRA_ARGS:-}  # e.g. a shorter --epochs for a trial
RUNS=$(mktemp -d)  # outside OUTDIR: the checkpoints must not be sent back
source scripts/gpu_common.sh
record_machine "$OUT/env.txt"

if [[ ! -f "$DATA/train-images-idx3-ubyte.gz" ]]; then
  echo "no Fashion-MNIST files in $DATA: carry them (see the header of $0)" | tee -a "$LOG"
  exit 2
fi
[[ ${GPU_SKIP_BUILD:-0} == 1 ]] || build_with_cuda

for opt in "$@"; do
  left=$(seconds_left)
  # shellcheck disable=SC2086  # the option strings are word lists
  stage "train $opt" "$left" "$PY" -m imbsam.train --dataset fmnist-lt --data-root "$DATA" --imb-factor 100 \
    --model resnet34 --opt "$opt" --epochs 200 --seed 9826 $SPEED_ARGS --no-progress --checkpoint-every 50 \
    --time-limit-s $(( left > 30 ? left - 15 : 10 )) --out "$RUNS/$opt" $EXTRA_ARGS
  if [[ -d "$RUNS/$opt" ]]; then
    tar czf "$OUT/$opt.tar.gz" -C "$RUNS" --exclude checkpoint.pt "$opt"
    echo "   $opt: $(grep -E '^epoch|stopped|wrote' "$RUNS/$opt/train.log" | tail -2 | tr '\n' ' ')" | tee -a "$LOG"
  fi
done
rm -rf "$RUNS"
echo "== done" | tee -a "$LOG"
