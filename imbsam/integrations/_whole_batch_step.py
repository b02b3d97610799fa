"""One SAM / ASAM / ImbSAM step on a whole batch, for loops that call ``optimizer.step()``
themselves (timm's, Accelerate's): the passes, then the loop's own unscale, clip and step.

Every backward is scaled alike (a GradScaler's scale, or none); the perturbation reads the
scaled gradient (e is a direction times rho: the same for any power-of-two scale); ImbSAM's
g_H is added into ``.grad`` after the pass at w + e, so the one gradient the loop unscales,
checks for infs and clips is the one the base step uses (an inf in any pass ends up in it);
the loop's step ends the step inside ``finishing_by_step()``, and a step it skips leaves the
weights at w.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from imbsam.batch_norm import frozen_running_stats
from imbsam.integrations._refusals import refuse_schedule_and_grad_scaler
from imbsam.optim import SAM, ImbSAM


def check_optimizer(optimizer, caller: str, names: str) -> None:
    if not isinstance(optimizer, (SAM, ImbSAM)):
        raise TypeError(f"{caller} takes an imbsam.SAM or imbsam.ImbSAM ({names}), got {type(optimizer).__name__}: "
                        "for another optimizer keep the loop's own step")
    refuse_schedule_and_grad_scaler(optimizer, caller)


def whole_batch_step(model: torch.nn.Module, optimizer, loss_fn, inputs, targets, *,
                     scale: Callable, backward: Callable, before_step: Callable, step: Callable,
                     autocast=contextlib.nullcontext, frozen_bn_stats: bool = False) -> torch.Tensor:
    """The step's passes and ending; returns the loss at w (detached).

    ``scale(loss)``: the loss as the loop backpropagates it (times the scale); ``backward(t)``
    runs ``t.backward()`` on a scaled loss (``retain_graph=True`` when asked); ``before_step()``:
    the loop's unscale and clip of ``.grad``; ``step()``: the loop's optimizer step (a
    GradScaler's ``step`` and ``update``). ``loss_fn(output, target)``: the loss, or ImbSAM's
    ``(head, tail)``.
    """
    imbsam_step = isinstance(optimizer, ImbSAM)
    if imbsam_step and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        # Its head and tail backwards go through one DDP forward, which DDP reduces once.
        raise RuntimeError("imbsam: ImbSAM's step on a DistributedDataParallel model is not supported by this "
                           "step function yet (the tail's backward goes through the forward the head's used, which "
                           "DDP reduces once): write the loop with imbsam.sync_data_parallel (README, 'Distributed "
                           "and mixed precision'); SAM and ASAM run here under DDP")
    optimizer.zero_grad(set_to_none=True)
    try:
        with autocast():
            first = loss_fn(model(inputs), targets)
        _check_losses(first, imbsam_step)  # before any backward
        if imbsam_step:
            head, tail = first
            backward(scale(head), retain_graph=True)
            optimizer.first_step()  # g_H set aside
            backward(scale(tail))
            optimizer.second_step()  # w + e from g_T
            loss = head + tail
        else:
            loss = first
            backward(scale(loss))
            optimizer.first_step()
        with frozen_running_stats(model) if frozen_bn_stats else contextlib.nullcontext():
            with autocast():
                again = loss_fn(model(inputs), targets)
        backward(scale(again[1] if imbsam_step else again))
        if imbsam_step:
            optimizer._engine.fold_head_grads()  # .grad: g_H + g_T', each scaled alike
        before_step()
        with optimizer.finishing_by_step():
            step()
    finally:
        if optimizer._engine.phase != "idle":  # an error, or a step the scaler skipped: back to w
            optimizer.abandon_step()
    return loss.detach()


def _check_losses(losses, imbsam_step: bool) -> None:
    if imbsam_step and not (isinstance(losses, (tuple, list)) and len(losses) == 2):
        raise TypeError("imbsam: with ImbSAM, loss_fn(output, target) returns (head_loss, tail_loss), e.g. "
                        f"imbsam.HeadTailLoss; it returned {type(losses).__name__}")
    if not imbsam_step and not (isinstance(losses, torch.Tensor) and losses.dim() == 0):
        got = f"a tensor of shape {tuple(losses.shape)}" if isinstance(losses, torch.Tensor) else \
            type(losses).__name__
        raise TypeError(f"imbsam: with SAM, loss_fn(output, target) returns the loss, one number (a 0-d tensor); "
                        f"it returned {got} (imbsam.HeadTailLoss's pair is ImbSAM's)")
