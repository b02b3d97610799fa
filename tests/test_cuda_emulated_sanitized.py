"""The emulated CUDA suite again, with the kernels built under AddressSanitizer and
UndefinedBehaviorSanitizer (out-of-bounds and misaligned accesses, overflows, stack
overflows of the emulated threads). ASan's runtime must be loaded first, so the suite
runs in a child pytest with it preloaded: two variants of the six, and every case that
is not parametrised by variant."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import emulated_cuda

HERE = os.path.dirname(os.path.abspath(__file__))


def asan_runtime():
    cxx = emulated_cuda.compiler()
    if cxx is None:
        return None
    path = subprocess.run([cxx, "-print-file-name=libclang_rt.asan-x86_64.so"], capture_output=True,
                          text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.skipif(asan_runtime() is None and not os.environ.get("CI"),
                    reason="needs clang++ and its AddressSanitizer runtime (apt-get install clang); CI requires it")
def test_emulated_kernels_under_asan_and_ubsan(tmp_path):
    # The reports go to files: the child's pytest captures its stderr, and a sanitizer
    # that ends the process takes the captured text with it.
    log = tmp_path / "sanitizer"
    env = dict(os.environ, LD_PRELOAD=asan_runtime(), IMBSAM_EMU_SANITIZE="1",
               ASAN_OPTIONS=f"detect_leaks=0:log_path={log}",  # torch's own allocations are not ours to audit
               UBSAN_OPTIONS=f"print_stacktrace=1:halt_on_error=1:log_path={log}")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(HERE, "test_cuda_emulated.py"),
           "-k", "4K-random or 32K-reverse or lists_of_300 or longer_than_a_launch"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    reports = "".join(p.read_text()[:6000] for p in sorted(tmp_path.glob("sanitizer*")))
    reports = "\n".join(line for line in reports.splitlines() if "swapcontext functions" not in line)
    assert done.returncode == 0 and not reports.strip(), reports + done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout.splitlines()[-1], done.stdout[-2000:]
