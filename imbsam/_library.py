"""Loads the compiled library imbsam._C once and remembers why it failed, if it did."""
from __future__ import annotations

import torch

LOAD_ERROR: str | None = None
try:
    from imbsam import _C  # noqa: F401  (importing it registers the torch.ops.imbsam ops)
except Exception as exc:  # any failure means "no compiled backend", with the reason kept
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

LOADED = LOAD_ERROR is None

OP_NAMES = ("grad_norm", "perturb_", "restore_", "add_head_grads_", "restore_sgd_step_")


def has_kernel(dispatch_key: str) -> bool:
    """Whether every imbsam op has a compiled kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    if not LOADED:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"imbsam::{n}", dispatch_key) for n in OP_NAMES)
