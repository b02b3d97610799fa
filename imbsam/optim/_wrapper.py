"""What SAM and ImbSAM share as ``torch.optim.Optimizer`` subclasses around a base optimizer."""
from __future__ import annotations

import contextlib

import torch

from imbsam.optim._engine import SAM_PHASES, SharpnessEngine
from imbsam.optim._hypers import check_adaptive, check_adaptive_eta, check_base_optimizer, check_group_hypers, check_rho
from imbsam.optim._step_hooks import fire_post_hooks, fire_pre_hooks
from imbsam.schedules import check_schedule


class SharpnessOptimizer(torch.optim.Optimizer):
    """Builds ``base_optimizer(params, **kwargs)`` and shares its ``param_groups`` and state.

    LR schedulers, ``zero_grad``, ``add_param_group``, ``state_dict`` and
    ``load_state_dict`` therefore act on the base optimizer, as users expect. The
    buffers that live between phases (weight backups, head gradients) are transient
    and not part of the state dict: save and load between steps.
    """

    _PHASES = SAM_PHASES  # the names of this optimizer's phases, for its errors

    def __init__(self, params, base_optimizer, rho: float, adaptive: bool, adaptive_eta: float, backend: str,
                 schedule=None, **kwargs):
        self._stepped = {"opt_called": False}
        check_schedule(schedule)
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
        self._engine = SharpnessEngine(self.base_optimizer, backend, rho, adaptive, adaptive_eta, self._PHASES,
                                       schedule)
        if schedule is not None:
            schedule.attach()

    def _share_base(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    @property
    def backend(self) -> str:
        """The backend asked for (``auto`` resolves per device at the first step)."""
        return self._engine.backend

    def backend_for(self, device) -> str:
        """The concrete backend that runs the phases for parameters on ``device`` (``auto``
        resolved, as the first phase there will resolve it)."""
        return self._engine.concrete_backend(torch.device(device))

    @property
    def grad_norm(self):
        """The last perturbation gradient's global norm (a device tensor), or None."""
        return self._engine.norm

    def register_phase_hook(self, hook, prepend: bool = False):
        """``hook(phase, params, grads)`` before each phase reads the gradients (``"head"``,
        ``"perturb"``, ``"step"``): the place for a gradient all-reduce or an unscale.
        Hooks run in the order registered (``prepend=True``: before the others). Returns a
        handle whose ``remove()`` unregisters it."""
        return self._engine.register_phase_hook(hook, prepend)

    def report_found_inf(self, flag) -> None:
        """Skips the step in progress when ``flag`` (one value on the device; NaN counts) is
        nonzero: for a phase hook that unscales or all-reduces and finds an inf. The
        optimizer owns the combined flag (each report is copied at once, so a new tensor
        each time is fine); the last phase reads it on the device, and it applies to the step
        in progress only."""
        self._engine.report_found_inf(flag)

    @property
    def schedule(self):
        """The sharpness schedule (``imbsam.schedules``), or None: every step sharpens."""
        return self._engine.schedule

    def sharpens(self) -> bool:
        """Whether this step sharpens, known before its passes: True without a schedule, the
        decision of a ``Periodic`` or ``Bernoulli`` schedule (on the host, no sync). A step it
        does not sharpen is a plain one: the loss's backward, then ``plain_step()``. An
        ``AESAM`` schedule decides from the perturbation gradient: TypeError (call the phases:
        the perturbation phase returns whether it sharpened)."""
        schedule = self._engine.schedule
        return True if schedule is None else schedule.sharpens()

    @torch.no_grad()
    def plain_step(self, zero_grad: bool = True, found_inf=None) -> None:
        """The base optimizer's step on ``.grad`` at w, with no perturbation: a step the schedule
        does not sharpen (``sharpens()`` is False), or any step taken without SAM. After
        ImbSAM's ``first_step()`` it steps with ``g_H + .grad``. Phase hooks run as for a last
        phase (a GradScaler unscales, ``sync_data_parallel`` averages), the step hooks fire, LR
        schedulers count it, and the schedule counts it as a step.

        ``found_inf``: an optional 0-d device flag; nonzero skips the step.
        """
        self._last_phase(with_head=False, found_inf=found_inf, plain=True)
        if zero_grad:
            self.zero_grad(set_to_none=True)
        else:
            self._engine.leave_grads()

    def _plain_step_after_perturbation(self, zero_grad: bool) -> None:
        """The perturbation phase declined (its schedule): the plain step on what it read."""
        self._last_phase(with_head=False, found_inf=None, plain=True, after_perturb_hooks=True)
        if zero_grad:
            self.zero_grad(set_to_none=True)
        else:
            self._engine.leave_grads()

    def abandon_step(self) -> None:
        """Gives up a step begun with the phases (after an error in the forward at w + e, say):
        the weights go back to w exactly, set-aside head gradients are dropped, and the base
        optimizer's state is untouched. A no-op between steps."""
        self._engine.abandon()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not torch.compiler.is_compiling():
            return super().zero_grad(set_to_none)
        # Dynamo does not trace torch's zero_grad (its profiler scope): the same, written out.
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    # LR schedulers check that optimizer.step() ran before their first step, reading
    # ``_opt_called`` (which their wrapper of step() sets); the phases are our step. The flag
    # lives in a dict: a compiled phase may change a dict's item, while dynamo (torch 2.11)
    # refuses to set an attribute of an optimizer.
    @property
    def _opt_called(self) -> bool:
        return self._stepped["opt_called"]

    @_opt_called.setter
    def _opt_called(self, value: bool) -> None:
        self._stepped["opt_called"] = value

    def _after_base_step(self) -> None:
        self._stepped["opt_called"] = True

    def _refuse_step_without_closure(self, needs: str) -> None:
        """step() without a closure: GradScaler.step(optimizer) calls it so, and a step begun
        by the phases is given up first (w restored), so that nothing is left perturbed."""
        begun = self._engine.phase != "idle"
        self.abandon_step()
        raise ValueError(f"{type(self).__name__}.step() needs {needs}."
                         + (" The step begun by the phases was abandoned (the weights are back at w)." if begun else "")
                         + " With a GradScaler, scaler.step(optimizer) cannot run the phases: call "
                         "imbsam.use_grad_scaler(optimizer, scaler) once and the phases (or step(closure)) "
                         "instead, then scaler.update()")

    # Inside step(closure): torch.optim's wrapper of step() has fired the step hooks already.
    _in_step = False

    # Inside finishing_by_step(): step() takes only the last phase (see there).
    _finishing = False

    @contextlib.contextmanager
    def finishing_by_step(self):
        """For trainers that call ``optimizer.step()`` themselves after the last backward
        (Lightning's precision plugins, a GradScaler's ``step``): inside this block, with the
        weights perturbed by the phases, ``step(closure)`` calls ``closure()`` (the pass at
        w + e, say) and then takes the last phase, and ``step()`` takes the last phase.
        A step the trainer skips (a GradScaler's inf) leaves the weights at w + e: call
        ``abandon_step()`` after the block (``imbsam.integrations`` do)."""
        self._finishing = True
        try:
            yield self
        finally:
            self._finishing = False

    def _finish(self, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._in_step = True  # torch.optim's wrapper of step() fires the step hooks
        try:
            self._last_phase(with_head=True, found_inf=None)
        finally:
            self._in_step = False
        self._engine.leave_grads()
        return loss

    def _last_phase(self, with_head: bool, found_inf, plain: bool = False, after_perturb_hooks: bool = False) -> None:
        """The phase that takes the step, between torch.optim's step pre- and post-hooks
        (global ones, then this optimizer's), which fire once per full step: here when the
        phases are called by hand, around step() when it runs them. ``plain``: the base step
        at w (``plain_step``)."""
        fire = not self._in_step
        if fire:
            fire_pre_hooks(self)
        if plain:
            self._engine.plain_step(found_inf=found_inf, after_perturb_hooks=after_perturb_hooks)
        else:
            self._engine.restore_and_step(with_head=with_head, found_inf=found_inf)
        self._after_base_step()
        if fire:
            fire_post_hooks(self)

    # copy.deepcopy, pickle and torch.save: the base optimizer (state, param groups) and the
    # settings travel; the per-step buffers and phase hooks do not (hooks are often lambdas),
    # so only an optimizer between steps can be copied.
    def __getstate__(self):
        if self._engine.phase != "idle":
            raise TypeError(f"imbsam: cannot copy or pickle {type(self).__name__} in the middle of a step (after "
                            f"{self._engine.phase_names.get('head', 'first_step')}() or a perturbation): finish the "
                            "step or call abandon_step() first, or save state_dict() instead")
        return {"defaults": self.defaults, "base_optimizer": self.base_optimizer, "engine": self._engine.settings()}

    def __setstate__(self, state) -> None:
        self._stepped = {"opt_called": False}
        self.base_optimizer = state["base_optimizer"]
        super().__setstate__({"defaults": state["defaults"]})  # torch.optim's own bookkeeping (hooks)
        self._share_base()
        self._engine = SharpnessEngine(self.base_optimizer, **state["engine"])

    # The schedule's state (steps taken, AE-SAM's statistics) travels in the state dict under
    # this key, beside the base optimizer's; a resumed run sharpens the same steps.
    _SCHEDULE_KEY = "imbsam_sharpness_schedule"

    def state_dict(self):
        state = self.base_optimizer.state_dict()
        if self._engine.schedule is not None:
            state[self._SCHEDULE_KEY] = self._engine.schedule.state_dict()
        return state

    def load_state_dict(self, state_dict) -> None:
        for group in state_dict.get("param_groups", []):  # checked before anything is loaded
            check_group_hypers(group, self.defaults)
        schedule, saved = self._engine.schedule, state_dict.get(self._SCHEDULE_KEY)
        if saved is not None and schedule is None:
            raise ValueError(f"imbsam: the state dict holds a sharpness schedule's state ({saved.get('kind')!r}), "
                             f"but this {type(self).__name__} has none: build it with the same schedule= to resume")
        if saved is not None:
            restore = schedule.state_dict()
            schedule.load_state_dict(saved)  # checks kind and settings first
        state_dict = {k: v for k, v in state_dict.items() if k != self._SCHEDULE_KEY}
        try:
            self.base_optimizer.load_state_dict(state_dict)
        except BaseException:
            if saved is not None:
                schedule.load_state_dict(restore)
            raise
        self._share_base()  # the base built new group dicts: share them again
        for group in self.param_groups:
            # A plain base optimizer's state dict (torch.optim.SGD's, say) has no rho or
            # adaptive: its groups take this optimizer's defaults.
            group.setdefault("rho", self.defaults["rho"])
            group.setdefault("adaptive", self.defaults["adaptive"])
