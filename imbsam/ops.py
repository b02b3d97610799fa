"""The compiled ops (``torch.ops.imbsam.*``) behind the same signatures as ``imbsam.reference``.

One schema per op (csrc/ops.cpp); the device of the tensors picks the kernel (CPU or
CUDA). These wrappers only add what the dispatcher cannot do: an empty list has no
device to dispatch on.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from imbsam import _library, reference


def _require_library() -> None:
    if not _library.LOADED:
        raise RuntimeError(
            "imbsam's compiled library (imbsam._C) is not available: "
            f"{_library.LOAD_ERROR}. Build it with `pip install --no-build-isolation -e .`, "
            "or use backend='reference'."
        )


def grad_norm(grads: Sequence[Tensor], adaptive_grads: Sequence[Tensor], adaptive_params: Sequence[Tensor],
              eta_a: float) -> Tensor:
    _require_library()
    if not grads and not adaptive_grads:
        return reference.grad_norm(grads, adaptive_grads, adaptive_params, eta_a)
    return torch.ops.imbsam.grad_norm(list(grads), list(adaptive_grads), list(adaptive_params), float(eta_a))


def perturb_(params: Sequence[Tensor], grads: Sequence[Tensor], backups: Sequence[Tensor], norm: Tensor, rho: float,
             eta_a: float, adaptive: bool) -> None:
    _require_library()
    if params:
        torch.ops.imbsam.perturb_(list(params), list(grads), list(backups), norm, float(rho), float(eta_a),
                                  bool(adaptive))


def restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    _require_library()
    if params:
        torch.ops.imbsam.restore_(list(params), list(backups))


def add_head_grads_(grads: Sequence[Tensor], head_grads: Sequence[Tensor]) -> None:
    _require_library()
    if grads:
        torch.ops.imbsam.add_head_grads_(list(grads), list(head_grads))


def restore_sgd_step_(params: Sequence[Tensor], grads: Sequence[Tensor], backups: Sequence[Tensor],
                      head_grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], lr: float, momentum: float,
                      dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
                      first_momentum_step: bool, lr_tensor: Optional[Tensor] = None,
                      found_inf: Optional[Tensor] = None) -> None:
    _require_library()
    if params:
        torch.ops.imbsam.restore_sgd_step_(
            list(params), list(grads), list(backups), list(head_grads), list(momentum_buffers), float(lr),
            float(momentum), float(dampening), float(weight_decay), bool(nesterov), bool(maximize),
            bool(first_momentum_step), lr_tensor, found_inf)
