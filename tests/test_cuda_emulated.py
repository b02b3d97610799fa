"""The CUDA kernels, executed: the device code of csrc/cuda/device/ runs on the CPU
through the project's emulator (tests/cuda_emu/, driven by tests/emulated_cuda.py) and
is compared with imbsam.backends.reference on the same inputs.

Both kernel-argument variants (4 KiB and 32 KiB metadata) run under all three thread
orders; every tensor sits between canary bytes, and some start off 16-byte alignment
(the scalar path). Exact-integer inputs let the norm's per-chunk partial sums be
checked bit for bit. What this cannot show: the GPU's concurrency, memory ordering,
timing and nvcc's own floating-point contraction (test_cuda_sass reads that).
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from imbsam.backends import reference

import emulated_cuda
from conftest import DTYPES, SIZES

pytestmark = pytest.mark.skipif(
    emulated_cuda.compiler() is None and not os.environ.get("CI"),
    reason="the CUDA emulator needs clang++ (apt-get install clang); CI requires it")

ORDERS = list(emulated_cuda.ORDERS)
VARIANTS = [pytest.param((large, order), id=f"{'32K' if large else '4K'}-{order}")
            for large, order in itertools.product([False, True], ORDERS)]
SANITIZE = os.environ.get("IMBSAM_EMU_SANITIZE") == "1"  # set by test_cuda_emulated_sanitized
# Under the sanitizers (each element many times slower) the sizes that reach what they check:
# tails shorter than a vector (1, 7), a chunk boundary with a one-element tail (65537: two
# chunks) and an empty tensor; lists of several launches and a tensor longer than a launch
# run as well. 278011 (four chunks and a tail) adds elements, not another kind of boundary.
SIZES = [1, 7, 65537, 0] if SANITIZE else SIZES


@pytest.fixture(params=VARIANTS)
def emu(request):
    large, order = request.param
    k = emulated_cuda.kernels(large, SANITIZE)
    k.configure(order, seed=1234)
    return k


@pytest.fixture
def emu_one():
    """For the heavier cases: one variant, the 4 KiB one (more launches), random order."""
    k = emulated_cuda.kernels(False, SANITIZE)
    k.configure("random", seed=99)
    return k


class Arena:
    """Allocates every tensor between canary bytes, optionally an element off alignment.
    Under AddressSanitizer a tensor ends where its allocation does, so that a write past
    the end hits ASan's red zone rather than a canary."""

    PAD = 64
    PAD_AFTER = 0 if SANITIZE else PAD
    CANARY = 0xA5

    def __init__(self):
        self.blocks = []

    def put(self, values: torch.Tensor, misalign: int = 0) -> torch.Tensor:
        size = values.element_size()
        start = self.PAD + misalign * size
        raw = torch.full((start + values.numel() * size + self.PAD_AFTER,), self.CANARY, dtype=torch.uint8)
        view = raw[start:start + values.numel() * size].view(values.dtype)
        view.copy_(values.reshape(-1))
        self.blocks.append((raw, start, values.numel() * size))
        return view

    def check(self):
        for raw, start, nbytes in self.blocks:
            assert (raw[:start] == self.CANARY).all() and (raw[start + nbytes:] == self.CANARY).all(), \
                "a kernel wrote outside its tensor"


@pytest.fixture
def arena():
    a = Arena()
    yield a
    a.check()


def randn(sizes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for n in sizes]


def ints(sizes, dtype, seed, low=-3, high=4):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (n,), generator=gen).to(dtype) for n in sizes]


def placed(arena, tensors, misalign_every=0):
    """Copies into the arena; with misalign_every=k every k-th tensor is off alignment."""
    return [arena.put(t, misalign=int(misalign_every > 0 and i % misalign_every == 1)) for i, t in enumerate(tensors)]


def clones(ts):
    return [t.clone() for t in ts]


def assert_bitwise(fast, ref):
    for i, (f, r) in enumerate(zip(fast, ref)):
        assert f.dtype == r.dtype and torch.equal(f, r) or (f.isnan() == r.isnan()).all() and torch.equal(
            f.nan_to_num(), r.nan_to_num()), f"tensor {i}: max diff {(f.double() - r.double()).abs().max()}"


# -- the norm -------------------------------------------------------------------------

def exact_partials(k, grads, adaptive_grads, adaptive_params, eta_a):
    """Each chunk's sum of squares in float64 (exact for these integers), in slot order."""
    out = []
    for gs, ws in ((grads, None), (adaptive_grads, adaptive_params)):
        for _, idx in emulated_cuda.group_by_dtype(gs):
            for i in idx:
                v = gs[i].double() * ((ws[i].double().abs() + eta_a) if ws is not None else 1.0)
                out += [chunk.square().sum().item() for chunk in v.split(k.chunk_size) if chunk.numel()]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_norm_partials_and_norm_bit_for_bit(emu, arena, dtype, adaptive):
    grads, params = placed(arena, ints(SIZES, dtype, 1), 2), placed(arena, ints(SIZES, dtype, 2), 3)
    split = 2 if adaptive else len(grads)
    args = (grads[:split], grads[split:], params[split:], 1.0)
    norm, partials = emu.grad_norm_and_partials(*args)
    assert torch.equal(partials, exact_partials(emu, *args))
    ref = reference.grad_norm(*args)
    assert norm.dtype == ref.dtype and torch.equal(norm, ref)


def test_grad_norm_mixed_dtypes_fill_their_own_slots(emu, arena):
    grads = [arena.put(t) for dtype, seed in zip(DTYPES * 2, range(8)) for t in ints([70001, 3], dtype, seed)]
    ws = [arena.put(t) for t in ints([70001, 3] * 8, torch.float32, 50)]
    args = (grads[:8], grads[8:], [w.to(g.dtype) for w, g in zip(ws[8:], grads[8:])], 1.0)
    norm, partials = emu.grad_norm_and_partials(*args)
    assert torch.equal(partials, exact_partials(emu, *args))
    assert norm.dtype == torch.float64 and torch.equal(norm, reference.grad_norm(*args))


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_norm_of_random_values(emu, arena, dtype):
    grads = placed(arena, randn(SIZES, dtype, 3), 2)
    norm = emu.grad_norm(grads, [], [], 0.0)
    exact = reference.grad_norm([g.double() for g in grads], [], [], 0.0).item()
    # fp32 sums per thread and warp, fp64 across chunks: a few fp32 roundings off.
    rtol = 1e-13 if dtype == torch.float64 else 1e-6
    assert abs(norm.item() - exact) <= rtol * exact


# -- perturb, restore, combine ------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturb_matches_the_reference_bitwise(emu, arena, dtype, adaptive):
    w0, g = randn(SIZES, dtype, 4), randn(SIZES, dtype, 5)
    norm = reference.grad_norm(g, [], [], 0.0)
    w, gg = placed(arena, w0, 2), placed(arena, g, 3)
    b = placed(arena, [torch.full_like(t, 7.0) for t in w0])
    emu.perturb_(w, gg, b, norm, 0.05, 0.01, adaptive)
    ref_w, ref_b = clones(w0), [torch.empty_like(t) for t in w0]
    reference.perturb_(ref_w, g, ref_b, norm, 0.05, 0.01, adaptive)
    assert_bitwise(w, ref_w)
    assert_bitwise(b, w0)  # the backup is the old weight, exactly


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.float64])
def test_perturb_with_a_non_finite_norm_leaves_the_weights(emu, arena, bad, norm_dtype):
    w0, g = randn(SIZES, torch.float32, 6), randn(SIZES, torch.float32, 7)
    w, gg = placed(arena, w0, 2), placed(arena, g)
    b = placed(arena, [torch.zeros_like(t) for t in w0])
    emu.perturb_(w, gg, b, torch.tensor(bad, dtype=norm_dtype), 0.05, 0.0, False)
    assert_bitwise(w, w0)
    assert_bitwise(b, w0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_and_combine_bitwise(emu, arena, dtype):
    w, backups = placed(arena, randn(SIZES, dtype, 8), 2), placed(arena, randn(SIZES, dtype, 9), 3)
    emu.restore_(w, backups)
    assert_bitwise(w, backups)
    g0, h = randn(SIZES, dtype, 10), randn(SIZES, dtype, 11)
    g = placed(arena, g0, 3)
    emu.add_head_grads_(g, placed(arena, h, 2))
    ref = clones(g0)
    reference.add_head_grads_(ref, h)
    assert_bitwise(g, ref)


# -- the fused restore + combine + SGD step ------------------------------------------------

SGD_CASES = {
    "plain": dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, first=False),
    "momentum-first": dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False, maximize=False,
                           first=True),
    "momentum": dict(momentum=0.9, dampening=0.1, weight_decay=5e-4, nesterov=False, maximize=False, first=False),
    "nesterov": dict(momentum=0.9, dampening=0.0, weight_decay=2e-4, nesterov=True, maximize=False, first=False),
    "maximize": dict(momentum=0.5, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=True, first=False),
}


def sgd_step(impl, w, g, b, h, bufs, case, lr_tensor=None, found_inf=None):
    impl.restore_sgd_step_(w, g, b, h, bufs, 0.1, case["momentum"], case["dampening"], case["weight_decay"],
                           case["nesterov"], case["maximize"], case["first"], lr_tensor, found_inf)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SGD_CASES))
@pytest.mark.parametrize("head", [False, True])
def test_restore_sgd_step_matches_the_reference_bitwise(emu, arena, dtype, case, head):
    case = SGD_CASES[case]
    perturbed, g, b, h = (randn(SIZES, dtype, s) for s in (12, 13, 14, 15))
    bufs0 = randn(SIZES, dtype, 16) if case["momentum"] else []
    h = h if head else []
    w = placed(arena, perturbed, 2)
    bufs = placed(arena, bufs0, 3)
    sgd_step(emu, w, placed(arena, g, 3), placed(arena, b), placed(arena, h, 2), bufs, case)
    ref_w, ref_bufs = clones(perturbed), clones(bufs0)
    sgd_step(reference, ref_w, g, b, h, ref_bufs, case)
    assert_bitwise(w, ref_w)
    assert_bitwise(bufs, ref_bufs)


@pytest.mark.parametrize("scalar_dtype", [torch.float32, torch.float64])
def test_restore_sgd_step_with_a_tensor_lr_and_found_inf(emu, arena, scalar_dtype):
    case = SGD_CASES["momentum"]
    perturbed, g, b, bufs0 = (randn(SIZES, torch.float32, s) for s in (17, 18, 19, 20))
    lr = torch.tensor(0.037, dtype=scalar_dtype)
    for inf in (0.0, 1.0, float("nan"), float("inf")):  # nonzero and NaN skip, in every chunk
        w, bufs = placed(arena, perturbed), placed(arena, bufs0, 2)
        sgd_step(emu, w, placed(arena, g), placed(arena, b, 3), [], bufs, case, lr, torch.tensor(inf))
        ref_w, ref_bufs = clones(perturbed), clones(bufs0)
        sgd_step(reference, ref_w, g, b, [], ref_bufs, case, lr, torch.tensor(inf))
        assert_bitwise(w, ref_w)
        assert_bitwise(bufs, ref_bufs)
        if inf:  # skipped: restored, the buffers untouched
            assert_bitwise(w, b)
            assert_bitwise(bufs, bufs0)


# -- many tensors, long tensors -------------------------------------------------------------

def test_lists_of_300_tensors_take_several_launches(emu_one, arena):
    sizes = [(i * 7919) % 3001 for i in range(330)]  # empties and odd sizes, 330 tensors
    dtype = torch.float32
    w0, g, b, h, bufs0 = (randn(sizes, dtype, s) for s in (21, 22, 23, 24, 25))
    before = emu_one.launches()
    w, bufs = placed(arena, w0, 5), placed(arena, bufs0, 7)
    case = SGD_CASES["nesterov"]
    sgd_step(emu_one, w, placed(arena, g), placed(arena, b), placed(arena, h, 3), bufs, case)
    # 5 lists: 30 (4 KiB) or 160 (32 KiB) tensors a launch.
    assert emu_one.launches() - before >= 330 // 30
    ref_w, ref_bufs = clones(w0), clones(bufs0)
    sgd_step(reference, ref_w, g, b, h, ref_bufs, case)
    assert_bitwise(w, ref_w)
    assert_bitwise(bufs, ref_bufs)
    grads = placed(arena, ints(sizes, dtype, 26), 4)
    norm, partials = emu_one.grad_norm_and_partials(grads, [], [], 0.0)
    assert torch.equal(partials, exact_partials(emu_one, grads, [], [], 0.0))
    assert torch.equal(norm, reference.grad_norm(grads, [], [], 0.0))


@pytest.mark.parametrize("large", [False, True], ids=["4K", "32K"])
def test_one_tensor_longer_than_a_launch(arena, large):
    k = emulated_cuda.kernels(large, SANITIZE)
    k.configure("forward")
    # Continues into a second launch as its entry 0, after a short tensor that was entry 0.
    n = k.max_blocks * k.chunk_size + 3 * k.chunk_size + 5
    dtype = torch.float16
    g = ints([9, n], dtype, 27)
    grads = placed(arena, g)
    before = k.launches()
    norm, partials = k.grad_norm_and_partials(grads, [], [], 0.0)
    assert k.launches() - before == 3  # two launches of partial sums, one finalize
    assert torch.equal(partials, exact_partials(k, grads, [], [], 0.0))
    assert torch.equal(norm, reference.grad_norm(g, [], [], 0.0))
    h = ints([9, n], dtype, 28)
    emu_g = placed(arena, g, 2)
    k.add_head_grads_(emu_g, placed(arena, h))
    assert_bitwise(emu_g, [a + b for a, b in zip(g, h)])
