"""Runs a function in WORLD gloo processes on 127.0.0.1, bounded in time, with a clean exit;
and the small task the multi-process tests train.

Each rank writes what it computed to a file the test reads back; the ranks meet through
files at the end rather than a gloo barrier, and leave with os._exit.
"""
from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60  # a collective that waits longer fails the test instead of hanging it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn, args: tuple, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    fn(rank, world, f"{out}.{rank}", *args)
    # Neither rank may close its connections while the other still reads from them. A final
    # gloo barrier and destroy_process_group hung here once (torch 2.4): the ranks meet
    # through files instead, then leave without tearing anything down.
    open(f"{out}.done.{rank}", "w").close()
    deadline = time.monotonic() + TIMEOUT_S
    while not all(os.path.exists(f"{out}.done.{r}") for r in range(world)) and time.monotonic() < deadline:
        time.sleep(0.01)
    # os._exit: no C++ static destructors either, whose gloo and TCP-store threads can abort
    # a process at interpreter exit ("terminate called without an active exception").
    os._exit(0)


def run_ranks(fn, args: tuple, out: str, world: int = 2) -> list[str]:
    """Runs ``fn(rank, world, path, *args)`` on every rank (a module-level function, so that
    spawned processes can import it); returns each rank's ``path``."""
    context = mp.spawn(_rank_main, args=(world, free_port(), fn, args, out), nprocs=world, join=False)
    deadline = time.monotonic() + 3 * TIMEOUT_S
    while not context.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {3 * TIMEOUT_S} s")
    return [f"{out}.{r}" for r in range(world)]


needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed gloo")


# ---- the task the multi-process tests train, each rank on its half of every batch ----------

WORLD = 2
STEPS = 3
COUNTS = [400, 200, 100, 10, 5]  # classes 3 and 4 are tail
KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)  # the base SGD's


def mlp():
    """No BatchNorm: per-rank batch statistics would differ from whole-batch ones. Its 16 x 6
    and 5 x 16 weights split over two ranks evenly and unevenly (3 + 2 rows)."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, len(COUNTS)))


def batches():
    import torch

    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, len(COUNTS), (8,), generator=gen))
            for _ in range(STEPS)]


def scaled_imbsam_step(net, opt, split, scaler, overflow_tail=lambda: False):
    """ImbSAM's phases with every loss scaled by ``scaler`` (``use_grad_scaler`` registered),
    then ``scaler.update()``; the tail gradient overflows when ``overflow_tail()`` says so."""
    def step(x, y):
        head, tail = split(net(x), y)
        scaler.scale(head).backward(retain_graph=True)
        opt.first_step()
        scaler.scale(tail * (float("inf") if overflow_tail() else 1.0)).backward()
        opt.second_step()
        scaler.scale(split(net(x), y)[1]).backward()
        opt.third_step()
        scaler.update()
    return step
