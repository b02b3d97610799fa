"""SAM and ImbSAM on FSDP2 (``fully_shard``) models: two CPU processes (gloo on 127.0.0.1),
each with half of every batch and half of every tensor, take the step one process takes
on whole batches and whole tensors, on every backend here. The norm is the global one
(the shards' sums of squares all-reduced); the other ops run on the local shards."""
from __future__ import annotations

import pytest
import torch

import imbsam
from imbsam.train.step import make_step

from ranks import COUNTS, KW, WORLD, batches, mlp, needs_gloo, run_ranks, scaled_imbsam_step

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6 keeps it under its composable API, whose CPU use (2.4.1 seen)
    fully_shard = None  # creates CUDA streams and fails without a GPU: not testable here

# imbsam-adamw: the fused Adam(W) step on the shards; imbsam-scaled: with use_grad_scaler;
# sam-aesam, imbsam-periodic: with a sharpness schedule (the plain steps on DTensor shards, the
# AE-SAM decision from the global norm).
KINDS = ("sam", "asam", "imbsam", "imbsam-adamw", "imbsam-scaled", "sam-aesam", "imbsam-periodic")
BACKENDS = imbsam.backends.backends_for("cpu")  # the triton backend under its interpreter too


def whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def train(kind: str, backend: str, rank: int = 0, world: int = 1) -> dict:
    model = mlp()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if kind in ("imbsam", "imbsam-scaled", "imbsam-periodic"):
        schedule = imbsam.schedules.Periodic(2) if kind == "imbsam-periodic" else None
        opt = imbsam.ImbSAM(model.parameters(), torch.optim.SGD, rho=0.5, backend=backend, schedule=schedule, **KW)
    elif kind == "imbsam-adamw":
        opt = imbsam.ImbSAM(model.parameters(), torch.optim.AdamW, rho=0.5, backend=backend, lr=1e-2, amsgrad=True)
    else:
        schedule = imbsam.schedules.AESAM(total_steps=1) if kind == "sam-aesam" else None
        opt = imbsam.SAM(model.parameters(), torch.optim.SGD, rho=0.5, adaptive=kind == "asam", backend=backend,
                         schedule=schedule, **KW)
    split = imbsam.HeadTailLoss(COUNTS)
    step = make_step("imbsam" if kind.startswith("imbsam") else "sam", model, opt, split)
    if kind == "imbsam-scaled":
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=10 ** 6)
        imbsam.use_grad_scaler(opt, scaler)
        step = scaled_imbsam_step(model, opt, split, scaler)
    for x, y in batches():
        step(x[rank::world], y[rank::world])
    state = "exp_avg_sq" if kind.endswith("adamw") else "momentum_buffer"
    return dict(params=[whole(p) for p in model.parameters()],
                buffers=[whole(opt.base_optimizer.state[p][state]) for p in model.parameters()])


def _rank(rank: int, world: int, path: str) -> None:
    torch.save({(kind, backend): train(kind, backend, rank, world) for kind in KINDS for backend in BACKENDS}, path)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    paths = run_ranks(_rank, (), str(tmp_path_factory.mktemp("fsdp") / "results"), WORLD)
    return [torch.load(path) for path in paths]


@needs_gloo
@pytest.mark.skipif(fully_shard is None, reason="FSDP2 on the CPU needs torch >= 2.6 (torch.distributed.fsdp)")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_fully_sharded_training_takes_the_whole_batch_step(ranks, kind, backend):
    got, want = ranks[0][(kind, backend)], train(kind, backend)
    for key in ("params", "buffers"):
        for a, b in zip(ranks[0][(kind, backend)][key], ranks[1][(kind, backend)][key]):
            assert torch.equal(a, b)
        for a, b in zip(got[key], want[key]):
            assert torch.allclose(a, b, rtol=0, atol=1e-6), (key, (a - b).abs().max().item())
