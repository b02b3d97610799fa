"""torch.optim's step hooks, fired the way ``Optimizer.step``'s own wrapper fires them.

The phases are a SAM step, so the wrapper optimizer's hooks fire around its last phase;
the fused path replaces the base optimizer's ``step()``, so the hooks that ``step()``
would have fired for the base optimizer (EMA, logging and profiling libraries register
them there) fire around the fused op instead: the same hooks, once a step, on both paths.
"""
from __future__ import annotations

import itertools

import torch
from torch.optim import optimizer as torch_optimizer


def fire_pre_hooks(optimizer: torch.optim.Optimizer) -> None:
    """torch.optim's global step pre-hooks, then ``optimizer``'s own, with no arguments."""
    for hook in itertools.chain(torch_optimizer._global_optimizer_pre_hooks.values(),
                                optimizer._optimizer_step_pre_hooks.values()):
        if hook(optimizer, (), {}) is not None:
            raise RuntimeError(f"imbsam: a step pre-hook of {type(optimizer).__name__} returned new arguments, but "
                               "SAM's phases take none to replace; use it with step(closure), or return None")


def fire_post_hooks(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer``'s own step post-hooks, then torch.optim's global ones."""
    for hook in itertools.chain(optimizer._optimizer_step_post_hooks.values(),
                                torch_optimizer._global_optimizer_post_hooks.values()):
        hook(optimizer, (), {})
