"""The phase machinery shared by ``imbsam.SAM``, ``imbsam.ImbSAM`` and the paper-style adapters.

It owns the per-parameter buffers that live between phases (the weight backup and,
for ImbSAM, the head gradient) and drives the ops of the chosen backend. The base
optimizer keeps its own state (momentum buffers) exactly as it would without SAM.
Beside it: ``_hypers`` (hyper-parameter checks), ``_inputs`` (gathering, input checks
and the guarded retry), ``_plans`` (the per-group plans and backups), ``_fused_sgd`` and
``_fused_adam`` (what the fused path knows of ``torch.optim.SGD`` and ``Adam``/``AdamW``),
``_sharded`` (the ops on FSDP2's DTensor shards).
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from imbsam import backends, compiling
from imbsam.backends import checks
from imbsam.optim import _fused_adam, _fused_sgd
from imbsam.optim._hypers import check_adaptive, check_adaptive_eta, check_group_hypers, check_rho
from imbsam.optim._inputs import check_base_state, fix_layouts, gather, guarded
from imbsam.optim._plans import GroupPlan, PlanCache
from imbsam.optim._sharded import LocalShardOps, is_sharded
from imbsam.optim._step_hooks import fire_post_hooks, fire_pre_hooks
from imbsam.schedules import SharpnessSchedule, check_schedule

SAM_PHASES = {"perturb": "first_step", "step": "second_step"}
IMBSAM_PHASES = {"head": "first_step", "perturb": "second_step", "step": "third_step"}


class _FusedStep(NamedTuple):
    """What the engine needs of a base optimizer whose step a backend fuses."""

    possible: Callable[[torch.optim.Optimizer], bool]  # whether this base optimizer's step may be replaced
    calls: Callable[..., list]  # a group's op calls: (pairs guarded() may repair, op name, arguments)
    forget_created: Callable[[torch.optim.Optimizer, list], None]  # undoes the state a rejected step created


# By the names in a backend record's fused_bases.
_FUSED = {"sgd": _FusedStep(_fused_sgd.fused_sgd_possible, _fused_sgd.fused_sgd_calls, _fused_sgd.forget_created),
          "adam": _FusedStep(_fused_adam.fused_adam_possible, _fused_adam.fused_adam_calls,
                             _fused_adam.forget_created)}
# What each op of a fused step checks before it writes (run first when a step takes several calls).
_PRECHECKS = {"restore_sgd_step_": _fused_sgd.precheck_sgd_step, "restore_adam_step_": _fused_adam.precheck_adam_step,
              "restore_": checks.restore_lists}


def _fused_step_of(base: torch.optim.Optimizer, backend) -> Optional[_FusedStep]:
    """The fused step that replaces ``base``'s on ``backend``, or None (the generic path)."""
    return next((_FUSED[name] for name in backend.fused_bases if _FUSED[name].possible(base)), None)


class SharpnessEngine:
    """Runs the SAM phases over ``base_optimizer.param_groups``.

    Per-group ``rho`` / ``adaptive`` override the engine's defaults. ASAM's scaling
    ``T = |w| + adaptive_eta`` applies to tensors with two or more dimensions (conv and
    linear weights); biases and normalisation parameters use ``T = 1``.
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, backend: str, rho: float, adaptive: bool = False,
                 adaptive_eta: float = 0.01, phase_names: Optional[dict[str, str]] = None,
                 schedule: Optional[SharpnessSchedule] = None):
        backends.check_backend_name(backend)
        check_schedule(schedule)
        check_rho(rho)
        check_adaptive(adaptive)
        check_adaptive_eta(adaptive_eta)
        self.base = base_optimizer
        self.backend = backend
        self.defaults = dict(rho=rho, adaptive=bool(adaptive), adaptive_eta=float(adaptive_eta))
        for group in base_optimizer.param_groups:
            check_group_hypers(group, self.defaults)
        self._cache = PlanCache()  # per group: the parameters with a gradient, their backups
        self._sharded_ops: dict[str, LocalShardOps] = {}  # per backend, for DTensor parameters (FSDP2)
        # ImbSAM's head gradients between its first and last phase: per group index, the
        # ids of the parameters that had one and those gradients.
        self.head_grads: dict[int, tuple[list[int], list[Tensor]]] = {}
        self.norm: Optional[Tensor] = None  # the last perturbation's gradient norm, on the device
        self._step_norm: Optional[Tensor] = None  # the norm the coming step decides its skip by, used once
        self._perturbed: dict[int, GroupPlan] = {}  # the plans of the groups the last perturbation moved
        # ImbSAM's g_H norm, kept only for its finiteness: a non-finite g_H skips the step.
        self._head_norm: Optional[Tensor] = None
        # The step's skip flag that hooks report (report_found_inf), combined on the device.
        self._reported_inf: Optional[Tensor] = None
        self._hooks_running = False
        # The gradients a phase left in .grad, with their versions (see leave_grads).
        self._left: Optional[list] = None
        self.phase_hooks: OrderedDict[int, Callable] = OrderedDict()
        # The helpers attached through phase hooks, by kind ("grad_scaler"): one of each; abandon()
        # calls their abandoned().
        self.helpers: dict[str, object] = {}
        # The user-facing name of each phase, for errors: SAM's two, or ImbSAM's three with "head".
        self.phase_names = phase_names or SAM_PHASES
        # The last phase that ran: "idle" -> ["head" ->] "perturbed" -> "idle". Checked before
        # anything is written: a second perturbation would back up w + e as the weights.
        self.phase = "idle"
        # Which steps sharpen (None: every one); the perturbation phase asks it.
        self.schedule = schedule

    @property
    def backups(self) -> dict[int, tuple[Tensor, int]]:
        """Per parameter id: its weight backup and the storage pointer it was made for."""
        return self._cache.backups

    def settings(self) -> dict:
        """The constructor's arguments besides the base optimizer: what a copy is built from."""
        return dict(backend=self.backend, rho=self.defaults["rho"], adaptive=self.defaults["adaptive"],
                    adaptive_eta=self.defaults["adaptive_eta"], phase_names=self.phase_names, schedule=self.schedule)

    def register_phase_hook(self, hook: Callable[[str, list, list], None], prepend: bool = False) -> RemovableHandle:
        """``hook(phase, params, grads)`` runs before a phase reads the gradients.

        ``phase`` is ``"head"`` (ImbSAM's first step), ``"perturb"`` or ``"step"`` (the last
        one); ``params`` are the parameters that have a ``.grad`` and ``grads`` those
        gradients. A hook may change them in place (an all-reduce, an unscale) or assign
        a new ``p.grad``; it should not synchronise with the host if CUDA graphs are used.
        Hooks run in the order registered; ``prepend=True`` puts this one before the others
        (``sync_data_parallel``'s average comes before any check of the gradients).
        """
        handle = RemovableHandle(self.phase_hooks)
        self.phase_hooks[handle.id] = hook
        if prepend:
            self.phase_hooks.move_to_end(handle.id, last=False)
        return handle

    def _run_phase_hooks(self, phase: str) -> None:
        """A phase begins (its order checked): its gradients checked, then the hooks."""
        if self.phase == "idle":  # a step begins: the one place the reported flag is cleared
            self._reported_inf = None
        params = [p for g in self.base.param_groups for p in g["params"] if p.grad is not None]
        self._check_fresh_grads(phase, params)
        if not self.phase_hooks:
            return
        grads = [p.grad for p in params]
        self._hooks_running = True
        try:
            for hook in self.phase_hooks.values():
                hook(phase, params, grads)
        finally:
            self._hooks_running = False

    # What each phase's gradients come from, for the error when it has none.
    _BACKWARD_BEFORE = {"head": "head_loss.backward(retain_graph=True)", "step": "the backward of the loss at w + e"}

    def _check_fresh_grads(self, phase: str, params: list) -> None:
        """Raises, before anything is written, if the phase would read no gradient or only
        the ones a phase before it already read: a backward was forgotten, or ``.grad`` was
        cleared before the phase (it used to step with the wrong gradients, in silence)."""
        names = self.phase_names
        plain = phase == "step" and self.phase != "perturbed"  # plain_step(), not the last phase
        name = "plain_step" if plain else names[phase]
        left, self._left = self._left, None
        if not params:
            before = (("the backward of the step's loss" + (" (head + tail, or the tail's after "
                                                             f"{names['head']}())" if "head" in names else ""))
                      if plain else self._BACKWARD_BEFORE.get(phase)) or (
                "tail_loss.backward() (a batch without tail samples still gives zero gradients)"
                if "head" in names else "loss.backward()")
            stays = (" The step stays perturbed: call abandon_step() to restore w, or run the backward and call "
                     f"{name}() again." if phase == "step" and not plain else "")
            raise RuntimeError(f"imbsam: {name}() with no gradients: no parameter has a .grad. Call "
                               f"{before} before it, and zero_grad() only after it.{stays}")
        if left is not None and not torch.compiler.is_compiling() and len(left) == len(params) and all(
                ref() is p.grad and p.grad._version == version for (ref, version), p in zip(left, params)):
            raise RuntimeError(f"imbsam: {name}() would read the gradients the phase before it read: no "
                               "backward ran since (the last phase was called with zero_grad=False)")

    def leave_grads(self) -> None:
        """A phase that keeps ``.grad`` (``zero_grad=False``) notes what it leaves, so that
        the next phase can tell whether a backward ran since (weak references: nothing is
        kept alive)."""
        if torch.compiler.is_compiling():  # dynamo traces no version counter; compile_step zeroes .grad
            return
        self._left = [(weakref.ref(p.grad), p.grad._version)
                      for g in self.base.param_groups for p in g["params"] if p.grad is not None]

    def report_found_inf(self, flag: Tensor) -> None:
        """Skips the step in progress if ``flag`` (one value; NaN counts) is nonzero.

        The engine owns the flag: each report is copied on the device at once and combined
        with the earlier ones (any nonzero skips), so a hook may pass a new tensor every
        time. Accepted from a phase hook or between a step's first and last phase; it
        applies to that step only (cleared when the next one begins).
        """
        if not isinstance(flag, Tensor):
            raise TypeError(f"report_found_inf() takes a tensor flag (0-d, nonzero skips the step), got "
                            f"{type(flag).__name__}")
        if flag.numel() != 1 or flag.is_complex() or flag.layout is not torch.strided:
            raise ValueError(f"report_found_inf() takes one real value (a 0-d flag), got a {flag.layout} "
                             f"{flag.dtype} tensor of shape {tuple(flag.shape)}")
        if self.phase == "idle" and not self._hooks_running:
            raise RuntimeError("imbsam: report_found_inf() between steps: no step is in progress that it could "
                               "skip; call it from a phase hook (register_phase_hook) or between the first and "
                               "the last phase")
        # A copy, not a reference: a later in-place change of the caller's tensor is not read.
        mine = flag.detach().reshape(()).to(torch.float32, copy=True)
        self._reported_inf = mine if self._reported_inf is None else torch.maximum(
            self._reported_inf, mine.to(self._reported_inf.device))

    # ---- helpers -------------------------------------------------------------------
    def _hyper(self, group: dict, key: str):
        return group.get(key, self.defaults[key])

    def concrete_backend(self, device: torch.device) -> str:
        return backends.resolve(self.backend, device)

    def _ops(self, gathered, device: torch.device):
        """The backend's registry record and ops for ``device``; for a backend whose ops check
        nothing (none of the built-in ones: the registry test adds one), the checks the others
        make before they write."""
        backend = backends.record(self.concrete_backend(device))
        if self.phase == "idle" and compiling.in_compile_step() and _fused_step_of(self.base, backend) is None:
            compiling.refuse_in_compile_step(
                f"imbsam.compile_step needs a fused step: exactly torch.optim.SGD, Adam or AdamW on a backend with "
                f"the fused base step (cpp, cuda, triton); this optimizer's {type(self.base).__name__} on "
                f"{backend.name} steps itself after the phases, which dynamo cannot put in one graph. Nothing was "
                "written. Compile the model alone (torch.compile(model)) instead")
        if not backend.checks_inputs:
            for _, _, params, grads in gathered:  # gather() has checked their devices
                fix_layouts(params, grads)
        first = next((params[0] for _, _, params, _ in gathered if params), None)
        if first is not None and is_sharded(first):  # FSDP2: the ops run on the local shards
            ops = self._sharded_ops.get(backend.name)
            if ops is None:
                ops = self._sharded_ops[backend.name] = LocalShardOps(backend.ops)
            return backend, ops
        return backend, backend.ops

    # ---- phases --------------------------------------------------------------------
    @torch.no_grad()
    def stash_head_grads(self) -> None:
        """ImbSAM's first phase: hand the head gradients over (no copy) and clear ``.grad``."""
        self._check_phase("head")
        self._run_phase_hooks("head")
        gathered, device = gather(self.base.param_groups)
        ops = self._ops(gathered, device)[1] if device is not None else None  # with the reference's checks
        for _, _, params, grads in gathered:
            # Refuse a sparse g_H here, as the other phases do, not at the step.
            if any(layout is not torch.strided for layout in set(checks.each("layout", grads))):
                fix_layouts(params, grads)
        # Only its finiteness is used: a non-finite g_H skips the step, decided on the device
        # like g_T's. One read of g_H (4 bytes a parameter in fp32), while it is fresh.
        # The list is built inside the call: a retry must read the gradients guarded() repaired.
        self._head_norm = None if ops is None else guarded(
            lambda: ops.grad_norm([g for _, _, _, grads in gathered for g in grads], [], [],
                                  self.defaults["adaptive_eta"]),
            [(params, grads, True) for _, _, params, grads in gathered])
        self.head_grads = {}
        for index, _, params, grads in gathered:
            if not params:
                continue
            # A view may alias storage that the next backward writes (DDP buckets): copy it.
            # (`_base`, not `_is_view()`: dynamo traces an attribute, not a call returning a bool.)
            self.head_grads[index] = (list(map(id, params)), [g.clone() if g._base is not None else g for g in grads])
            for p in params:
                p.grad = None
        self.phase = "head"

    def weights_at_w(self) -> dict[int, Tensor]:
        """While perturbed: each perturbed parameter's w (its backup, not to be written), by
        ``id``; for a trainer's clipping that reads the weights (timm's AGC)."""
        return {id(p): b for plan in self._perturbed.values() for p, b in zip(plan.params, plan.backups)}

    @torch.no_grad()
    def fold_head_grads(self) -> None:
        """ImbSAM's g_H added into ``.grad`` (g' at w + e), so that the last phase steps on
        ``.grad`` alone: for trainers that clip or unscale ``.grad`` between the last backward
        and the step (Lightning), which must see the gradient the base step uses. The g_H norm
        stays: a non-finite g_H still skips the step."""
        if self.phase != "perturbed":
            raise RuntimeError("imbsam: fold_head_grads() belongs between the pass at w + e and the last phase")
        params = {id(p): p for group in self.base.param_groups for p in group["params"]}
        for ids, grads in self.head_grads.values():
            for key, g in zip(ids, grads):
                p = params[key]
                p.grad = g if p.grad is None else p.grad.add_(g)
        self.head_grads = {}

    @torch.no_grad()
    def perturb(self) -> bool:
        """w <- w + e from the current gradients (global norm), keeping a backup of w.

        Returns False, having written nothing, when the schedule does not sharpen this step:
        the caller then takes the plain step (``plain_step(..., after_perturb_hooks=True)``).
        """
        self._check_phase("perturb")
        self._run_phase_hooks("perturb")
        gathered, device = gather(self.base.param_groups)
        for _, group, _, _ in gathered:  # a group's rho may have been changed since: before any write
            check_group_hypers(group, self.defaults)
        self._perturbed = {}
        schedule = self.schedule
        if schedule is not None and compiling.in_compile_step():
            compiling.refuse_in_compile_step(
                "imbsam.compile_step cannot compile a step with a sharpness schedule: whether the step sharpens "
                "decides which passes run, on the host. Nothing was written. Compile the model alone "
                "(torch.compile(model)) instead")
        if schedule is not None and not schedule.needs_gradient and not schedule.sharpens():
            return False
        if device is None:
            self.norm = self._step_norm = None
            self.phase = "perturbed"
            return True
        _, ops = self._ops(gathered, device)
        eta = self.defaults["adaptive_eta"]
        plans = {index: self._cache.plan(index, params) for index, _, params, _ in gathered if params}
        adaptive = {index: self._hyper(group, "adaptive") for index, group, _, _ in gathered}

        def norm_inputs():
            # ASAM scales tensors of two or more dimensions; a non-adaptive group is all plain.
            plain, scaled, scaled_params = [], [], []
            for index, _, params, grads in gathered:
                if not adaptive[index]:
                    plain += grads
                elif params:
                    plan = plans[index]
                    plain += [grads[j] for j in plan.plain]
                    scaled += [grads[j] for j in plan.scaled]
                    scaled_params += [params[j] for j in plan.scaled]
            return plain, scaled, scaled_params

        self.norm = self._step_norm = guarded(
            lambda: ops.grad_norm(*norm_inputs(), eta), [(params, grads, True) for _, _, params, grads in gathered])
        norm = self.norm
        if schedule is not None and schedule.needs_gradient and not schedule.decide(norm, self._reported_inf):
            self._step_norm = None
            return False
        moved: list[tuple[list[Tensor], list[Tensor]]] = []  # (params, backups) of each op that has run
        try:
            for index, group, params, grads in gathered:
                if not params:
                    continue
                plan, rho = plans[index], self._hyper(group, "rho")
                if not adaptive[index]:
                    guarded(lambda: ops.perturb_(params, grads, plan.backups, norm, rho, eta, False),
                            [(params, grads, True)])
                    moved.append((params, plan.backups))
                else:
                    for pick, is_scaled in ((plan.plain, False), (plan.scaled, True)):
                        if pick:
                            ps, gs = [params[j] for j in pick], [grads[j] for j in pick]
                            bs = [plan.backups[j] for j in pick]
                            guarded(lambda: ops.perturb_(ps, gs, bs, norm, rho, eta, is_scaled), [(ps, gs, True)])
                            moved.append((ps, bs))
                self._perturbed[index] = plan
        except BaseException:  # a later group's op refused: the earlier ones go back to w, the phase stays
            for ps, bs in moved:
                for p, b in zip(ps, bs):
                    p.copy_(b)
            self._perturbed, self.norm, self._step_norm = {}, None, None
            raise
        self.phase = "perturbed"
        return True

    def _check_phase(self, phase: str) -> None:
        """Raises if ``phase`` cannot follow the last one; nothing has been written yet."""
        names, last = self.phase_names, self.phase
        if phase in ("head", "perturb") and last == "perturbed":
            by = "again" if phase == "perturb" else f"after {names['perturb']}()"
            raise RuntimeError(f"imbsam: {names[phase]}() {by} while the weights are still perturbed (at w + e): "
                               f"perturbing again would lose w; call {names['step']}() to finish the step, or "
                               "abandon_step() to restore w without one")
        if phase == "head" and last == "head":
            raise RuntimeError(f"imbsam: {names['head']}() twice: the head gradients of the first call are set "
                               f"aside and would be replaced; call {names['perturb']}() next, or abandon_step() "
                               "to drop them")
        if phase == "perturb" and "head" in names and last != "head":
            raise RuntimeError(f"imbsam: {names['perturb']}() without {names['head']}(): the head gradients were "
                               f"not set aside; call {names['head']}() after the head loss's backward")
        if phase == "step" and last != "perturbed":
            raise RuntimeError(f"imbsam: {names['step']}() without {names['perturb']}(): there is no "
                               "perturbation to undo; for a step without one call the base optimizer's step()")

    @torch.no_grad()
    def abandon(self) -> None:
        """Undoes a step begun but not finished: w restored exactly (if perturbed), g_H dropped.

        No phase hook runs (a collective on one rank's error path would wait forever).
        """
        if self.phase == "perturbed":
            for plan in self._perturbed.values():
                for p, b in zip(plan.params, plan.backups):
                    p.copy_(b)
        self._perturbed, self.head_grads, self._step_norm = {}, {}, None
        self._head_norm = None
        self.phase = "idle"
        for helper in self.helpers.values():  # what they kept of the step goes with it
            helper.abandoned()

    @torch.no_grad()
    def restore_and_step(self, with_head: bool, found_inf: Optional[Tensor] = None) -> None:
        """Back to the original w, g <- g' (+ g_H), and the base optimizer's step.

        The step is skipped (weights restored, base state untouched) when the perturbation
        gradient was not finite or the caller's 0-d ``found_inf`` (a GradScaler's, say) is
        nonzero; on the fused paths both are combined and read on the device.
        """
        _check_found_inf(found_inf)
        self._check_phase("step")
        self._restore_and_step(with_head, found_inf)
        # Only when done: a rejected input leaves the step as it was (the backups, the
        # norm, g_H), so that a retry takes the same step and abandon_step() restores w.
        self._perturbed, self._step_norm = {}, None
        if with_head:
            self.head_grads, self._head_norm = {}, None
        self.phase = "idle"
        if self.schedule is not None:
            self.schedule.step_taken(sharpened=True)

    @torch.no_grad()
    def plain_step(self, found_inf: Optional[Tensor] = None, after_perturb_hooks: bool = False) -> None:
        """The base optimizer's step on the gradients at w, with no perturbation: ``.grad``,
        plus ImbSAM's set-aside ``g_H`` after its head phase. A step the schedule does not
        sharpen, or one the caller takes plain.

        ``after_perturb_hooks``: called by the perturbation phase that declined, whose hooks
        have read these gradients already (a GradScaler unscaled them); otherwise the
        ``"step"`` hooks run first. The skip flags are those of a last phase (the g_H norm, the
        reported flag, ``found_inf``); the gradient itself has no norm taken, and a non-finite
        one is applied as the base optimizer applies it. A base step that raises leaves the
        step as it was (``g_H`` still set aside).
        """
        _check_found_inf(found_inf)
        if self.phase == "perturbed":
            raise RuntimeError(f"imbsam: plain_step() while the weights are perturbed (at w + e): call "
                               f"{self.phase_names['step']}() to finish the step, or abandon_step() first")
        if not after_perturb_hooks:
            self._run_phase_hooks("step")
        with_head = self.phase == "head"
        gathered, device = gather(self.base.param_groups)
        heads = self.head_grads if with_head else {}
        flags = [None, self._head_norm if with_head else None, self._reported_inf, found_inf]
        if not (device is not None and self._fused_plain_step(gathered, device, heads, flags)):
            self._generic_plain_step(gathered, device, heads, flags)
        self._perturbed, self.head_grads, self._head_norm, self._step_norm = {}, {}, None, None
        self.phase = "idle"
        if after_perturb_hooks:  # what the helpers keep until the last phase's hooks
            for helper in self.helpers.values():
                helper.step_ended_at_perturbation()
        if self.schedule is not None:
            self.schedule.step_taken(sharpened=False)

    def _fused_plain_step(self, gathered, device: torch.device, heads: dict, flags: list) -> bool:
        """The plain step through the backend's fused base step, its weights "restored" from
        themselves: the op reads w where a restore reads the backup, so one pass moves the
        bytes of the base step alone, and adds g_H itself. False (nothing written) where the
        step is not fused, or a parameter has g_H without a gradient now or the reverse."""
        if torch.compiler.is_compiling():  # an op whose read list aliases its written one: kept out of graphs
            return False
        backend, ops = self._ops(gathered, device)
        fused = _fused_step_of(self.base, backend)
        if fused is None or any(index in heads and heads[index][0] != list(map(id, params))
                                for index, _, params, _ in gathered):
            return False
        if set(heads) - {index for index, _, params, _ in gathered if params}:
            return False  # a group whose parameters only the head loss reached
        skip = self._skip_flag(flags, device)
        self._run_fused(fused, ops, lambda created: [
            call for index, group, ps, gs in gathered
            for call in fused.calls(self.base, group, ps, gs, ps, heads[index][1] if index in heads else None, skip,
                                    created)])
        return True

    def _run_fused(self, fused: _FusedStep, ops, calls_of: Callable[[list], list], restore_params=(),
                   restore_backups=()) -> None:
        """The fused base step: its calls (``calls_of(created)``, which records the parameters
        given a first state) checked before the first writes, the restore of parameters that
        only need one, then the calls, between the base optimizer's step hooks. A rejected
        step forgets the state it began to create."""
        created: list[Tensor] = []
        try:
            calls = calls_of(created)
            if len(calls) > 1 or restore_params:  # each op checks its own input: none may reject after a write
                for _, name, args in calls:
                    _PRECHECKS[name](*args)
            fire_pre_hooks(self.base)  # the fused op is the base's step(): its hooks fire as step()'s would
            ops.restore_(list(restore_params), list(restore_backups))
            for pairs, name, args in calls:
                op = getattr(ops, name)
                guarded(lambda: op(*args), pairs)
        except BaseException:
            fused.forget_created(self.base, created)
            raise
        fire_post_hooks(self.base)

    def _generic_plain_step(self, gathered, device: Optional[torch.device], heads: dict, flags: list) -> None:
        """The base optimizer's own step() on .grad, g_H added into new tensors first."""
        replaced: list[tuple[Tensor, Optional[Tensor]]] = []  # (parameter, its .grad before) for a retry
        try:
            for index, group, _, _ in gathered:
                head = heads.get(index)
                if head is None:
                    continue
                by_id = dict(zip(*head))
                both = [p for p in group["params"] if p.grad is not None and id(p) in by_id]
                summed = torch._foreach_add([p.grad for p in both], [by_id[id(p)] for p in both]) if both else []
                for p, g in zip(both, summed):
                    replaced.append((p, p.grad))
                    p.grad = g
                for p in group["params"]:  # only the head loss reached it: its gradient is g_H alone
                    if p.grad is None and id(p) in by_id:
                        replaced.append((p, None))
                        p.grad = by_id[id(p)]
                        if device is None:
                            device = p.device
            skip = self._skip_flag(flags, device) if device is not None else None
            # Reading the flag syncs with the device, as GradScaler.step does; no flag, no sync.
            if skip is None or not bool(skip != 0):
                self.base.step()
        except BaseException:
            for p, g in replaced:
                p.grad = g
            raise

    def _restore_and_step(self, with_head: bool, found_inf: Optional[Tensor]) -> None:
        self._run_phase_hooks("step")
        perturbed, norm = self._perturbed, self._step_norm
        heads = self.head_grads if with_head else {}
        flags = [norm, self._head_norm if with_head else None, self._reported_inf, found_inf]
        gathered, device = gather(self.base.param_groups)
        # Before the lists below are built: the reference backend's checks may replace a gradient.
        backend_and_ops = self._ops(gathered, device) if device is not None else None
        groups = []  # per group: (group, params, grads, backups, head grads or None)
        restore_params, restore_backups = [], []
        for index, group, params, grads in gathered:
            plan, head = perturbed.get(index), heads.get(index)
            if plan is not None and (head is None or head[0] == plan.ids) and plan.ids == list(map(id, params)):
                # The usual step: the same parameters had gradients in every phase.
                groups.append((group, params, grads, plan.backups, None if head is None else head[1]))
            elif params or plan is not None or head is not None:
                ps, gs, bs, hs, rps, rbs = self._irregular_group(group, plan, head)
                groups.append((group, ps, gs, bs, hs))
                restore_params += rps
                restore_backups += rbs
                if device is None and (ps or rps):
                    device = (ps or rps)[0].device
        if device is None:
            return
        backend, ops = backend_and_ops or self._ops(gathered, device)
        # Parameters perturbed but without a gradient now are only restored: after every
        # check below has passed, so that a rejected step leaves all weights at w + e.
        fused = _fused_step_of(self.base, backend)
        if fused is not None:
            skip = self._skip_flag(flags, device)
            self._run_fused(fused, ops, lambda created: [
                call for group, ps, gs, bs, hs in groups
                for call in fused.calls(self.base, group, ps, gs, bs, hs, skip, created)], restore_params,
                restore_backups)
            return
        # The combined gradient goes into new tensors, the tail's kept: a base step that
        # raises leaves .grad as it was, so that a retry does not add g_H twice.
        replaced: list[tuple[Tensor, Tensor]] = []
        for _, ps, gs, _, _ in groups:  # what can be refused before anything is written
            fix_layouts(ps, gs)
        check_base_state(self.base, [p for _, ps, _, _, _ in groups for p in ps])
        try:
            ops.restore_(restore_params, restore_backups)
            for _, ps, gs, bs, hs in groups:
                ops.restore_(ps, bs)  # a copy from the backups: repeating it is harmless
                if hs is not None:
                    with_h = [j for j, h in enumerate(hs) if h is not None]
                    ps_h, hs_h = [ps[j] for j in with_h], [hs[j] for j in with_h]
                    gs_h = [gs[j].clone(memory_format=torch.preserve_format) for j in with_h]
                    guarded(lambda: ops.add_head_grads_(gs_h, hs_h), [(ps_h, gs_h, False), (ps_h, hs_h, False)])
                    for p, g in zip(ps_h, gs_h):
                        replaced.append((p, p.grad))
                        p.grad = g
            # A non-finite perturbation gradient skips the base step (weights stay restored).
            # Reading the flag syncs with the device; the fused SGD path above never does.
            skip = self._skip_flag(flags, device)
            if skip is not None and bool(skip != 0):
                return
            self.base.step()
        except BaseException:
            for p, g in replaced:
                p.grad = g
            raise

    def _irregular_group(self, group: dict, plan: Optional[GroupPlan], head):
        """A group whose parameters with gradients changed between phases, one parameter at a time.

        Returns its params, grads, backups and head grads (None where absent) for the step,
        and the perturbed parameters without a gradient now, which are only restored.
        """
        perturbed = dict(zip(plan.ids, plan.backups)) if plan is not None else {}
        heads = dict(zip(*head)) if head is not None else {}
        ps, gs, bs, hs, restore_params, restore_backups = [], [], [], [], [], []
        for p in group["params"]:
            g, key = p.grad, id(p)
            h = heads.get(key)
            if g is None:
                if h is None:
                    if key in perturbed:  # perturbed, but no gradient now: restore only
                        restore_params.append(p)
                        restore_backups.append(perturbed[key])
                    continue
                p.grad, g, h = h, h, None  # only the head loss reached it: its gradient is g_H alone
            b = perturbed.get(key)
            if b is None:  # its gradient appeared only now: nothing to undo
                b = self._cache.backup(p)
                b.copy_(p)
            ps.append(p)
            gs.append(g)
            bs.append(b)
            hs.append(h)
        return ps, gs, bs, hs, restore_params, restore_backups

    @staticmethod
    def _skip_flag(flags: list, device: torch.device) -> Optional[Tensor]:
        """A 0-d float on the device, nonzero (NaN counts) when the step must be skipped; None if
        nothing can say so. ``flags``: the g_T norm, the g_H norm, the reported flag and the
        caller's found_inf, each None or a 0-d tensor."""
        norm, head_norm, reported, found_inf = flags
        # norm - norm is 0 for a finite norm and NaN for an infinite or NaN one; every op
        # skips on a flag != 0, which NaN is: one kernel instead of isfinite, not and a cast.
        parts = [n - n for n in (norm, head_norm) if n is not None]
        parts += [f.reshape(()).to(device=device, dtype=torch.float32) for f in (reported, found_inf) if f is not None]
        if not parts:
            return None
        skip = parts[0]
        for part in parts[1:]:  # maximum keeps a NaN
            skip = torch.maximum(skip, part)
        return skip


def _check_found_inf(found_inf) -> None:
    if found_inf is not None and not isinstance(found_inf, Tensor):
        raise TypeError(f"found_inf must be a tensor holding one value (a 0-d flag on the device, nonzero skips "
                        f"the step), or None; got {type(found_inf).__name__} {found_inf!r}")
    if found_inf is not None and found_inf.numel() != 1:
        raise ValueError(f"found_inf must hold one value (a 0-d flag), got shape {tuple(found_inf.shape)}")
