"""GPU-only checks (skipped without CUDA): whole SAM / ImbSAM steps captured in a CUDA
graph replay like eager, and the fused path never synchronises with the host.

The op and trajectory matrices of test_ops.py / test_optimizers.py run on the GPU too:
their backend list gains ("cuda", "cuda") and ("triton", "cuda") there.
"""
from __future__ import annotations

import copy

import pytest
import torch

import imbsam
from imbsam.train.step import make_step

from conftest import max_err
from models import small_cnn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_BACKENDS = imbsam.backends.backends_for("cuda", fast_only=True)
COUNTS = [500, 400, 300, 200, 150, 100, 60, 15, 10, 5]


# The fused base steps: SGD, and AdamW with its step counts on the device (capturable).
BASES = {"sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
         "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2, capturable=True))}


def make_opt(kind, model, backend, base="sgd"):
    cls = imbsam.ImbSAM if kind == "imbsam" else imbsam.SAM
    optimizer, kw = BASES[base]
    return cls(model.parameters(), optimizer, rho=0.05, backend=backend, **kw)


def full_step(kind, model, opt, split, x, y):
    make_step(kind, model, opt, split)(x, y)


def on_a_side_stream(step) -> None:
    """Runs ``step()`` as the CUDA-graph recipe warms up: on a side stream the current one waits for."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
@pytest.mark.parametrize("base", list(BASES))
def test_cuda_graph_replay_matches_eager(backend, kind, base):
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 8, 8, generator=gen).cuda(), torch.randint(0, 10, (16,), generator=gen).cuda())
               for _ in range(6)]
    model = small_cnn().cuda()
    eager_model = copy.deepcopy(model)
    opt, eager_opt = make_opt(kind, model, backend, base), make_opt(kind, eager_model, backend, base)
    split = imbsam.HeadTailLoss(COUNTS).cuda()
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()

    # Warm up on a side stream (allocations, momentum buffers, table caches), as the
    # CUDA-graph recipe asks; the eager twin takes the same steps.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:3]:
            static_x.copy_(x), static_y.copy_(y)
            full_step(kind, model, opt, split, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in batches[:3]:
        full_step(kind, eager_model, eager_opt, split, x, y)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        full_step(kind, model, opt, split, static_x, static_y)
    for x, y in batches[3:]:
        static_x.copy_(x), static_y.copy_(y)
        graph.replay()
        full_step(kind, eager_model, eager_opt, split, x, y)
    torch.cuda.synchronize()
    assert max_err(model.parameters(), eager_model.parameters()) < 1e-4
    assert max_err(model.buffers(), eager_model.buffers()) < 1e-4


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("base", list(BASES))
def test_fused_step_does_not_sync(backend, base):
    model = small_cnn().cuda()
    opt = make_opt("imbsam", model, backend, base)
    split = imbsam.HeadTailLoss(COUNTS).cuda()
    x, y = torch.randn(16, 3, 8, 8, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    full_step("imbsam", model, opt, split, x, y)  # first step allocates

    def no_sync(phase):  # any host synchronisation inside the phase raises
        torch.cuda.set_sync_debug_mode("error")
        try:
            phase()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    head, tail = split(model(x), y)
    head.backward(retain_graph=True)
    no_sync(opt.first_step)
    tail.backward()
    no_sync(opt.second_step)
    split(model(x), y)[1].backward()
    no_sync(opt.third_step)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_finite_gradient_is_skipped_on_the_device(backend):
    model = small_cnn().cuda()
    opt = make_opt("sam", model, backend)
    x, y = torch.randn(16, 3, 8, 8, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    full_step("sam", model, opt, None, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    x[0, 0, 0, 0] = float("inf")
    full_step("sam", model, opt, None, x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


@pytest.mark.skipif("triton" not in GPU_BACKENDS, reason="needs the triton backend on CUDA")
def test_triton_tables_outlive_a_captured_graph():
    """The address tables a graph captured stay alive when the table cache moves on."""
    from imbsam.backends.triton import ops as triton_ops
    from imbsam.backends.triton import tables

    model = small_cnn().cuda()
    eager_model = copy.deepcopy(model)
    opt, eager_opt = make_opt("sam", model, "triton"), make_opt("sam", eager_model, "triton")
    x, y = torch.randn(16, 3, 8, 8, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    on_a_side_stream(lambda: full_step("sam", model, opt, None, x, y))
    full_step("sam", eager_model, eager_opt, None, x, y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        full_step("sam", model, opt, None, x, y)
    # Push every entry out of the cache, free its memory and write over what was freed.
    pairs = [(torch.randn(5, device="cuda"), torch.randn(5, device="cuda"))  # alive: distinct addresses
             for _ in range(2 * tables.PLANS_SIZE)]
    for a, b in pairs:
        triton_ops.restore_([a], [b])
    torch.cuda.synchronize()
    del pairs
    junk = [torch.full((64,), -1, dtype=torch.int64, device="cuda") for _ in range(1000)]
    for _ in range(3):
        graph.replay()
        full_step("sam", eager_model, eager_opt, None, x, y)
    torch.cuda.synchronize()
    del junk
    assert max_err(model.parameters(), eager_model.parameters()) < 1e-4


def test_the_cuda_kernels_have_an_image_for_this_gpu():
    # An empty reason: the library was built for this GPU's architecture (or PTX it JITs).
    assert torch.ops.imbsam.cuda_kernel_image_error(torch.cuda.current_device()) == ""
    assert "cuda" in imbsam.available_backends()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fp32_updates_round_like_the_reference_bit_for_bit(backend):
    # No fused multiply-add (nvcc --fmad=false, Triton's enable_fp_fusion=False): the
    # GPU rounds w + scale * g and w - lr * d as the reference does, on the same GPU.
    from imbsam import backends
    from imbsam.backends import reference

    ops = backends.ops_for(backend)
    gen = torch.Generator().manual_seed(3)
    sizes = [1, 7, 65537, 278011]
    w0, g, h, b, buf0 = ([torch.randn(n, generator=gen).cuda() for n in sizes] for _ in range(5))
    norm = reference.grad_norm(g, [], [], 0.0)
    for adaptive in (False, True):
        fast_w, ref_w = [t.clone() for t in w0], [t.clone() for t in w0]
        ops.perturb_(fast_w, g, [torch.empty_like(t) for t in w0], norm, 0.05, 0.01, adaptive)
        reference.perturb_(ref_w, g, [torch.empty_like(t) for t in w0], norm, 0.05, 0.01, adaptive)
        assert all(torch.equal(x, y) for x, y in zip(fast_w, ref_w)), (backend, adaptive)
    args = (0.1, 0.9, 0.0, 5e-4, True, False, False)
    fast_w, ref_w = [t.clone() for t in w0], [t.clone() for t in w0]
    fast_buf, ref_buf = [t.clone() for t in buf0], [t.clone() for t in buf0]
    ops.restore_sgd_step_(fast_w, g, b, h, fast_buf, *args)
    reference.restore_sgd_step_(ref_w, g, b, h, ref_buf, *args)
    assert all(torch.equal(x, y) for x, y in zip(fast_w + fast_buf, ref_w + ref_buf)), backend


@pytest.mark.skipif("triton" not in GPU_BACKENDS, reason="needs the triton backend on CUDA")
def test_triton_tables_built_in_a_capture_stay_out_of_the_eager_cache():
    # A capture's table copies run only at replay: an eager call must never read them.
    from imbsam.backends.triton import ops as triton_ops
    from imbsam.backends.triton import tables

    a, b = torch.randn(70001, device="cuda"), torch.randn(70001, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_ops.restore_([a], [b])
    in_eager = [k for k in tables.PLANS if a.data_ptr() in k[1]]
    in_capture = [k for k in tables.CAPTURE_PLANS if a.data_ptr() in k[1]]
    assert not in_eager and in_capture
    b.fill_(3.0)
    graph.replay()
    torch.cuda.synchronize()
    assert (a == 3.0).all()
    b.fill_(5.0)
    triton_ops.restore_([a], [b])  # eager: builds its own tables
    torch.cuda.synchronize()
    assert (a == 5.0).all()


@pytest.mark.skipif("triton" not in GPU_BACKENDS, reason="needs the triton backend on CUDA")
def test_triton_tables_built_on_one_stream_are_used_safely_on_another():
    from imbsam.backends.triton import ops as triton_ops

    a, b = torch.zeros(300001, device="cuda"), torch.randn(300001, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        triton_ops.restore_([a], [b])  # the tables are built (copied) on the side stream
    a.zero_()  # on the default stream, which has not waited for the side stream yet
    torch.cuda.current_stream().wait_stream(side)
    triton_ops.restore_([a], [b])  # the same tables, now on the default stream
    torch.cuda.synchronize()
    assert torch.equal(a, b)


@pytest.mark.skipif("triton" not in GPU_BACKENDS or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_runs_on_the_tensors_device_not_the_current_one():
    from imbsam.backends.triton import ops as triton_ops

    a, b = torch.zeros(1000, device="cuda:1"), torch.randn(1000, device="cuda:1")
    with torch.cuda.device(0):
        triton_ops.restore_([a], [b])
    torch.cuda.synchronize(1)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_a_capture_of_adam_with_cpu_step_counts_is_refused(backend):
    """Plain Adam keeps its step counts on the CPU: a graph would replay no increment."""
    model = small_cnn().cuda()
    opt = imbsam.SAM(model.parameters(), torch.optim.Adam, rho=0.05, backend=backend, lr=1e-3)
    split = imbsam.HeadTailLoss(COUNTS).cuda()
    x, y = torch.randn(16, 3, 8, 8, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    on_a_side_stream(lambda: full_step("sam", model, opt, split, x, y))
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable=True"):
        with torch.cuda.graph(graph):
            full_step("sam", model, opt, split, x, y)
    opt.abandon_step()
