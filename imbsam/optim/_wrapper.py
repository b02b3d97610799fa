"""What SAM and ImbSAM share as ``torch.optim.Optimizer`` subclasses around a base optimizer."""
from __future__ import annotations

import torch

from imbsam.optim._engine import (SAM_PHASES, SharpnessEngine, check_adaptive, check_adaptive_eta,
                                  check_base_optimizer, check_group_hypers, check_rho)


class SharpnessOptimizer(torch.optim.Optimizer):
    """Builds ``base_optimizer(params, **kwargs)`` and shares its ``param_groups`` and state.

    LR schedulers, ``zero_grad``, ``add_param_group``, ``state_dict`` and
    ``load_state_dict`` therefore act on the base optimizer, as users expect. The
    buffers that live between phases (weight backups, head gradients) are transient
    and not part of the state dict: save and load between steps.
    """

    _PHASES = SAM_PHASES  # the names of this optimizer's phases, for its errors

    def __init__(self, params, base_optimizer, rho: float, adaptive: bool, adaptive_eta: float, backend: str,
                 **kwargs):
        check_rho(rho)
        check_adaptive(adaptive)
        check_adaptive_eta(adaptive_eta)
        check_base_optimizer(base_optimizer)
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        for group in self.param_groups:
            check_group_hypers(group, self.defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self._share_base()
        self.defaults.update(self.base_optimizer.defaults)
        self._engine = SharpnessEngine(self.base_optimizer, backend, rho, adaptive, adaptive_eta, self._PHASES)

    def _share_base(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    @property
    def backend(self) -> str:
        """The backend asked for (``auto`` resolves per device at the first step)."""
        return self._engine.backend

    @property
    def grad_norm(self):
        """The last perturbation gradient's global norm (a device tensor), or None."""
        return self._engine.norm

    def register_phase_hook(self, hook):
        """``hook(phase, params, grads)`` before each phase reads the gradients (``"head"``,
        ``"perturb"``, ``"step"``): the place for a gradient all-reduce or an unscale.
        Returns a handle whose ``remove()`` unregisters it."""
        return self._engine.register_phase_hook(hook)

    def abandon_step(self) -> None:
        """Gives up a step begun with the phases (after an error in the forward at w + e, say):
        the weights go back to w exactly, set-aside head gradients are dropped, and the base
        optimizer's state is untouched. A no-op between steps."""
        self._engine.abandon()

    def _after_base_step(self) -> None:
        # LR schedulers check that optimizer.step() ran before them; the phases are our step.
        self._opt_called = True

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        for group in state_dict.get("param_groups", []):  # checked before anything is loaded
            check_group_hypers(group, self.defaults)
        self.base_optimizer.load_state_dict(state_dict)
        self._share_base()  # the base built new group dicts: share them again
        for group in self.param_groups:
            # A plain base optimizer's state dict (torch.optim.SGD's, say) has no rho or
            # adaptive: its groups take this optimizer's defaults.
            group.setdefault("rho", self.defaults["rho"])
            group.setdefault("adaptive", self.defaults["adaptive"])
