"""The compiled ops (``torch.ops.imbsam.*``, from imbsam._C): loading, availability, fakes, wrappers.

One schema per op (csrc/ops.cpp); the device of the tensors picks the kernel (CPU or
CUDA). Each op below has its fake (meta) kernel, so torch.compile and CUDA graphs can
trace it, beside the wrapper with the signature of ``imbsam.backends.reference``. The
wrappers only add what the dispatcher cannot do: an empty list has no device to dispatch
on. The in-place ops return nothing; the norm is a 0-d tensor whose dtype follows the spec.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

from imbsam.backends import reference

# ---- loading imbsam._C once, remembering why it failed, if it did -------------------------

LOAD_ERROR: str | None = None
try:
    from imbsam import _C  # noqa: F401  (importing it registers the torch.ops.imbsam ops)
except Exception as exc:  # any failure means "no compiled backend", with the reason kept
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

LOADED = LOAD_ERROR is None


def has_kernel(dispatch_key: str) -> bool:
    """Whether every imbsam op has a compiled kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    if not LOADED:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"imbsam::{n}", dispatch_key) for n in reference.OPS)


# ---- whether the kernels can run here (the registry asks) -------------------------------

def usable_on_cpu(device_type: str) -> bool:
    return device_type == "cpu" and has_kernel("CPU")


def usable_on_cuda(device_type: str) -> bool:
    return (device_type == "cuda" and torch.cuda.is_available() and has_kernel("CUDA")
            and cuda_image_error(None) is None)


def why_unusable(dispatch_key: str) -> str:
    if not LOADED:
        return f"the compiled library did not load: {LOAD_ERROR}"
    if dispatch_key == "CUDA" and not torch.cuda.is_available():
        return "no CUDA device is visible"
    if dispatch_key == "CUDA" and has_kernel("CUDA"):
        return cuda_image_error(None) or "its kernels cannot run on this GPU"
    return "imbsam._C was built without its kernels (CUDA toolkit missing at build time?)"


def cuda_unusable_at(device: torch.device) -> "str | None":
    # Only where the kernels and a GPU are there: a build without them is not usable at all.
    if not (has_kernel("CUDA") and torch.cuda.is_available()):
        return None
    return cuda_image_error(device.index)


def cuda_image_error(device_index: int | None) -> str | None:
    """Why imbsam's CUDA kernels cannot run on this GPU (None when they can): a library
    built for other architectures has no kernel image for it. ``None``: the current GPU.
    Asked once per device (cached by its index, so that a machine with GPUs of two
    architectures gets each one's answer)."""
    return _image_error_of(torch.cuda.current_device() if device_index is None else device_index)


@functools.lru_cache(maxsize=None)
def _image_error_of(index: int) -> str | None:
    probe = getattr(torch.ops.imbsam, "cuda_kernel_image_error", None) if LOADED else None
    if probe is None:
        return "imbsam._C was built without its CUDA kernels"
    reason = probe(index)
    if not reason:
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return (f"imbsam._C has no kernel image for {torch.cuda.get_device_name(index)} (compute capability "
            f"{major}.{minor}): {reason}; rebuild for it with TORCH_CUDA_ARCH_LIST={major}.{minor} "
            f"pip install --no-build-isolation .")


def _require_library() -> None:
    if not LOADED:
        raise RuntimeError(
            "imbsam's compiled library (imbsam._C) is not available: "
            f"{LOAD_ERROR}. Build it with `pip install --no-build-isolation -e .`, "
            "or use backend='reference'."
        )


def _fake(name: str):
    """Registers the decorated function as the fake kernel of ``imbsam::name`` (when _C loaded)."""
    def register(fn):
        if LOADED:
            torch.library.register_fake(f"imbsam::{name}")(fn)
        return fn
    return register


# ---- the ops, each fake beside its wrapper ----------------------------------------------

@_fake("grad_norm")
def _grad_norm_fake(grads, adaptive_grads, adaptive_params, eta_a):
    everything = list(grads) + list(adaptive_grads)
    return everything[0].new_empty((), dtype=reference.norm_dtype(everything))


def grad_norm(grads: Sequence[Tensor], adaptive_grads: Sequence[Tensor], adaptive_params: Sequence[Tensor],
              eta_a: float) -> Tensor:
    _require_library()
    if not grads and not adaptive_grads:
        return reference.grad_norm(grads, adaptive_grads, adaptive_params, eta_a)
    return torch.ops.imbsam.grad_norm(list(grads), list(adaptive_grads), list(adaptive_params), float(eta_a))


@_fake("perturb_")
def _perturb_fake(params, grads, backups, norm, rho, eta_a, adaptive):
    return None


def perturb_(params: Sequence[Tensor], grads: Sequence[Tensor], backups: Sequence[Tensor], norm: Tensor, rho: float,
             eta_a: float, adaptive: bool) -> None:
    _require_library()
    if params:
        torch.ops.imbsam.perturb_(list(params), list(grads), list(backups), norm, float(rho), float(eta_a),
                                  bool(adaptive))


@_fake("restore_")
def _restore_fake(params, backups):
    return None


def restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    _require_library()
    if params:
        torch.ops.imbsam.restore_(list(params), list(backups))


@_fake("add_head_grads_")
def _add_head_grads_fake(grads, head_grads):
    return None


def add_head_grads_(grads: Sequence[Tensor], head_grads: Sequence[Tensor]) -> None:
    _require_library()
    if grads:
        torch.ops.imbsam.add_head_grads_(list(grads), list(head_grads))


@_fake("restore_sgd_step_")
def _restore_sgd_step_fake(params, grads, backups, head_grads, momentum_buffers, lr, momentum, dampening,
                           weight_decay, nesterov, maximize, first_momentum_step, lr_tensor=None, found_inf=None):
    return None


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


@_fake("restore_adam_step_")
def _restore_adam_step_fake(params, grads, backups, head_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                            lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
                            lr_tensor=None, found_inf=None):
    return None


def restore_adam_step_(params: Sequence[Tensor], grads: Sequence[Tensor], backups: Sequence[Tensor],
                       head_grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
                       max_exp_avg_sqs: Sequence[Tensor], state_steps: Sequence[Tensor], lr: float, beta1: float,
                       beta2: float, eps: float, weight_decay: float, decoupled_weight_decay: bool, amsgrad: bool,
                       maximize: bool, lr_tensor: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    _require_library()
    if params:
        torch.ops.imbsam.restore_adam_step_(
            list(params), list(grads), list(backups), list(head_grads), list(exp_avgs), list(exp_avg_sqs),
            list(max_exp_avg_sqs), list(state_steps), float(lr), float(beta1), float(beta2), float(eps),
            float(weight_decay), bool(decoupled_weight_decay), bool(amsgrad), bool(maximize), lr_tensor, found_inf)
