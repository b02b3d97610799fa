"""Keeping normalisation layers' running statistics out of SAM's perturbed forward.

A SAM step runs the model twice on one batch, the second time at the perturbed weights
``w + e``; in training mode BatchNorm updates its running mean and variance in both, so
the statistics used at test time drift toward those of weights the model never takes.
The paper's recipe updates them in both forwards (the default everywhere here);
davda54/sam's users often keep them from the second. ``frozen_running_stats`` does that
exactly: inside it the layers normalise with their batch statistics as usual, and their
running statistics (and batch counters) come out bit for bit as they went in.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# The buffers of torch's normalisation layers that a training-mode forward updates.
RUNNING_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def frozen_running_stats(model: torch.nn.Module) -> Iterator[None]:
    """Forwards inside leave every running-statistics buffer of ``model`` as it was
    (BatchNorm, SyncBatchNorm, InstanceNorm with ``track_running_stats``).

    Each buffer is swapped for a copy that the forwards update, and put back on exit: the
    buffer itself is never written, not even its autograd version counter (the forward's
    backward saves the tensor it normalised with, so writing the buffer back in place
    would break that backward). On the device, with no host sync."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"frozen_running_stats() takes the model (a torch.nn.Module) whose normalisation layers "
                        f"keep their statistics, got {type(model).__name__}")
    swapped = []
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if name in RUNNING_BUFFERS and buffer is not None:
                swapped.append((module, name, buffer))
                setattr(module, name, buffer.clone())
    try:
        yield
    finally:
        for module, name, buffer in swapped:
            setattr(module, name, buffer)

