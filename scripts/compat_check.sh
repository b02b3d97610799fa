#!/usr/bin/env bash
# The test suite against another torch: a venv of its own (kept for reruns), a copy of
# this working tree built against that torch (CPU kernels; CUDA ones too with
# IMBSAM_BUILD_CUDA=1 when that torch's CUDA matches nvcc), the log in OUTDIR.
# The copy keeps this checkout's own imbsam._C, built against the pinned torch, intact.
#
#   bash scripts/compat_check.sh TORCH TORCHVISION [OUTDIR] [EXTRA_REQUIREMENT...]
#   COMPAT_PYTHON=python3.9 bash scripts/compat_check.sh 2.4.1 0.19.1 results/compat "numpy<2"
# COMPAT_PYTHON: the interpreter the venv is made from (default python3).
#
# Downloads the torch wheel and its CUDA libraries (a few GB) from the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n '2,11p' "$0"; exit 2; }
torch_version=$1 vision_version=$2 out=${3:-runs/compat}
shift $(( $# >= 3 ? 3 : 2 ))
base_python=${COMPAT_PYTHON:-python3}
pyver=$("$base_python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
venv=${COMPAT_VENVS:-/tmp/imbsam-compat}/torch-$torch_version-py$pyver
mkdir -p "$out"
out=$(cd "$out" && pwd)
log=$out/torch-$torch_version-py$pyver.log

if [ ! -x "$venv/bin/python" ]; then
  "$base_python" -m venv "$venv"
fi
py=$venv/bin/python
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "torch==$torch_version" "torchvision==$vision_version" "setuptools>=64" wheel ninja pytest \
  pytest-xdist tqdm matplotlib "$@"

tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
# Tracked and new (not ignored) files: what a commit of this tree would hold.
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$tree"
cd "$tree"
{
  echo "# imbsam test suite against torch $torch_version ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
  # Not the logs themselves (OUTDIR may be tracked, as results/compat is).
  changed=$(git -C "$OLDPWD" diff --name-only HEAD -- . ":(exclude)$out" | tr '\n' ' ')
  echo "# commit $(git -C "$OLDPWD" rev-parse --short HEAD)${changed:+ + uncommitted changes to: $changed}"
  "$py" -c "import sys, platform, torch, triton; print('# python', platform.python_version(), '| torch', \
torch.__version__, '| triton', triton.__version__, '|', platform.machine())"
  echo "# cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //') ($(nproc) cores)"
} > "$log"
if ! IMBSAM_BUILD_CUDA=${IMBSAM_BUILD_CUDA:-0} "$py" -m pip install -q --no-deps --no-build-isolation -e . \
    > build.log 2>&1; then
  cat build.log >> "$log"
  echo "the build failed: $log"
  exit 1
fi
# The backends as the tests see them: without a GPU, Triton through its interpreter.
"$py" -c "import os, torch
if not torch.cuda.is_available(): os.environ.setdefault('TRITON_INTERPRET', '1')
import imbsam; print('# backends:', imbsam.available_backends(), '| CUDA kernels built:', \
imbsam.backends.compiled.has_kernel('CUDA'))" >> "$log"
status=0
"$py" -m pytest -q -p no:cacheprovider -n "${COMPAT_WORKERS:-2}" -rs tests 2>&1 \
  | grep -v "Warning\|warnings.warn\|^  \|^$" >> "$log" || status=$?
tail -n 3 "$log"
echo "log: $log"
exit $status
