"""The fused path's knowledge of ``torch.optim.SGD``: when its step may be replaced by the
backend's restore_sgd_step_ (restore + combine + SGD in one pass), how a group's
parameters become calls of that op, and the op's checks in Python for multi-call steps.
Beside it: ``_fused_adam``, the same for torch.optim.Adam / AdamW."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from imbsam.backends import checks
from imbsam.optim._inputs import fix_layouts, has_none


def fused_sgd_possible(base: torch.optim.Optimizer) -> bool:
    # Exactly torch.optim.SGD: a subclass may change the update. `differentiable`
    # needs autograd through the step, which the compiled ops do not provide.
    return type(base) is torch.optim.SGD and not any(
        g.get("differentiable", False) for g in base.param_groups)


def fused_sgd_calls(base: torch.optim.Optimizer, group, ps, gs, bs, hs, found_inf, created: list) -> list:
    """The restore_sgd_step_ calls of one group, to be run by the caller, each (the pairs
    guarded() may repair, the op's name, its arguments). ``hs``: head gradients (None
    entries where absent) or None. Parameters given a first buffer go into ``created``."""
    if not ps:
        return []
    state = base.state
    momentum = group["momentum"]
    lr = group["lr"]
    lr_tensor = None
    if isinstance(lr, Tensor):
        lr_tensor, lr = lr.to(device=ps[0].device, dtype=torch.float32), 0.0
    # .get: the base state is a defaultdict, and a look-up must not add entries to it.
    bufs = [state.get(p, {}).get("momentum_buffer") for p in ps] if momentum != 0 else None
    # The op takes whole lists of head gradients and momentum buffers, or none: one call
    # per (has head gradient, has momentum buffer) subset; usually there is one.
    if (hs is None or not has_none(hs)) and (bufs is None or not has_none(bufs)):
        subsets = {(hs is not None, bufs is not None): None}  # None: every index
    else:
        subsets = defaultdict(list)
        for j in range(len(ps)):
            subsets[(hs is not None and hs[j] is not None, bufs is not None and bufs[j] is not None)].append(j)
    calls = []
    for (has_head, has_buf), idx in subsets.items():
        pick = (lambda xs: xs) if idx is None else (lambda xs, idx=idx: [xs[j] for j in idx])
        if momentum != 0 and not has_buf:  # SGD's first step: the op writes buf = d
            for j in idx:
                # Zeros, not empty: a skipped first step leaves the buffer as
                # allocated, and the next step's momentum * 0 + (1 - dampening) * d
                # is SGD's first step exactly when dampening is 0.
                bufs[j] = state[ps[j]]["momentum_buffer"] = torch.zeros_like(
                    ps[j], memory_format=torch.preserve_format)
                created.append(ps[j])
        sp, sg, sh = pick(ps), pick(gs), pick(hs) if has_head else []
        sb, sbuf = pick(bs), pick(bufs) if momentum != 0 else []
        calls.append(([(sp, sg, True), (sp, sh, False)] if has_head else [(sp, sg, True)], "restore_sgd_step_",
                      (sp, sg, sb, sh, sbuf, lr, momentum, group.get("dampening", 0.0),
                       group.get("weight_decay", 0.0), group.get("nesterov", False), group.get("maximize", False),
                       not has_buf, lr_tensor, found_inf)))
    return calls


def forget_created(base: torch.optim.Optimizer, created: list) -> None:
    """A rejected step leaves the base optimizer's state as it was."""
    for p in created:
        base.state[p].pop("momentum_buffer", None)
        if not base.state[p]:
            del base.state[p]


def precheck_sgd_step(ps, gs, bs, hs, bufs, lr, momentum, dampening, weight_decay, nesterov, maximize,
                       first, lr_tensor, found_inf) -> None:
    """The checks restore_sgd_step_ makes before it writes, in Python: when a step takes
    several calls, all of them pass before the first one writes. Gradients laid out
    unlike their parameters are copied into their layout first, as guarded() would."""
    op = "restore_sgd_step_"
    fix_layouts(ps, gs)
    checks.check_list(op, ps, "params")
    checks.check_all_match(op, ps, "params", (gs, "grads"), (bs, "backups"),
                              *([(hs, "head_grads")] if hs else []),
                              *([(bufs, "momentum_buffers")] if bufs else []))
    checks.check_step_scalars(op, ps, lr_tensor, found_inf)
