"""torch.compile sees the custom ops through their fake kernels: a whole fused step compiles
with fullgraph=True (no graph breaks) and gives the eager result."""
from __future__ import annotations

import pytest
import torch

import imbsam

from conftest import COMPILES_MUTABLE_LISTS, fast_backend, max_err


def make_state(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda: [torch.randn(n, generator=gen).to(device) for n in (7, 300, 4099)]  # noqa: E731
    return dict(params=mk(), tail=mk(), tail2=mk(), head=mk(), backups=mk(), bufs=mk())


def imbsam_step(ops, s, lr):
    """The optimizer-side ImbSAM step on the compiled ops: norm, perturb, fused restore + SGD."""
    norm = ops.grad_norm(s["tail"], [], [], 0.01)
    ops.perturb_(s["params"], s["tail"], s["backups"], norm, 0.05, 0.01, False)
    found_inf = torch.isfinite(norm).logical_not().to(torch.float32)
    ops.restore_sgd_step_(s["params"], s["tail2"], s["backups"], s["head"], s["bufs"], 0.0, 0.9, 0.0, 1e-3,
                          False, False, False, lr, found_inf)
    return norm


@pytest.mark.skipif(not COMPILES_MUTABLE_LISTS, reason="torch < 2.5 cannot compile ops that mutate tensor lists")
@fast_backend
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager(backend, device, compile_backend):
    if backend == "triton" and compile_backend == "inductor" and device == "cpu":
        pytest.skip("inductor would compile its own Triton kernels for the CPU: not under the interpreter")
    ops = imbsam.backends.ops_for(backend)
    lr = torch.tensor(0.1, device=device)
    eager, compiled = make_state(device), make_state(device)
    torch._dynamo.reset()
    step = torch.compile(lambda s, lr: imbsam_step(ops, s, lr), fullgraph=True, backend=compile_backend)
    for _ in range(3):
        n_eager = imbsam_step(ops, eager, lr)
        n_compiled = step(compiled, lr)
    assert torch.allclose(n_eager, n_compiled)
    for key in ("params", "bufs"):
        assert max_err(compiled[key], eager[key]) < 1e-6, key
