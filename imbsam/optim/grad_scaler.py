"""SAM and ImbSAM with ``torch.amp.GradScaler`` (fp16 mixed precision): every phase reads
unscaled gradients, an inf or NaN in any phase skips the whole step, and the scaler
backs off, all decided on the device.

GradScaler's own ``unscale_`` / ``step`` assume one backward and one ``optimizer.step()``
an iteration: the second ``unscale_`` of an iteration raises, and ``step`` cannot run
SAM's phases. ``use_grad_scaler`` instead unscales, before each phase reads them, the
gradients that phase reads (ImbSAM's ``g_H`` at its head phase, ``g`` / ``g_T`` at the
perturbation, ``g'`` at the step), each once, checks them for infs in the same pass, and
reports what it found to the optimizer (``report_found_inf``). At the last phase it
hands the step's combined flag to the scaler through its public ``unscale_``, so that
``scaler.update()`` (once an iteration, as in plain AMP) backs off after a skipped step
and grows the scale after a run of good ones.
"""
from __future__ import annotations

import types
from collections import defaultdict

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle


class GradScalerPhases:
    """What ``use_grad_scaler`` returns: ``remove()`` detaches it from the optimizer."""

    def __init__(self, optimizer, scaler: torch.amp.GradScaler):
        self._optimizer = optimizer
        self._scaler = scaler
        self._found: Tensor | None = None  # this step's flag so far (nonzero: an inf somewhere)
        # What the scaler's unscale_ examines once a step: one stand-in gradient (the same
        # object every step, so a step without scaler.update() before it is refused).
        self._stand_in = types.SimpleNamespace(param_groups=[{"params": []}])
        self._handle: RemovableHandle = optimizer.register_phase_hook(self._before_phase)

    def _before_phase(self, phase: str, params: list, grads: list) -> None:
        if not self._scaler.is_enabled() or not grads:
            return
        device = grads[0].device
        # The scaler's scale, read on the device (scale() multiplies by it: no host sync),
        # inverted in fp64 as GradScaler.unscale_ does.
        inv_scale = self._scaler.scale(torch.ones((), dtype=torch.float32, device=device)).double().reciprocal().float()
        found = torch.zeros((), dtype=torch.float32, device=device)
        by_dtype: dict = defaultdict(list)
        for g in grads:
            by_dtype[g.dtype].append(g)
        for same in by_dtype.values():  # the fused op takes one dtype at a time
            torch._amp_foreach_non_finite_check_and_unscale_(same, found, inv_scale)
        self._optimizer.report_found_inf(found)
        if phase == "head" or phase == "perturb":
            self._found = found if self._found is None else torch.maximum(self._found, found)
            return
        step_found = found if self._found is None else torch.maximum(self._found, found)
        self._found = None
        self._tell_scaler(step_found)

    def _tell_scaler(self, found: Tensor) -> None:
        # GradScaler learns of infs only from the gradients its unscale_ examines: it is
        # handed one stand-in gradient, inf when this step found one and 0 otherwise.
        flag = torch.where(found != 0, torch.full_like(found, float("inf")), torch.zeros_like(found))
        param = torch.zeros(1, dtype=torch.float32, device=found.device)
        param.grad = flag.reshape(1)
        self._stand_in.param_groups[0]["params"] = [param]
        self._scaler.unscale_(self._stand_in)

    def remove(self) -> None:
        self._handle.remove()


def use_grad_scaler(optimizer, scaler: torch.amp.GradScaler) -> GradScalerPhases:
    """Makes ``optimizer`` (``imbsam.SAM``, ``imbsam.ImbSAM`` or a ``compat`` adapter) step
    with gradients scaled by ``scaler``: call it once; then scale each loss before its
    backward (``scaler.scale(loss).backward()``), call the phases as usual, and
    ``scaler.update()`` after the last one. Do not call ``scaler.unscale_`` or
    ``scaler.step`` on the optimizer. With ``sync_data_parallel``, call that first: the
    gradients are averaged over the ranks before they are checked, so that every rank
    makes the same skip decision."""
    if not hasattr(optimizer, "report_found_inf") or not hasattr(optimizer, "register_phase_hook"):
        raise TypeError(f"use_grad_scaler() takes an imbsam optimizer (SAM, ImbSAM or a compat adapter), got "
                        f"{type(optimizer).__name__}")
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"use_grad_scaler() takes a torch.amp.GradScaler, got {type(scaler).__name__}")
    return GradScalerPhases(optimizer, scaler)
