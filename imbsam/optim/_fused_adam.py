"""The fused path's knowledge of ``torch.optim.Adam`` / ``AdamW``: when their step may be
replaced by the backend's restore_adam_step_ (restore + combine + Adam(W) in one pass),
how a group's parameters become calls of that op, and the op's checks in Python for
multi-call steps. The state stays the base optimizer's own (``step``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``), created as torch creates it, so ``state_dict()``
is interchangeable with a plain Adam(W) run's. Beside it: ``_fused_sgd``."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from imbsam.backends import checks
from imbsam.optim._inputs import fix_layouts, has_none

_ADAMS = (torch.optim.Adam, torch.optim.AdamW)
# The state keys torch.optim.Adam creates, in its order; max_exp_avg_sq only with amsgrad.
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def fused_adam_possible(base: torch.optim.Optimizer) -> bool:
    # Exactly Adam or AdamW: a subclass may change the update. `differentiable` needs
    # autograd through the step; betas given as tensors are left to torch.
    return type(base) in _ADAMS and not any(
        g.get("differentiable", False) or any(isinstance(b, Tensor) for b in g["betas"]) for g in base.param_groups)


def _decoupled(base: torch.optim.Optimizer, group: dict) -> bool:
    # torch >= 2.6 keeps it in the group (AdamW sets it); before, AdamW was its own class.
    return bool(group.get("decoupled_weight_decay", type(base) is torch.optim.AdamW))


def _new_state(p: Tensor, group: dict) -> dict:
    """The state torch.optim.Adam's first step gives ``p`` (Adam._init_group): the step
    count on the CPU unless capturable or fused (then on p's device, float32 when fused)."""
    on_device = group.get("capturable", False) or group.get("fused", False)
    default = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    state = {"step": torch.zeros((), dtype=torch.float32 if group.get("fused", False) else default,
                                 device=p.device if on_device else "cpu")}
    for key in STATE_KEYS[1:3] + (STATE_KEYS[3:] if group["amsgrad"] else ()):
        state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def fused_adam_calls(base: torch.optim.Optimizer, group, ps, gs, bs, hs, found_inf, created: list) -> list:
    """The calls of one group, to be run by the caller, each (the pairs guarded() may
    repair, the op's name, its arguments). ``hs``: head gradients (None entries where
    absent) or None. Parameters given a first state go into ``created``. Step counts on the
    CPU for device parameters (plain Adam's) cannot be skipped on the device: the skip flag
    is then read on the host (one sync, as the generic path's), and a skipped step is a
    restore."""
    if not ps:
        return []
    if _capturing(ps[0].device) and not (group.get("capturable", False) or group.get("fused", False)):
        # torch.optim.Adam refuses this capture too: the graph would replay neither the step
        # counts' host increment nor the bias corrections made from them.
        raise RuntimeError(f"imbsam: a CUDA-graph capture of {type(base).__name__}'s fused step with its step counts "
                           "on the CPU (capturable=False, torch's default): a replay would increment no step count "
                           "and keep the bias corrections of the captured step. Build the base optimizer with "
                           "capturable=True (or fused=True), as torch.optim.Adam itself requires for capture")
    state = base.state
    amsgrad = group["amsgrad"]
    for p in ps:
        if p not in state or not state[p]:  # .get-free: `in` does not add to the defaultdict
            state[p] = _new_state(p, group)
            created.append(p)
    # Each state list once per group; a call over a subset picks from them.
    states = [state[p] for p in ps]
    ms, vs, steps = ([s[k] for s in states] for k in ("exp_avg", "exp_avg_sq", "step"))
    vmaxs = [s["max_exp_avg_sq"] for s in states] if amsgrad else []
    if found_inf is not None and steps[0].device != ps[0].device:
        if bool(found_inf != 0):
            return [([(ps, gs, True)], "restore_", (ps, bs))]
        found_inf = None
    lr = group["lr"]
    lr_tensor = None
    if isinstance(lr, Tensor):
        lr_tensor, lr = lr.to(device=ps[0].device, dtype=torch.float32), 0.0
    beta1, beta2 = group["betas"]
    # The op takes a whole list of head gradients or none: one call per subset; usually one.
    if hs is None or not has_none(hs):
        subsets = {hs is not None: None}  # None: every index
    else:
        subsets = defaultdict(list)
        for j in range(len(ps)):
            subsets[hs[j] is not None].append(j)
    calls = []
    for has_head, idx in subsets.items():
        pick = (lambda xs: xs) if idx is None else (lambda xs, idx=idx: [xs[j] for j in idx])
        sp, sg, sb = pick(ps), pick(gs), pick(bs)
        sh = pick(hs) if has_head else []
        args = (sp, sg, sb, sh, pick(ms), pick(vs), pick(vmaxs) if amsgrad else [], pick(steps), lr, beta1,
                beta2, group["eps"], group["weight_decay"], _decoupled(base, group), amsgrad,
                group.get("maximize", False), lr_tensor, found_inf)
        pairs = [(sp, sg, True), (sp, sh, False)] if has_head else [(sp, sg, True)]
        calls.append((pairs, "restore_adam_step_", args))
    return calls


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def forget_created(base: torch.optim.Optimizer, created: list) -> None:
    """A rejected step leaves the base optimizer's state as it was."""
    for p in created:
        base.state.pop(p, None)


def precheck_adam_step(ps, gs, bs, hs, ms, vs, vmaxs, steps, lr, beta1, beta2, eps, weight_decay, decoupled,
                       amsgrad, maximize, lr_tensor, found_inf) -> None:
    """The checks restore_adam_step_ makes before it writes, in Python: when a step takes
    several calls, all of them pass before the first one writes. Gradients laid out
    unlike their parameters are copied into their layout first, as guarded() would."""
    op = "restore_adam_step_"
    fix_layouts(ps, gs)
    checks.adam_step_lists(ps, gs, bs, hs, ms, vs, vmaxs, amsgrad)
    checks.check_step_scalars(op, ps, lr_tensor, found_inf)
    checks.check_adam_steps(ps, steps, found_inf)
