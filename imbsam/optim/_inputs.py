"""The engine's input checks and repairs: gathering each group's parameters that have a
gradient, the precise errors for what cannot run, and the one retry after a layout repair.

These run for every parameter in every phase, so they do as little per parameter as they
can (an attribute read costs ~50 ns): the compiled ops check every tensor in C++ before
they write anything, and the Python checks run only when an op rejects its input
(``guarded``) or for a backend whose ops check nothing.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from imbsam.backends import checks

_SUPPORTED = frozenset(checks.SUPPORTED)


def has_none(xs) -> bool:
    # A plain loop: 3x faster than any(x is None for x in xs), and `None in xs` would call
    # Tensor.__eq__ on every element.
    for x in xs:
        if x is None:
            return True
    return False


def gather(param_groups) -> tuple[list[tuple[int, dict, list[Tensor], list[Tensor]]], Optional[torch.device]]:
    """Per group (index, group, params with a gradient, those gradients); the first one's device."""
    out, device = [], None
    for i, group in enumerate(param_groups):
        params = group["params"]
        grads = [p.grad for p in params]
        if has_none(grads):  # frozen or unused parameters
            keep = [j for j, g in enumerate(grads) if g is not None]
            params, grads = [params[j] for j in keep], [grads[j] for j in keep]
        if params:
            device = device or params[0].device
            # One device for the whole optimizer, checked here for every backend before any
            # write: one group on another device used to be stepped with garbage norms.
            if len(set(checks.each("device", params))) > 1 or params[0].device != device:
                other = next(p.device for p in params if p.device != device)
                raise ValueError(f"imbsam: parameters are on more than one device ({device} and {other}); "
                                 "one optimizer handles the parameters of one device")
        out.append((i, group, params, grads))
    return out, device


def fix_layouts(params: list[Tensor], tensors: list[Optional[Tensor]], is_grad: bool = True) -> bool:
    """Raises a precise error for what cannot run; copies gradients laid out unlike their
    parameter into its layout (in the list, and ``p.grad`` when ``is_grad``). True if it copied."""
    changed = False
    for j, (p, t) in enumerate(zip(params, tensors)):
        if t is None:
            continue
        fixed = checked_grad(p, t, assign=is_grad)
        if fixed is not t:
            tensors[j], changed = fixed, True
    return changed


def guarded(call: Callable[[], object], pairs) -> object:
    """Runs ``call()``; if the op rejects its input, fixes the layouts in ``pairs``
    (``(params, tensors, is_grad)``, lists the call reads) and runs it once more. A
    compiled op validates everything before it writes, so a rejected call changed nothing."""
    try:
        return call()
    except (TypeError, ValueError, RuntimeError):
        fixed = [fix_layouts(*pair) for pair in pairs]  # raises the precise error if it cannot run
        if not any(fixed):
            raise
        return call()


def checked_grad(p: Tensor, g: Tensor, assign: bool = True) -> Tensor:
    """Dense, a supported dtype, and laid out like its parameter (copied if not)."""
    if g.layout is not torch.strided:
        raise ValueError(f"imbsam: a parameter of shape {tuple(p.shape)} has a {g.layout} gradient; SAM "
                         "needs dense gradients (use dense embeddings, e.g. nn.Embedding(sparse=False))")
    if p.dtype not in _SUPPORTED:
        raise TypeError(f"imbsam: a parameter has dtype {p.dtype}; supported: {checks.SUPPORTED_NAMES}")
    if g.stride() != p.stride() and g.numel():
        # The kernels walk a parameter and its gradient as one flat array.
        g = g.new_empty_strided(p.size(), p.stride()).copy_(g)
        if assign:
            p.grad = g
    return g


def check_base_state(base: torch.optim.Optimizer, params: list[Tensor]) -> None:
    """Before the generic path's base step: torch.optim's own optimizers need every state
    tensor shaped like its parameter to share its dtype and device. Their step() raises
    only when it reaches such a tensor, after it has changed the state (Adam's step count)
    or the weights of the parameters before it; so it is checked here, before anything
    is written. (Other libraries' optimizers may keep state in another dtype on purpose.)"""
    if not type(base).__module__.startswith("torch.optim."):
        return
    for p in params:
        for name, value in base.state.get(p, {}).items():
            if isinstance(value, Tensor) and value.shape == p.shape and (value.dtype, value.device) != (p.dtype,
                                                                                                        p.device):
                raise TypeError(f"imbsam: {type(base).__name__}'s state {name!r} of a parameter of shape "
                                f"{tuple(p.shape)} is {value.dtype} on {value.device}, but the parameter is "
                                f"{p.dtype} on {p.device} (converted after the optimizer made its state, e.g. by "
                                "model.double()); convert the state too, or build the optimizer after converting "
                                "the model. The step stays perturbed: abandon_step() restores w")
