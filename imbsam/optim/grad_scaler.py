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

What a user's loop may add, and what it gets:
- ``scaler.unscale_(optimizer)`` of their own (to clip, say), once an iteration as AMP
  allows: the phase that follows reads the gradients it unscaled, so that phase does not
  unscale them again, and the scaler's flag from it joins the step's.
- ``ImbSAM.step(closure)``: the optimizer scales the closure's losses itself.
- A step whose first phase comes with no ``scaler.scale()`` call since the last step
  (``SAM.step(closure)`` whose closure calls ``loss.backward()``, say): refused before
  anything is written, since its gradients would be divided by a scale they never had.
- ``use_grad_scaler`` twice on one optimizer: refused (each phase would unscale twice).
"""
from __future__ import annotations

import types
import weakref
from collections import defaultdict

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState
from torch.utils.hooks import RemovableHandle


class GradScalerPhases:
    """What ``use_grad_scaler`` returns: ``remove()`` detaches it from the optimizer."""

    def __init__(self, optimizer, scaler: torch.amp.GradScaler):
        self._optimizer = optimizer
        self._engine = optimizer._engine
        self._scaler = scaler
        self._found: Tensor | None = None  # this step's flag so far (nonzero: an inf somewhere)
        # What the scaler's unscale_ examines once a step: one stand-in gradient (the same
        # object every step, so a step without scaler.update() before it is refused).
        self._stand_in = types.SimpleNamespace(param_groups=[{"params": []}])
        # The scaler's per-optimizer record of the user's own unscale_ that a phase has used:
        # that gradient is unscaled once. update() starts a new record.
        self._used_unscale: dict | None = None
        self._scale_calls_seen = _scale_calls(scaler)[0]  # scale() calls when the last step ended
        self._handle: RemovableHandle = optimizer.register_phase_hook(self._before_phase)
        self._engine.helpers["grad_scaler"] = self

    def scale(self, loss: Tensor) -> Tensor:
        """``loss`` times the scaler's scale: what ``ImbSAM.step(closure)`` backpropagates."""
        return self._scaler.scale(loss)

    def _users_unscale(self) -> dict | None:
        """The scaler's record of an ``unscale_(optimizer)`` the user called since the last phase."""
        states = getattr(self._scaler, "_per_optimizer_states", None)
        state = states.get(id(self._optimizer)) if states is not None else None
        if state is None or state is self._used_unscale or state.get("stage") is not OptState.UNSCALED:
            return None
        return state

    def _check_scaled(self, phase: str) -> None:
        calls = _scale_calls(self._scaler)[0]
        if self._engine.phase == "idle" and calls == self._scale_calls_seen:
            names = self._engine.phase_names
            raise RuntimeError(
                f"imbsam: {names[phase]}() with use_grad_scaler, but no loss was scaled by the scaler since the "
                "last step: the gradients would be divided by a scale they never had. Backpropagate "
                "scaler.scale(loss) (in SAM.step's closure too: scaler.scale(loss).backward()); ImbSAM.step(closure) "
                "scales its losses itself")
        if phase == "step":
            self._scale_calls_seen = calls

    # Not traced by dynamo: host-side bookkeeping around one foreach op, and GradScaler's own
    # methods are marked untraceable; traced with graph breaks, dynamo (2.14.1) failed on it
    # after other compiled tests ("'forward' not in cell_and_freevars").
    @torch.compiler.disable
    def _before_phase(self, phase: str, params: list, grads: list) -> None:
        if not self._scaler.is_enabled() or not grads:
            return
        if self._engine.phase == "idle":  # a step begins: an abandoned one's flag is not this one's
            self._found = None
        self._check_scaled(phase)
        device = grads[0].device
        users = self._users_unscale()
        if users is not None:  # the user's unscale_ has unscaled these gradients and checked them
            self._used_unscale = users
            found = torch.zeros((), dtype=torch.float32, device=device)
            for flag in users["found_inf_per_device"].values():
                found = torch.maximum(found, flag.to(device=device, dtype=torch.float32).reshape(()))
        else:
            # The scaler's scale, read on the device (scale() multiplies by it: no host sync),
            # inverted in fp64 as GradScaler.unscale_ does.
            inv_scale = _unscaled_scale(self._scaler, device).double().reciprocal().float()
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

    def step_ended_at_perturbation(self) -> None:
        """A schedule did not sharpen the step: it ended at its perturbation phase, whose
        gradients were unscaled and checked there; the scaler learns the step's flag now."""
        found, self._found = self._found, None
        if not self._scaler.is_enabled():
            return
        self._scale_calls_seen = _scale_calls(self._scaler)[0]
        self._tell_scaler(found if found is not None else torch.zeros((), dtype=torch.float32))

    def abandoned(self) -> None:
        """The step was abandoned (``abandon_step()``): an ``unscale_`` of the user's in it, or
        the one ``scaler.step(optimizer)`` ran before it was refused, unscaled gradients that
        no phase will read; the next step's must not be taken for unscaled by it."""
        self._found = None
        states = getattr(self._scaler, "_per_optimizer_states", None)
        state = states.get(id(self._optimizer)) if states is not None else None
        if state is not None and state.get("stage") is OptState.UNSCALED:
            self._used_unscale = state

    def remove(self) -> None:
        self._handle.remove()
        if self._engine.helpers.get("grad_scaler") is self:
            del self._engine.helpers["grad_scaler"]


# Per scaler: how many times its scale() was called, counted by a wrapper installed once on
# the instance (GradScaler has no hook of its own); a phase checks that a loss was scaled.
_SCALE_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _scale_calls(scaler: torch.amp.GradScaler) -> list:
    calls = _SCALE_CALLS.get(scaler)
    if calls is None:
        calls = _SCALE_CALLS[scaler] = [0]
        scale = scaler.scale  # the class's bound method

        def counted_scale(outputs):
            calls[0] += 1
            return scale(outputs)

        counted_scale.unscaled = scale
        scaler.scale = counted_scale
    return calls


def _unscaled_scale(scaler: torch.amp.GradScaler, device) -> Tensor:
    """The scale as a device tensor, without counting as a scaled loss."""
    return scaler.scale.unscaled(torch.ones((), dtype=torch.float32, device=device))


def use_grad_scaler(optimizer, scaler: torch.amp.GradScaler) -> GradScalerPhases:
    """Makes ``optimizer`` (``imbsam.SAM``, ``imbsam.ImbSAM`` or a ``compat`` adapter) step
    with gradients scaled by ``scaler``: call it once; then scale each loss before its
    backward (``scaler.scale(loss).backward()``), call the phases as usual, and
    ``scaler.update()`` after the last one. Do not call ``scaler.unscale_`` or
    ``scaler.step`` on the optimizer (a ``scaler.unscale_(optimizer)`` of your own, to clip,
    is fine). With ``sync_data_parallel``, in either order: its average runs first, so
    that the gradients are checked after they are averaged and every rank makes the same
    skip decision."""
    if not all(hasattr(optimizer, name) for name in ("report_found_inf", "register_phase_hook", "_engine")):
        raise TypeError(f"use_grad_scaler() takes an imbsam optimizer (SAM, ImbSAM or a compat adapter), got "
                        f"{type(optimizer).__name__}")
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"use_grad_scaler() takes a torch.amp.GradScaler, got {type(scaler).__name__}")
    if "grad_scaler" in optimizer._engine.helpers:
        raise RuntimeError("use_grad_scaler() was already called on this optimizer: a second one would unscale "
                           "every gradient twice; call remove() on the first one's handle to change the scaler")
    return GradScalerPhases(optimizer, scaler)
