"""Pure-PyTorch reference of every imbsam op: the spec the fast backends are tested against.

Written for clarity, one tensor at a time. Each function has the same signature and
in-place contract as the compiled op of the same name (``torch.ops.imbsam.<name>``):

* ``grad_norm``            global L2 norm of the gradients (optionally ASAM-scaled)
* ``perturb_``             ``backup <- w``; ``w <- w + e`` with ``e = rho * T^2 * g / (||T g|| + eps0)``
* ``restore_``             ``w <- backup`` (bitwise exact: a copy, not a subtraction)
* ``add_head_grads_``      ImbSAM combine ``g <- g + g_H``
* ``restore_sgd_step_``    restore, combine and a ``torch.optim.SGD`` step in one pass
* ``restore_adam_step_``   restore, combine and a ``torch.optim.Adam`` / ``AdamW`` step in one pass

Math runs in float32 for bfloat16/float16 tensors and in the tensor's own dtype for
float32/float64, then rounds once to the tensor's dtype. Each op checks its inputs first,
with the checks (and messages) of the fast backends, so it refuses what they refuse.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from imbsam.backends import checks

# The ops every backend implements, with these functions' signatures: the one list of them.
OPS = ("grad_norm", "perturb_", "restore_", "add_head_grads_", "restore_sgd_step_", "restore_adam_step_")

# The paper's code adds this to the norm so that a zero gradient gives e = 0, not NaN.
NORM_EPS = 1e-16


def _math_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def norm_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The norm is float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _asam_scale(p: Tensor, eta_a: float) -> Tensor:
    """ASAM's elementwise T = |w| + eta_a, in math precision."""
    return p.to(_math_dtype(p)).abs() + eta_a


def grad_norm(
    grads: Sequence[Tensor],
    adaptive_grads: Sequence[Tensor],
    adaptive_params: Sequence[Tensor],
    eta_a: float,
) -> Tensor:
    """sqrt(sum ||g||^2 over ``grads`` + sum ||(|w| + eta_a) * g||^2 over the adaptive pairs).

    Returns a 0-d tensor on the tensors' device (CPU for empty lists); float64 when any
    input is float64, else float32. Never synchronises with the host.
    """
    checks.grad_norm_lists(grads, adaptive_grads, adaptive_params)
    everything = list(grads) + list(adaptive_grads)
    dtype = norm_dtype(everything)
    device = everything[0].device if everything else torch.device("cpu")
    squares = [g.to(torch.float64).square().sum() for g in grads]
    squares += [
        (g.to(torch.float64) * _asam_scale(p, eta_a).to(torch.float64)).square().sum()
        for g, p in zip(adaptive_grads, adaptive_params)
    ]
    if not squares:
        return torch.zeros((), dtype=dtype, device=device)
    return torch.stack(squares).sum().sqrt().to(dtype)


def perturbation_scale(norm: Tensor, rho: float) -> Tensor:
    """rho / (norm + eps0), or 0 when the norm is not finite (the step is then skipped)."""
    scale = rho / (norm.to(torch.float64) + NORM_EPS)
    return torch.where(torch.isfinite(norm), scale, torch.zeros_like(scale))


def perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    backups: Sequence[Tensor],
    norm: Tensor,
    rho: float,
    eta_a: float,
    adaptive: bool,
) -> None:
    """backup <- w, then w <- w + e, e = rho * T^2 * g / (norm + eps0) (T = 1 unless adaptive).

    A non-finite ``norm`` leaves every ``w`` unchanged (e = 0); ``backup`` is still written.
    """
    checks.perturb_lists(params, grads, backups)
    checks.check_scalar_on("perturb_", norm, "norm", params)
    for p, g, b in zip(params, grads, backups):
        b.copy_(p)
        dtype = _math_dtype(p)
        e = perturbation_scale(norm, rho).to(dtype) * g.to(dtype)
        if adaptive:
            e = e * _asam_scale(p, eta_a).square()
        # 0 * NaN is NaN: a non-finite norm must mask e, not only zero the scale.
        e = torch.where(torch.isfinite(norm), e, torch.zeros_like(e))
        p.copy_(p.to(dtype) + e)


def restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    """w <- backup: a copy, so the restore is bitwise exact in every dtype."""
    checks.restore_lists(params, backups)
    for p, b in zip(params, backups):
        p.copy_(b)


def add_head_grads_(grads: Sequence[Tensor], head_grads: Sequence[Tensor]) -> None:
    """ImbSAM's combine: g <- g_T' + g_H."""
    checks.add_head_grads_lists(grads, head_grads)
    for g, h in zip(grads, head_grads):
        dtype = _math_dtype(g)
        g.copy_(g.to(dtype) + h.to(dtype))


def restore_sgd_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    backups: Sequence[Tensor],
    head_grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_momentum_step: bool,
    lr_tensor: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """w <- backup, then one ``torch.optim.SGD`` step with d = g (+ g_H when given).

    ``head_grads`` is empty for SAM; ``momentum_buffers`` is empty when momentum == 0.
    With ``first_momentum_step`` the buffers are written as ``buf = d`` (SGD's first
    step clones the gradient); otherwise ``buf = momentum * buf + (1 - dampening) * d``.
    ``lr_tensor`` (0-d), when given, replaces ``lr``. A nonzero ``found_inf`` (0-d) skips
    the SGD update: the weights are restored and the buffers are left unchanged.

    ``grads`` are read, not modified (``torch.optim.SGD`` does not modify them either).
    """
    checks.check_sgd_options(momentum, dampening, nesterov, momentum_buffers)
    checks.sgd_step_lists(params, grads, backups, head_grads, momentum_buffers, momentum)
    checks.check_step_scalars("restore_sgd_step_", params, lr_tensor, found_inf)
    restore_(params, backups)
    # The reference may read the flag on the host; the compiled ops never do.
    if found_inf is not None and bool(found_inf.item() != 0):
        return
    step_lr = lr_tensor.item() if lr_tensor is not None else lr
    for i, (p, g) in enumerate(zip(params, grads)):
        dtype = _math_dtype(p)
        d = g.to(dtype)
        if head_grads:
            d = d + head_grads[i].to(dtype)
        if maximize:
            d = -d
        if weight_decay != 0:
            d = d + weight_decay * p.to(dtype)
        if momentum != 0:
            buf = momentum_buffers[i]
            if first_momentum_step:
                new_buf = d
            else:
                new_buf = momentum * buf.to(dtype) + (1 - dampening) * d
            buf.copy_(new_buf)
            # SGD steps with the buffer as stored (rounded to the parameter dtype).
            new_buf = buf.to(dtype)
            d = d + momentum * new_buf if nesterov else new_buf
        p.copy_(p.to(dtype) - step_lr * d)


def restore_adam_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    backups: Sequence[Tensor],
    head_grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    lr_tensor: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """w <- backup, then one ``torch.optim.Adam`` step (``AdamW``'s with
    ``decoupled_weight_decay``) with d = g (+ g_H when given).

    In torch's order of operations (its single-tensor step): each ``state_steps[i]`` (0-d)
    += 1; d negated for ``maximize``; weight decay coupled (d += wd * w) or decoupled
    (w *= 1 - lr * wd); m = lerp(m, d, 1 - beta1); v = beta2 * v + (1 - beta2) * d^2;
    with ``amsgrad`` vmax = max(vmax, v) replaces v below; w -= lr / (1 - beta1^step) * m /
    (sqrt(v) / sqrt(1 - beta2^step) + eps). bf16/fp16 compute in fp32 (as ``fused=True``
    does) and round m, v and w once. ``head_grads`` is empty for SAM, ``max_exp_avg_sqs``
    without amsgrad. A nonzero ``found_inf`` restores the weights and leaves m, v, vmax and
    the steps unchanged. ``grads`` are read, not modified.
    """
    checks.adam_step_lists(params, grads, backups, head_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad)
    checks.check_step_scalars("restore_adam_step_", params, lr_tensor, found_inf)
    checks.check_adam_steps(params, state_steps, found_inf)
    restore_(params, backups)
    # The reference may read the flag on the host; the compiled ops never do.
    if found_inf is not None and bool(found_inf.item() != 0):
        return
    step_lr = lr_tensor.item() if lr_tensor is not None else lr
    for i, (p, g) in enumerate(zip(params, grads)):
        state_steps[i].add_(1)
        step = state_steps[i].item()
        dtype = _math_dtype(p)
        # Python floats rounded to the math dtype, as torch's tensor-scalar ops round them.
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
        neg_step_size = -(step_lr / (1 - beta1 ** step))
        w = p.to(dtype)
        d = g.to(dtype)
        if head_grads:
            d = d + head_grads[i].to(dtype)
        if maximize:
            d = -d
        if weight_decay != 0:
            if decoupled_weight_decay:
                w = w * (1 - step_lr * weight_decay)
            else:
                d = d + weight_decay * w
        m = torch.lerp(exp_avgs[i].to(dtype), d, 1 - beta1)
        v = exp_avg_sqs[i].to(dtype) * beta2 + (1 - beta2) * d * d
        second = v
        if amsgrad:
            second = torch.maximum(max_exp_avg_sqs[i].to(dtype), v)
            max_exp_avg_sqs[i].copy_(second)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        p.copy_(w + neg_step_size * m / (second.sqrt() / bias_correction2_sqrt + eps))
