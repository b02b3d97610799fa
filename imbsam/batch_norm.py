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
import functools
from typing import Iterator

import torch
import torch.nn.functional as F

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


class BatchStatistics:
    """BatchNorm's batch statistics of one forward, kept to normalise later forwards by them.

    ``with stats.recorded(model): model(x)`` keeps, for every BatchNorm layer in training
    mode, the mean and (biased) variance it normalised ``x``'s activations with;
    ``with stats.applied(model): model(part)`` then normalises each layer's input by those
    instead of the part's own, and updates no running statistics. ImbSAM's tail passes on
    the tail samples alone use it: a handful of samples' own statistics are far from the
    batch's (with their own, tail classes were not learned at all: Few 0 % after 4 epochs
    where the whole-batch passes reach 84 % in 3). The kept statistics are constants of the
    later forwards: no gradient flows through them, where the whole batch's forward passes
    one through its statistics to every sample. Detached, on the device, no host sync."""

    def __init__(self):
        self._stats: dict[int, tuple] = {}  # id(layer) -> (mean, var) of the recorded forward

    @staticmethod
    def _layers(model: torch.nn.Module):
        return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]

    @contextlib.contextmanager
    def recorded(self, model: torch.nn.Module) -> Iterator[None]:
        def record(layer, args):
            x = args[0].detach()
            dims = [d for d in range(x.dim()) if d != 1]
            var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
            self._stats[id(layer)] = (mean, var)
        handles = [layer.register_forward_pre_hook(record) for layer in self._layers(model)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        layers = self._layers(model)
        missing = [layer for layer in layers if id(layer) not in self._stats]
        if missing:
            raise RuntimeError(f"imbsam.BatchStatistics: {len(missing)} BatchNorm layer(s) have no recorded "
                               "statistics; record a forward of the whole batch first")
        def normalise(layer, x):
            mean, var = self._stats[id(layer)]
            # As eval mode does with its running statistics: the recorded ones stand in for them.
            return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), layer.weight, layer.bias, False, 0.0,
                                layer.eps)
        own = {layer: vars(layer).get("forward") for layer in layers}  # a forward set on the instance, if any
        for layer in layers:
            layer.forward = functools.partial(normalise, layer)  # the instance's, before the class's
        try:
            yield
        finally:
            for layer, forward in own.items():
                if forward is None:
                    del layer.forward  # the class's forward again
                else:
                    layer.forward = forward
