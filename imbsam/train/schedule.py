"""The cosine learning-rate schedule, in the two orders a training loop can step it.

``lr(t) = lr0 * (1 + cos(pi * t / T)) / 2`` over ``T`` epochs (``CosineAnnealingLR``, to 0):

* ``paper``: the paper's loop steps the scheduler at the start of each epoch, so its
  epochs run at ``lr(1) ... lr(T)``: the first below ``lr0``, the last at 0.
* ``torch``: stepped after each epoch, as torch documents, the epochs run at
  ``lr(0) ... lr(T-1)``: the first at ``lr0``, none at 0.

Over 200 epochs the two differ by one epoch; over a 3-epoch demo ``paper`` spends a third
of the run at lr 0.
"""
from __future__ import annotations

import warnings

import torch

LR_SCHEDULES = ("paper", "torch")
DEFAULT_LR_SCHEDULE = "paper"  # the defaults are the paper's CIFAR-100-LT recipe
# What runs saved before the option existed used: their recorded args have no lr_schedule.
LR_SCHEDULE_OF_OLDER_RUNS = "torch"


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int, order: str):
    """A ``CosineAnnealingLR`` to 0 over ``epochs``, to be stepped after each epoch; for
    ``paper`` it has taken its first step already, which is the paper's step before epoch 1."""
    if order not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, got {order!r}")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0.0)
    if order == "paper":
        with warnings.catch_warnings():
            # torch warns of a scheduler step before any optimizer step: here that is the point.
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step",
                                    category=UserWarning)
            scheduler.step()
    return scheduler
