"""Data-parallel training through the phase hooks: two CPU processes (gloo), each with half
of every batch, all-reduce the gradients in a phase hook and end with the weights that
one process training on whole batches reaches.

This is the hook's contract for DDP-style use: the global norm, the perturbation and the
step all see the averaged gradients, so every rank takes the same step.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import imbsam
from imbsam.train.step import make_step

from ranks import COUNTS, KW, WORLD, batches, mlp, needs_gloo, run_ranks


def train(kind: str, backend: str, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    model = mlp()
    cls = imbsam.ImbSAM if kind == "imbsam" else imbsam.SAM
    opt = cls(model.parameters(), torch.optim.SGD, rho=0.5, backend=backend, **KW)
    if world > 1:
        def average(phase, params, grads):  # the all-reduce a DDP setup does, once per phase
            for g in grads:
                dist.all_reduce(g)
                g.div_(world)
        opt.register_phase_hook(average)
    step = make_step(kind, model, opt, imbsam.HeadTailLoss(COUNTS))
    for x, y in batches():
        # Each rank's loss is the mean over its half; the average over ranks is the whole-batch mean.
        step(x[rank::world], y[rank::world])
    return [p.detach().clone() for p in model.parameters()]


def _rank(rank: int, world: int, path: str, kind: str, backend: str) -> None:
    torch.save(train(kind, backend, rank, world), path)


@needs_gloo
@pytest.mark.parametrize("backend", [b for b in ("reference", "cpp") if b in imbsam.available_backends()])
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_two_ranks_with_an_all_reduce_hook_match_one_process(tmp_path, kind, backend):
    paths = run_ranks(_rank, (kind, backend), str(tmp_path / "params"), WORLD)
    whole_batches = train(kind, backend)
    ranks = [torch.load(path) for path in paths]
    for a, b in zip(*ranks):
        assert torch.equal(a, b)  # every rank took the same step
    for got, want in zip(ranks[0], whole_batches):
        assert torch.allclose(got, want, rtol=0, atol=1e-6)
    # and the step moved the weights: the comparison is not between two untouched models
    assert any(not torch.equal(p, q) for p, q in zip(whole_batches, mlp().parameters()))
