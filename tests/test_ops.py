"""Every compiled op against the reference: dtypes, odd sizes, empty tensors, long lists."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import imbsam
from imbsam.backends import reference

from conftest import COMPILES_MUTABLE_LISTS, DTYPES, SIZES, assert_close_to_exact, fast_backend, max_err

pytestmark = fast_backend


@pytest.fixture
def ops(backend):
    """The module implementing the ops for this backend (same signatures as imbsam.backends.reference)."""
    return imbsam.backends.ops_for(backend)


def tol_dtype(backend, dtype):
    # Triton passes Python float arguments as fp32: fp64 parameters get fp32-rounded
    # hyperparameters there, so fp64 results are held to fp32's precision.
    return torch.float32 if backend == "triton" and dtype == torch.float64 else dtype


def make(sizes, dtype, device, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
            for n in sizes]


def to64(ts):
    return [t.double() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_norm(backend, device, ops, dtype, adaptive):
    grads, params = make(SIZES, dtype, device, 1), make(SIZES, dtype, device, 2)
    split = 2 if adaptive else len(grads)
    args = lambda g, p: (g[:split], g[split:], p[split:], 0.01)  # noqa: E731
    fast = ops.grad_norm(*args(grads, params))
    exact = reference.grad_norm(*args(to64(grads), to64(params)))
    assert fast.dim() == 0 and fast.device.type == device
    assert fast.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Accumulation is in double on the CPU: the norm of the stored values is nearly exact.
    rtol = 1e-12 if tol_dtype(backend, dtype) == torch.float64 else 1e-5
    assert math.isclose(fast.item(), exact.item(), rel_tol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturb(backend, device, ops, dtype, adaptive):
    params, grads = make(SIZES, dtype, device, 3), make(SIZES, dtype, device, 4)
    norm = reference.grad_norm(grads, [], [], 0.01)

    def run(impl, ps, gs, n):
        ps = [p.clone() for p in ps]
        bs = [torch.empty_like(p) for p in ps]
        impl.perturb_(ps, gs, bs, n, 0.05, 0.01, adaptive)
        return ps, bs

    fast_p, fast_b = run(ops, params, grads, norm)
    ref_p, _ = run(reference, params, grads, norm)
    exact_p, _ = run(reference, to64(params), to64(grads), norm.double())
    assert max_err(fast_b, params) == 0.0  # the backup is the exact old weight
    assert_close_to_exact(fast_p, ref_p, exact_p, tol_dtype(backend, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_is_bitwise(backend, device, ops, dtype):
    params, backups = make(SIZES, dtype, device, 5), make(SIZES, dtype, device, 6)
    ops.restore_(params, backups)
    assert all(torch.equal(p, b) for p, b in zip(params, backups))


@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_then_restore_round_trip(backend, device, ops, dtype):
    params, grads = make(SIZES, dtype, device, 7), make(SIZES, dtype, device, 8)
    original = [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    ops.perturb_(params, grads, backups, ops.grad_norm(grads, [], [], 0.01), 0.5, 0.01, False)
    assert max_err(params, original) > 0
    ops.restore_(params, backups)
    assert all(torch.equal(p, o) for p, o in zip(params, original))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_head_grads(backend, device, ops, dtype):
    grads, heads = make(SIZES, dtype, device, 9), make(SIZES, dtype, device, 10)
    fast = [g.clone() for g in grads]
    ref = [g.clone() for g in grads]
    exact = to64(grads)
    ops.add_head_grads_(fast, heads)
    reference.add_head_grads_(ref, heads)
    reference.add_head_grads_(exact, to64(heads))
    assert_close_to_exact(fast, ref, exact, tol_dtype(backend, dtype))


SGD_CASES = [
    dict(momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=False),
    dict(momentum=0.5, dampening=0.3, weight_decay=5e-2, nesterov=False, maximize=True),
    dict(momentum=0.0, dampening=0.0, weight_decay=1e-3, nesterov=False, maximize=False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SGD_CASES, ids=["momentum", "nesterov", "dampening-maximize", "plain"])
@pytest.mark.parametrize("with_head", [False, True])
@pytest.mark.parametrize("first", [False, True])
def test_restore_sgd_step(backend, device, ops, dtype, case, with_head, first):
    params, grads = make(SIZES, dtype, device, 11), make(SIZES, dtype, device, 12)
    backups, heads = make(SIZES, dtype, device, 13), make(SIZES, dtype, device, 14)
    bufs = make(SIZES, dtype, device, 15)

    def run(impl, cast):
        ps = [cast(p).clone() for p in params]
        bs = [cast(b).clone() for b in bufs] if case["momentum"] else []
        impl.restore_sgd_step_(ps, [cast(g) for g in grads], [cast(b) for b in backups],
                               [cast(h) for h in heads] if with_head else [], bs, 0.1, case["momentum"],
                               case["dampening"], case["weight_decay"], case["nesterov"], case["maximize"], first)
        return ps, bs

    same = lambda t: t  # noqa: E731
    (fp, fb), (rp, rb), (ep, eb) = run(ops, same), run(reference, same), run(reference, torch.Tensor.double)
    assert_close_to_exact(fp, rp, ep, tol_dtype(backend, dtype))
    assert_close_to_exact(fb, rb, eb, tol_dtype(backend, dtype))


def test_restore_sgd_step_found_inf_and_tensor_lr(backend, device, ops):
    params, grads, backups, bufs = (make([7, 65537], torch.float32, device, s) for s in (16, 17, 18, 19))
    ps, bs = [p.clone() for p in params], [b.clone() for b in bufs]
    ops.restore_sgd_step_(ps, grads, backups, [], bs, 0.1, 0.9, 0.0, 0.0, False, False, False,
                          found_inf=torch.ones((), device=device))
    assert all(torch.equal(p, b) for p, b in zip(ps, backups)), "skipped step must still restore"
    assert all(torch.equal(b, o) for b, o in zip(bs, bufs)), "skipped step must leave the buffers alone"
    p_float, p_tensor = [p.clone() for p in params], [p.clone() for p in params]
    ops.restore_sgd_step_(p_float, grads, backups, [], [], 0.25, 0.0, 0.0, 0.0, False, False, False)
    ops.restore_sgd_step_(p_tensor, grads, backups, [], [], 123.0, 0.0, 0.0, 0.0, False, False, False,
                          lr_tensor=torch.tensor(0.25, device=device), found_inf=torch.zeros((), device=device))
    assert all(torch.equal(a, b) for a, b in zip(p_float, p_tensor))


def test_many_tensors(backend, device, ops):
    sizes = [(i * 37) % 1000 for i in range(333)]  # more tensors than one CUDA launch holds
    params, grads = make(sizes, torch.float32, device, 20), make(sizes, torch.float32, device, 21)
    norm = ops.grad_norm(grads, [], [], 0.01)
    assert math.isclose(norm.item(), reference.grad_norm(grads, [], [], 0.01).item(), rel_tol=1e-6)
    fast, ref = [p.clone() for p in params], [p.clone() for p in params]
    for impl, ps in ((ops, fast), (reference, ref)):
        impl.perturb_(ps, grads, [torch.empty_like(p) for p in ps], norm, 0.05, 0.01, False)
    assert max_err(fast, ref) == 0.0


def test_empty_lists(backend, device, ops):
    norm = ops.grad_norm([], [], [], 0.01)
    assert norm.item() == 0.0
    ops.perturb_([], [], [], norm, 0.05, 0.01, False)
    ops.restore_([], [])
    ops.add_head_grads_([], [])
    ops.restore_sgd_step_([], [], [], [], [], 0.1, 0.9, 0.0, 0.0, False, False, True)


def test_zero_gradients_give_no_perturbation(backend, device, ops):
    params = make([7, 65537], torch.float32, device, 22)
    grads = [torch.zeros_like(p) for p in params]
    norm = ops.grad_norm(grads, [], [], 0.01)
    assert norm.item() == 0.0
    ps = [p.clone() for p in params]
    ops.perturb_(ps, grads, [torch.empty_like(p) for p in ps], norm, 0.05, 0.01, True)
    assert all(torch.equal(a, b) for a, b in zip(ps, params))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradients_leave_weights_unchanged(backend, device, ops, bad):
    params, grads = make([7, 65537], torch.float32, device, 23), make([7, 65537], torch.float32, device, 24)
    grads[1][100] = bad
    norm = ops.grad_norm(grads, [], [], 0.01)
    assert not math.isfinite(norm.item())  # documented: the norm reports it
    ps = [p.clone() for p in params]
    ops.perturb_(ps, grads, [torch.empty_like(p) for p in ps], norm, 0.05, 0.01, False)
    assert all(torch.equal(a, b) for a, b in zip(ps, params))  # documented: e = 0


def test_opcheck(backend, device, ops):
    # torch < 2.5 cannot trace ops that mutate tensor lists (see conftest): the other checks still run.
    utils = None if COMPILES_MUTABLE_LISTS else ("test_schema", "test_autograd_registration", "test_faketensor")
    opcheck = functools.partial(torch.library.opcheck, **({"test_utils": utils} if utils else {}))
    prefix = "triton_" if backend == "triton" else ""
    op = lambda name: getattr(torch.ops.imbsam, prefix + name).default  # noqa: E731
    p, g, b, h, m = (make([7, 300], torch.float32, device, s) for s in range(30, 35))
    norm = op("grad_norm")(g, [], [], 0.01)
    opcheck(op("grad_norm"), (g, g[:1], p[:1], 0.01))
    opcheck(op("perturb_"), (p, g, b, norm, 0.05, 0.01, True))
    opcheck(op("restore_"), (p, b))
    opcheck(op("add_head_grads_"), (g, h))
    opcheck(op("restore_sgd_step_"), (p, g, b, h, m, 0.1, 0.9, 0.0, 1e-3, True, False, False),
            dict(lr_tensor=torch.tensor(0.1, device=device), found_inf=torch.zeros((), device=device)))


def views(values, device, misalign):
    """Each tensor as a view into a buffer of its own, one element in where misalign[i]
    (4 or 8 bytes: off the 16-byte alignment the vector paths need)."""
    out = []
    for v, off in zip(values, misalign):
        buf = torch.zeros(v.numel() + 1, dtype=v.dtype, device=device)
        view = buf[int(off):int(off) + v.numel()]
        view.copy_(v)
        out.append(view)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_misaligned_tensors_beside_aligned_ones(backend, device, ops, dtype):
    sizes = [65537, 7, 278011, 1000]
    misalign = [False, True, False, True]  # a gradient that is a view into a bucket, say
    w0, g, b, buf0 = (make(sizes, dtype, "cpu", s) for s in (30, 31, 32, 33))
    args = (0.1, 0.9, 0.0, 1e-3, True, False, False)
    fast_w, fast_buf = views(w0, device, misalign), views(buf0, device, [not m for m in misalign])
    ops.restore_sgd_step_(fast_w, views(g, device, misalign), views(b, device, misalign), [], fast_buf, *args)
    ref_w, ref_buf = [t.clone() for t in w0], [t.clone() for t in buf0]
    reference.restore_sgd_step_(ref_w, g, b, [], ref_buf, *args)
    # A few roundings of the values' scale (|w| and |buf| stay below about 6 here).
    tol = 4 * torch.finfo(tol_dtype(backend, dtype)).eps * 6
    assert max_err(fast_w, ref_w) <= tol and max_err(fast_buf, ref_buf) <= tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_results_do_not_depend_on_the_thread_count(backend, device, ops, dtype):
    """The cpp kernels split a list into fixed chunks and spread them over the threads (a
    list under 256 Ki elements runs on the calling thread): 1 thread and 2 give the same
    bits, the norm included. CI's workers run one thread each; this test runs both counts."""
    if backend != "cpp":
        pytest.skip("the thread count is the cpp backend's")
    sizes = [300001, 65537, 7, 0, 200000]  # over the serial threshold, several chunks per tensor

    def run():
        ps, gs, bs = make(sizes, dtype, device, 21), make(sizes, dtype, device, 22), make(sizes, dtype, device, 23)
        heads, bufs = make(sizes, dtype, device, 24), make(sizes, dtype, device, 25)
        norm = ops.grad_norm(gs, [], [], 0.01)
        ops.perturb_(ps, gs, bs, norm, 0.05, 0.01, False)
        ops.restore_sgd_step_(ps, gs, bs, heads, bufs, 0.1, 0.9, 0.0, 1e-3, False, False, False)
        return [norm, *ps, *bufs]

    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))
