"""Drop-in adapters with the paper's constructor ``(optimizer, model, rho)``.

The paper's training loop runs unchanged on the fast ops::

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
    optimizer = imbsam.compat.ImbSAM(optimizer, model, rho=0.05)
    ...
    head_loss.backward(retain_graph=True); optimizer.first_step()
    tail_loss.backward();                  optimizer.second_step()
    tail_loss_at_w_plus_e.backward();      optimizer.third_step()

The wrapped optimizer keeps its state and ``param_groups``; schedulers attach to it.

Differences from the paper's code. In every step, at rounding level: w is restored by a
copy from a backup, exactly, where the paper's ``p.sub_(e)`` leaves ``(w + e) - e``,
which may differ from w in its last bits; and the norm's squares are summed in float64
and rounded once, where the paper takes fp32 per-tensor norms and the norm of their
stack. The weights therefore agree with the paper's to rounding (within 1e-6 over the
tests' short runs, ``tests/test_paper_semantics.py``), not bitwise. In two cases where
the paper's code fails: a parameter that was perturbed but gets no gradient in the last
phase is still restored (the paper's stays at w + e), and one that only the head loss
reached steps with ``g_H``.
"""
from __future__ import annotations

import torch

from imbsam.optim._engine import IMBSAM_PHASES, SAM_PHASES, SharpnessEngine


class _Adapter:
    _PHASES = SAM_PHASES

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, rho: float = 0.05,
                 backend: str = "auto", adaptive: bool = False):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer instance, got {type(optimizer).__name__}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.optimizer = optimizer
        self.model = model
        self.rho = rho
        self._engine = SharpnessEngine(optimizer, backend, rho, adaptive, phase_names=self._PHASES)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def backend_for(self, device) -> str:
        """See ``imbsam.SAM.backend_for``."""
        return self._engine.concrete_backend(torch.device(device))

    def register_phase_hook(self, hook, prepend: bool = False):
        """See ``imbsam.SAM.register_phase_hook``."""
        return self._engine.register_phase_hook(hook, prepend)

    def report_found_inf(self, flag) -> None:
        """See ``imbsam.SAM.report_found_inf``."""
        self._engine.report_found_inf(flag)

    def abandon_step(self) -> None:
        """See ``imbsam.SAM.abandon_step``."""
        self._engine.abandon()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def _finish(self) -> None:
        self.optimizer._opt_called = True  # what optimizer.step() tells LR schedulers
        self.optimizer.zero_grad()


class SAM(_Adapter):
    """The paper's ``SAM(optimizer, model, rho)``: ``first_step()`` and ``second_step()``."""

    @torch.no_grad()
    def first_step(self) -> bool:
        """Returns True (it perturbed), as ``imbsam.SAM.first_step`` does without a schedule."""
        sharpened = self._engine.perturb()
        self.optimizer.zero_grad()
        return sharpened

    @torch.no_grad()
    def second_step(self, found_inf=None) -> None:
        self._engine.restore_and_step(with_head=False, found_inf=found_inf)
        self._finish()


class ImbSAM(_Adapter):
    """The paper's ``ImbSAM(optimizer, model, rho)``: ``first_step()``, ``second_step()``, ``third_step()``."""

    _PHASES = IMBSAM_PHASES

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, rho: float = 0.05,
                 backend: str = "auto"):
        super().__init__(optimizer, model, rho, backend)

    @torch.no_grad()
    def first_step(self) -> None:
        self._engine.stash_head_grads()
        self.optimizer.zero_grad()

    @torch.no_grad()
    def second_step(self) -> bool:
        """Returns True (it perturbed), as ``imbsam.ImbSAM.second_step`` does without a schedule."""
        sharpened = self._engine.perturb()
        self.optimizer.zero_grad()
        return sharpened

    @torch.no_grad()
    def third_step(self, found_inf=None) -> None:
        self._engine.restore_and_step(with_head=True, found_inf=found_inf)
        self._finish()
