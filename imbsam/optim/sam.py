"""imbsam.SAM: Sharpness-Aware Minimization (and ASAM with ``adaptive=True``)."""
from __future__ import annotations

import torch

from imbsam.optim._wrapper import SharpnessOptimizer


class SAM(SharpnessOptimizer):
    r"""SAM (Foret et al., 2021) around any base optimizer; ``torch.optim.SGD`` takes a fused path.

    One step: ``e = rho * g / (||g|| + 1e-16)`` (global norm), ``w <- w + e``, a second
    gradient ``g'`` at ``w + e``, then ``w <- w - e`` (bitwise: a restore from a backup)
    and the base step with ``g'``. With ``adaptive=True`` (ASAM, Kwon et al., 2021)
    ``e = rho * T^2 g / ||T g||`` with ``T = |w| + adaptive_eta`` on tensors of two or
    more dimensions and ``T = 1`` on biases and normalisation parameters.

    Two ways to use it::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

        def closure():
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``, ``adaptive``).
        base_optimizer: an optimizer class, e.g. ``torch.optim.SGD``; ``**kwargs`` go to it.
        rho: the neighbourhood radius, a finite float >= 0.
        adaptive: ASAM's scale-invariant neighbourhood.
        adaptive_eta: ASAM's ``eta`` in ``T = |w| + eta``.
        backend: ``"auto"``, ``"reference"``, ``"cpp"``, ``"cuda"`` or ``"triton"`` (see
            ``imbsam.available_backends()``).
        schedule: which steps sharpen (``imbsam.schedules``: ``Periodic``, ``Bernoulli``,
            ``AESAM``); None, every step.

    A non-finite first gradient skips the whole step: weights and momentum are left as
    they were (on the fused SGD path this is decided on the device, with no host sync).
    The phases must run in order (a RuntimeError says which is due); ``abandon_step()``
    gives up a step begun, restoring w.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, backend: str = "auto",
                 adaptive_eta: float = 0.01, schedule=None, **kwargs):
        super().__init__(params, base_optimizer, rho, adaptive, adaptive_eta, backend, schedule, **kwargs)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> bool:
        """After the first backward: compute e from the gradients and move to w + e.

        Returns True. With a ``schedule`` that does not sharpen this step it takes the base
        step on ``g`` instead (no perturbation) and returns False: then the step is done, and
        no second pass or ``second_step()`` follows::

            if opt.first_step():
                loss_fn(model(x), y).backward()
                opt.second_step()
        """
        if not self._engine.perturb():
            self._plain_step_after_perturbation(zero_grad)
            return False
        if zero_grad:
            self.zero_grad(set_to_none=True)
        else:
            self._engine.leave_grads()
        return True

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True, found_inf=None) -> None:
        """After the backward at w + e: restore w and take the base step with g'.

        ``found_inf``: an optional 0-d device flag (e.g. a GradScaler's); nonzero skips the step.
        It is the tensor passed now: a flag that a ``"step"`` phase hook computes is not seen
        here unless written in place; hooks report theirs with ``report_found_inf()``.
        """
        self._last_phase(with_head=False, found_inf=found_inf)
        if zero_grad:
            self.zero_grad(set_to_none=True)
        else:
            self._engine.leave_grads()

    @torch.no_grad()
    def step(self, closure=None):
        """One SAM step; ``closure`` computes the loss, calls ``backward()`` and returns the loss.

        It is called twice (at w and at w + e), once on a step the schedule does not sharpen.
        Gradients of the last call are left in ``.grad``, as ``torch.optim`` optimizers leave
        theirs. Returns the first loss.
        """
        if self._finishing:
            return self._finish(closure)
        if closure is None:
            self._refuse_step_without_closure("a closure that computes the loss and calls backward() (SAM "
                                              "evaluates the gradient twice); or call first_step() and "
                                              "second_step() yourself")
        closure = torch.enable_grad()(closure)
        loss = closure()
        self._in_step = True  # a step the schedule does not sharpen is taken here, its hooks fired by step()
        try:
            if not self._engine.perturb():
                self._plain_step_after_perturbation(zero_grad=False)
                return loss
        finally:
            self._in_step = False
        self.zero_grad(set_to_none=True)
        try:
            closure()
            self._in_step = True
            try:
                self.second_step(zero_grad=False)
            finally:
                self._in_step = False
        except BaseException:  # the weights are at w + e: leave them at w
            self.abandon_step()
            raise
        return loss
