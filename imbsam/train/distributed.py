"""Data-parallel training under ``torchrun`` (or any launcher that sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT): every rank holds the whole dataset on its
device and draws the same global batches (one seed), augments them alike, and trains on
its share of each (``x[rank::world]``), so that the ranks take together the step one
process takes on the global batch. Only rank 0 writes (log, checkpoints, metrics,
plots); every rank reads the checkpoint it resumes from.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

# A collective that waits longer than this fails the run instead of hanging it.
TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def from_environment() -> Ranks:
    """The launcher's ranks (one process when WORLD_SIZE is unset or 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def device_of_rank(ranks: Ranks, device: torch.device) -> torch.device:
    """One GPU per process: rank ``r`` of a node takes ``cuda:LOCAL_RANK``."""
    if ranks.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", ranks.local_rank)
    return device


def start(ranks: Ranks, device: torch.device) -> bool:
    """Joins the process group (NCCL on GPUs, gloo on the CPU); True if this call made it."""
    if not ranks.distributed or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ranks.rank, world_size=ranks.world,
                            timeout=TIMEOUT)
    return True


def leave_the_process(ranks: Ranks) -> None:
    """Ends a rank of a finished distributed run without the interpreter's teardown.

    Why: gloo's worker threads free a collective's work object (and the tensors it held)
    after the collective has returned, which needs the GIL for the tensors' Python objects;
    a worker that asks for it while the interpreter finalizes is ended by Python, and the
    unwind through a C++ destructor aborts the process ("terminate called without an active
    exception", SIGABRT, after all output was written: torch 2.14.1, about 1 run in 30 of
    ``torchrun ... -m imbsam.train`` on a loaded 2-core machine; the core's backtrace is in
    results/quickstart/torchrun_abort_2026-12-05.txt). Leaving with ``os._exit`` after
    flushing, as the multi-process tests do, skips that race; a single process returns."""
    if not ranks.distributed:
        return
    import logging
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def agree(ranks: Ranks, decision: bool, device: torch.device) -> bool:
    """Rank 0's decision, on every rank (a stop by wall time may differ between ranks)."""
    if not ranks.distributed:
        return decision
    flag = torch.tensor([1.0 if decision else 0.0], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def sum_over_ranks(ranks: Ranks, t: Tensor) -> Tensor:
    if ranks.distributed:
        dist.all_reduce(t)
    return t


class ShardedLoader:
    """Each global batch of ``loader``, this rank's share of it. The last batch of an epoch
    may not split evenly (a rank then holds one image more): ``loss_weight`` is what a
    share's mean loss is multiplied by so that the ranks' averaged gradient is the global
    batch's mean, as one process computes it."""

    def __init__(self, loader, ranks: Ranks):
        self.loader, self.ranks = loader, ranks
        self.labels = loader.labels  # what train_epoch reads the device from
        self._global_size = 0

    def loss_weight(self, local_size: int) -> float:
        return self.ranks.world * local_size / self._global_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        r, w = self.ranks.rank, self.ranks.world
        for x, y in self.loader:
            self._global_size = len(y)
            yield x[r::w], y[r::w]
