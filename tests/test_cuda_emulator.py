"""The CUDA emulator (tests/cuda_emu/cuda_emu.h) itself: it reports each kind of bug it
exists to catch, under every thread order, and runs the correct kernel cleanly.

The kernels are in tests/cuda_emu/selftest.cpp: one kernel, one planted bug per code."""
from __future__ import annotations

import ctypes
import os

import pytest
import torch

import emulated_cuda

pytestmark = pytest.mark.skipif(
    emulated_cuda.compiler() is None and not os.environ.get("CI"),
    reason="the CUDA emulator needs clang++ (apt-get install clang); CI requires it")

THREADS = 64
ORDERS = list(emulated_cuda.ORDERS)


@pytest.fixture(scope="module")
def selftest():
    lib = ctypes.CDLL(str(emulated_cuda.build(large_args=False, source="selftest")))
    lib.selftest_error.restype = ctypes.c_char_p
    return lib


def run(lib, bug, order, threads=THREADS):
    x = torch.arange(1, threads + 5, dtype=torch.float32)  # in[t], and in + 1 for the misaligned load
    out = torch.full((2 * threads,), -1.0)
    rc = lib.selftest_run(bug, emulated_cuda.ORDERS[order], ctypes.c_uint64(7), threads,
                          ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(x.data_ptr()))
    return rc, lib.selftest_error().decode(), out


def expected(threads=THREADS):
    x = torch.arange(1, threads + 1, dtype=torch.float64)
    v = x + x.roll(-1)  # own value plus the next thread's shared slot
    warps = v.view(-1, 32)
    lane0 = warps.sum(1)  # the full-warp tree leaves the warp's sum in lane 0
    return v, lane0


@pytest.mark.parametrize("order", ORDERS)
def test_the_correct_kernel_runs_cleanly(selftest, order):
    rc, err, out = run(selftest, 0, order)
    assert rc == 0, err
    v, lane0 = expected()
    for block in out.view(2, -1):
        assert torch.equal(block[::32].double(), lane0)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("bug,message", [
    (1, "__syncthreads"),        # divergent barrier: deadlock, some wait, some exited
    (2, "__syncthreads"),        # early exit before the barrier
    (3, "has exited"),           # half-warp shuffle with a full mask
    (6, "misaligned 16-byte load"),
    (7, "which the mask does not name"),
])
def test_each_planted_bug_is_reported(selftest, order, bug, message):
    rc, err, _ = run(selftest, bug, order)
    assert rc == -1 and message in err, err
    assert "block 0" in err  # where it happened


@pytest.mark.parametrize("bug", [4, 5])
def test_reads_of_unwritten_shared_memory_see_poison(selftest, bug):
    # No error to report: the emulator cannot know which reads are wrong, but shared
    # memory starts every block as NaN (0xFF bytes), so the result shows it.
    for order in ORDERS:
        rc, err, out = run(selftest, bug, order)
        assert rc == 0, err
        assert torch.isnan(out).any(), order


def test_a_missing_barrier_depends_on_the_thread_order(selftest):
    outs = [run(selftest, 4, order)[2] for order in ORDERS]
    assert not all(torch.equal(outs[0].nan_to_num(), o.nan_to_num()) for o in outs[1:])


def test_blocks_of_1024_threads_and_a_fresh_start_after_an_error(selftest):
    assert run(selftest, 3, "forward")[0] == -1
    rc, err, out = run(selftest, 0, "random", threads=1024)
    assert rc == 0, err
    v, lane0 = expected(1024)
    assert torch.equal(out[:1024][::32].double(), lane0)
