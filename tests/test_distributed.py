"""Data-parallel training through the phase hooks: two CPU processes (gloo), each with half
of every batch, all-reduce the gradients in a phase hook and end with the weights that
one process training on whole batches reaches.

This is the hook's contract for DDP-style use: the global norm, the perturbation and the
step all see the averaged gradients, so every rank takes the same step.
"""
from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import imbsam
from imbsam.train.step import make_step

WORLD = 2
STEPS = 3
COUNTS = [400, 200, 100, 10, 5]  # classes 3 and 4 are tail
KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
TIMEOUT_S = 60


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)  # no BatchNorm: per-rank batch statistics would differ from whole-batch ones
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, len(COUNTS)))


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, len(COUNTS), (8,), generator=gen))
            for _ in range(STEPS)]


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


def _rank_main(rank: int, port: int, kind: str, backend: str, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    # A collective that waits longer than this fails the test instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    params = train(kind, backend, rank, WORLD)
    torch.save(params, f"{out}.{rank}")
    # Neither rank may close its connections while the other still reads from them. A final
    # gloo barrier and destroy_process_group hung here once (torch 2.4): the ranks meet
    # through files instead, then leave without tearing anything down.
    open(f"{out}.done.{rank}", "w").close()
    deadline = time.monotonic() + TIMEOUT_S
    while not all(os.path.exists(f"{out}.done.{r}") for r in range(WORLD)) and time.monotonic() < deadline:
        time.sleep(0.01)
    # os._exit: no C++ static destructors either, whose gloo and TCP-store threads can abort
    # a process at interpreter exit ("terminate called without an active exception").
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("backend", [b for b in ("reference", "cpp") if b in imbsam.available_backends()])
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_two_ranks_with_an_all_reduce_hook_match_one_process(tmp_path, kind, backend):
    out = str(tmp_path / "params")
    context = mp.spawn(_rank_main, args=(free_port(), kind, backend, out), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 3 * TIMEOUT_S
    while not context.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {3 * TIMEOUT_S} s")
    whole_batches = train(kind, backend)
    ranks = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    for a, b in zip(*ranks):
        assert torch.equal(a, b)  # every rank took the same step
    for got, want in zip(ranks[0], whole_batches):
        assert torch.allclose(got, want, rtol=0, atol=1e-6)
    # and the step moved the weights: the comparison is not between two untouched models
    assert any(not torch.equal(p, q) for p, q in zip(whole_batches, mlp().parameters()))
