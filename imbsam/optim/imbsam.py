"""imbsam.ImbSAM: class-aware SAM for imbalanced data (Zhou et al., ICCV 2023)."""
from __future__ import annotations

import torch

from imbsam.optim._engine import IMBSAM_PHASES
from imbsam.optim._wrapper import SharpnessOptimizer


class ImbSAM(SharpnessOptimizer):
    r"""ImbSAM: ``min_w L_H(w) + max_{||e|| <= rho} L_T(w + e)``, SAM applied to the tail loss only.

    One step, with the paper's phase names::

        head_loss, tail_loss = split(model(x), y)        # e.g. imbsam.HeadTailLoss
        head_loss.backward(retain_graph=True)
        opt.first_step()                                 # keep g_H aside
        tail_loss.backward()
        opt.second_step()                                # e from g_T, w <- w + e
        split(model(x), y)[1].backward()                 # g_T' at w + e (full-batch forward)
        opt.third_step()                                 # w <- w - e, g = g_T' + g_H, base step

    or ``opt.step(closure)`` where ``closure()`` runs the forward pass and returns
    ``(head_loss, tail_loss)`` *without* calling backward: the optimizer drives the three
    backward passes. A batch without tail samples has a zero tail loss, so ``e = 0`` and
    the step is the base step on ``L_H``.

    The head gradients are handed over, not copied: ImbSAM holds two extra buffers per
    parameter (``g_H`` and the weight backup) beyond the base optimizer's state.

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``).
        base_optimizer: an optimizer class, e.g. ``torch.optim.SGD``; ``**kwargs`` go to it.
        rho: the neighbourhood radius of the tail loss's perturbation, a finite float >= 0.
        backend: ``"auto"``, ``"reference"``, ``"cpp"``, ``"cuda"`` or ``"triton"``.
        schedule: which steps sharpen (``imbsam.schedules``: ``Periodic``, ``Bernoulli``,
            ``AESAM`` on ``g_T``); None, every step. A step not sharpened is the base step on
            ``g_H + g_T``: ``if opt.sharpens(): <the three phases> else: (head + tail).backward();
            opt.plain_step()``, or, for ``AESAM``, ``if opt.second_step(): <the pass at w + e>;
            opt.third_step()``.

    A non-finite ``g_T`` or ``g_H`` skips the whole step: weights and momentum are left as
    they were (decided on the device on the fused SGD path). Hooks that find an inf report
    it with ``report_found_inf()``. The phases must run in order (a RuntimeError says
    which is due); ``abandon_step()`` gives up a step begun, restoring w.
    """

    _PHASES = IMBSAM_PHASES

    def __init__(self, params, base_optimizer, rho: float = 0.05, backend: str = "auto", schedule=None, **kwargs):
        super().__init__(params, base_optimizer, rho, False, 0.01, backend, schedule, **kwargs)

    @torch.no_grad()
    def first_step(self) -> None:
        """After the head backward: keep g_H aside (and its norm, for a non-finite check) and
        clear the gradients."""
        self._engine.stash_head_grads()

    @torch.no_grad()
    def second_step(self) -> bool:
        """After the tail backward: e from g_T (global norm), w <- w + e, clear the gradients.

        Returns True. With a ``schedule`` that does not sharpen this step it takes the base
        step on ``g_H + g_T`` instead and returns False: the step is done, and no pass at
        w + e or ``third_step()`` follows.
        """
        sharpened = self._engine.perturb()
        if not sharpened:
            self._plain_step_after_perturbation(zero_grad=True)
            return False
        self.zero_grad(set_to_none=True)
        return True

    @torch.no_grad()
    def third_step(self, zero_grad: bool = True, found_inf=None) -> None:
        """After the backward at w + e: restore w, g = g_T' + g_H, the base step.

        ``found_inf``: an optional 0-d device flag (e.g. a GradScaler's); nonzero skips the step.
        It is the tensor passed now: a flag that a ``"step"`` phase hook computes is not seen
        here unless written in place; hooks report theirs with ``report_found_inf()``.
        """
        self._last_phase(with_head=True, found_inf=found_inf)
        if zero_grad:
            self.zero_grad(set_to_none=True)
        else:
            self._engine.leave_grads()

    @torch.no_grad()
    def step(self, closure=None):
        """One ImbSAM step; ``closure()`` returns ``(head_loss, tail_loss)`` without calling backward.

        Returns the detached total ``head_loss + tail_loss`` of the first forward pass.
        """
        if self._finishing:
            return self._finish(closure)
        if closure is None:
            self._refuse_step_without_closure("a closure that runs the forward pass and returns (head_loss, "
                                              "tail_loss) without calling backward; or call "
                                              "first_step/second_step/third_step")
        # With use_grad_scaler, each loss is scaled before its backward, as the phases expect.
        scaler = self._engine.helpers.get("grad_scaler")
        scaled = scaler.scale if scaler is not None else (lambda loss: loss)
        schedule = self._engine.schedule
        if schedule is not None and not schedule.needs_gradient and not schedule.sharpens():
            # Known before the passes: one backward of the whole loss and the base step.
            with torch.enable_grad():
                head_loss, tail_loss = _head_and_tail(closure())
                scaled(head_loss + tail_loss).backward()
            self._in_step = True
            try:
                self.plain_step(zero_grad=False)
            finally:
                self._in_step = False
            return (head_loss + tail_loss).detach()
        with torch.enable_grad():
            head_loss, tail_loss = _head_and_tail(closure())
            _with_compile_hint(lambda: scaled(head_loss).backward(retain_graph=True))
        self.first_step()
        try:
            with torch.enable_grad():
                scaled(tail_loss).backward()
            self._in_step = True  # a step the schedule does not sharpen ends here, its hooks fired by step()
            try:
                if not self._engine.perturb():
                    self._plain_step_after_perturbation(zero_grad=False)
                    return (head_loss + tail_loss).detach()
            finally:
                self._in_step = False
            self.zero_grad(set_to_none=True)
            with torch.enable_grad():
                scaled(_head_and_tail(closure())[1]).backward()
            self._in_step = True
            try:
                self.third_step(zero_grad=False)
            finally:
                self._in_step = False
        except BaseException:  # the weights may be at w + e: leave them at w
            self.abandon_step()
            raise
        return (head_loss + tail_loss).detach()


def _with_compile_hint(backward) -> None:
    """Runs the head's retained backward; names the fix for inductor's refusal of it."""
    try:
        backward()
    except RuntimeError as error:
        if "donated buffer" not in str(error):
            raise
        raise RuntimeError("imbsam: ImbSAM's head backward keeps the graph for the tail's (retain_graph=True), "
                           "which a model compiled by plain inductor refuses; compile it with "
                           "torch.compile(model, backend=imbsam.retain_graph_backend())") from error


def _head_and_tail(losses):
    if not (isinstance(losses, (tuple, list)) and len(losses) == 2):
        raise TypeError("ImbSAM.step's closure must return (head_loss, tail_loss), e.g. imbsam.HeadTailLoss's "
                        f"output, without calling backward; it returned {type(losses).__name__}")
    return losses
