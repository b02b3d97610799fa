# Shared by the prepared GPU scripts (sourced): an overall time budget, stages that are
# cut rather than overrun it, and a record of the machine. Expects OUT, LOG, BUDGET, PY.
START=$(date +%s)

seconds_left() {  # what is left of the budget, less a margin for a cut stage's exit and packing up
  echo $(( BUDGET - ($(date +%s) - START) - 20 ))
}

limit_for() {  # the stage's own limit, or what is left of the budget if less
  local left
  left=$(seconds_left)
  (( left < $1 )) && echo "$left" || echo "$1"
}

record_machine() {  # FILE: GPU, driver, torch, triton, nvcc, commit, date
  {
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    nvcc --version | tail -2
    git rev-parse HEAD 2>/dev/null || true
  } > "$1" 2>&1
}

run_stage() {  # SIGNAL OUTFILE NAME LIMIT_S COMMAND...: runs, logs, never stops the script; sets STAGE_RC
  local signal=$1 outfile=$2 name=$3 limit
  limit=$(limit_for "$4")
  shift 4
  if (( limit < 10 )); then
    echo "== $name: skipped, the budget is spent" | tee -a "$LOG"
    STAGE_RC=124
    return
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0
  t0=$(date +%s)
  # SIGNAL at the limit; a command still running 15 s later is killed (within the margin).
  timeout -s "$signal" -k 15 "$limit" "$@" >> "$outfile" 2>&1
  STAGE_RC=$?
  echo "== $name: rc=$STAGE_RC in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
}

stage() {  # NAME LIMIT_S COMMAND...: its output into the run's log; cut with SIGTERM
  run_stage TERM "$LOG" "$@"
}

build_with_cuda() {  # the package against this machine's torch, CUDA kernels included
  stage build 150 env IMBSAM_BUILD_CUDA=1 MAX_JOBS="$(nproc)" "$PY" -m pip install --no-deps --no-build-isolation -e .
  if (( STAGE_RC != 0 )); then
    # pip's own failures (an old setuptools, say) come before any compiling: build in
    # place instead and import from the checkout, rather than lose the session.
    stage build-inplace 150 env IMBSAM_BUILD_CUDA=1 MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  stage backends 30 "$PY" -c "import imbsam; print('available backends:', imbsam.available_backends())"
}
