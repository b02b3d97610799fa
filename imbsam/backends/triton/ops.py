"""The Triton backend: the six imbsam ops as torch custom ops ``torch.ops.imbsam.triton_*``.

Same signatures and semantics as ``imbsam.backends.reference`` (the spec) and the compiled ops.
They are registered with ``torch.library.custom_op`` rather than ``triton_op``: the
kernels read tensor addresses from tables built on the host, which a traced
``triton_op`` body cannot do, so ``torch.compile`` sees each op as one opaque call
(with the fake kernels below). On a CPU the kernels run under ``TRITON_INTERPRET=1``.
"""
from typing import List, Optional

import torch
from torch import Tensor
from torch.utils import _python_dispatch

from imbsam.backends import adam_steps as steps
from imbsam.backends import checks, reference
from imbsam.backends.triton import probe

if probe.IMPORT_ERROR is None:  # without triton the ops exist but the registry never picks them
    from imbsam.backends.triton import kernels as K
    from imbsam.backends.triton import tables

# ---- the ops ---------------------------------------------------------------------
# Each op is a plain implementation (called directly in eager mode: the custom-op
# dispatcher costs more host time than the kernels take on a GPU) registered as a torch
# custom op for tracing, torch.compile and functionalisation. typing.List, not list[...],
# and no `from __future__ import annotations` in this file: torch < 2.5 infers a custom
# op's schema from evaluated typing annotations only.

def _grad_norm_impl(grads: List[Tensor], adaptive_grads: List[Tensor], adaptive_params: List[Tensor],
                    eta_a: float) -> Tensor:
    if not grads and not adaptive_grads:
        return reference.grad_norm(grads, adaptive_grads, adaptive_params, eta_a)

    def validate():
        checks.grad_norm_lists(grads, adaptive_grads, adaptive_params)

    first = grads[0] if grads else adaptive_grads[0]
    if grads and adaptive_grads and grads[0].device != adaptive_grads[0].device:
        validate()  # raises: each list's plan checks its own tensors, this is the one check across them
    device = first.device
    with tables.on_device(first):
        plans = [(False, tables.plan_for([grads], validate))] if grads else []
        if adaptive_grads:
            plans.append((True, tables.plan_for([adaptive_grads, adaptive_params], validate)))
        # Every chunk writes its own slot: no need to zero them.
        partials = torch.empty(max(1, sum(p.n_chunks for _, p in plans)), dtype=torch.float64, device=device)
        offset = 0
        for adaptive, plan in plans:
            for storage, math, tab in plan.groups:
                w_addrs = tab.addrs[1] if adaptive else tab.addrs[0]
                tables.launch(K.sum_squares_kernel, tab, tab.addrs[0], w_addrs, partials=partials[offset:], eta=eta_a,
                        ADAPTIVE=adaptive, DTYPE=storage, MATH=math)
                offset += tab.n_chunks
        # Stage two on the device: a double sum over the per-chunk partials, then sqrt.
        norm = partials[:offset].sum().sqrt_()
        return norm if any(p.has_double for _, p in plans) else norm.to(torch.float32)


def _perturb_impl(params: List[Tensor], grads: List[Tensor], backups: List[Tensor], norm: Tensor, rho: float,
                  eta_a: float, adaptive: bool) -> None:
    def validate():
        checks.perturb_lists(params, grads, backups)

    checks.check_scalar_on("perturb_", norm, "norm", params)
    if not params:
        return
    with tables.on_device(params[0]):
        for storage, math, tab in tables.plan_for([params, grads, backups], validate).groups:
            tables.launch(K.perturb_kernel, tab, tab.addrs[0], tab.addrs[1], tab.addrs[2], norm_ptr=norm, rho=rho,
                    eta=eta_a, ADAPTIVE=adaptive, DTYPE=storage, MATH=math)


def _restore_impl(params: List[Tensor], backups: List[Tensor]) -> None:
    def validate():
        checks.restore_lists(params, backups)

    if not params:
        return
    with tables.on_device(params[0]):
        for storage, _, tab in tables.plan_for([params, backups], validate).groups:
            tables.launch(K.copy_kernel, tab, tab.addrs[0], tab.addrs[1], DTYPE=storage)


def _add_head_grads_impl(grads: List[Tensor], head_grads: List[Tensor]) -> None:
    def validate():
        checks.add_head_grads_lists(grads, head_grads)

    if not grads:
        return
    with tables.on_device(grads[0]):
        for storage, math, tab in tables.plan_for([grads, head_grads], validate).groups:
            tables.launch(K.add_kernel, tab, tab.addrs[0], tab.addrs[1], DTYPE=storage, MATH=math)


# The flag the SGD kernel reads when no found_inf is given: a zero per device, created
# outside any CUDA-graph capture (one made inside a capture only holds 0 once replayed).
_ZEROS: dict = {}


def _zero_flag(device: torch.device) -> Tensor:
    flag = _ZEROS.get(device)
    if flag is None:
        flag = torch.zeros((), dtype=torch.float32, device=device)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _ZEROS[device] = flag
    return flag


def _restore_sgd_step_impl(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                           head_grads: List[Tensor], momentum_buffers: List[Tensor], lr: float, momentum: float,
                           dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
                           first_momentum_step: bool, lr_tensor: Optional[Tensor] = None,
                           found_inf: Optional[Tensor] = None) -> None:
    checks.check_sgd_options(momentum, dampening, nesterov, momentum_buffers)
    lists = [params, grads, backups] + ([head_grads] if head_grads else []) + (
        [momentum_buffers] if momentum != 0 else [])

    def validate():
        checks.sgd_step_lists(params, grads, backups, head_grads, momentum_buffers, momentum)

    if not params:
        return
    checks.check_step_scalars("restore_sgd_step_", params, lr_tensor, found_inf)
    device = params[0].device
    with tables.on_device(params[0]):
        plan = tables.plan_for(lists, validate)
        flag = (found_inf if found_inf is not None else _zero_flag(device)).to(torch.float32)
        lr_ptr = lr_tensor.to(torch.float32) if lr_tensor is not None else flag
        for storage, math, tab in plan.groups:
            h = tab.addrs[3] if head_grads else tab.addrs[0]
            buf = tab.addrs[-1] if momentum != 0 else tab.addrs[0]
            tables.launch(K.sgd_kernel, tab, tab.addrs[0], tab.addrs[1], tab.addrs[2], h, buf, lr=lr, lr_ptr=lr_ptr,
                    found_inf_ptr=flag, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                    HAS_HEAD=bool(head_grads), HAS_MOMENTUM=momentum != 0, FIRST=first_momentum_step,
                    NESTEROV=nesterov, MAXIMIZE=maximize, HAS_LR_PTR=lr_tensor is not None, DTYPE=storage,
                    MATH=math)


def _restore_adam_step_impl(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                            head_grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                            max_exp_avg_sqs: List[Tensor], state_steps: List[Tensor], lr: float, beta1: float,
                            beta2: float, eps: float, weight_decay: float, decoupled_weight_decay: bool,
                            amsgrad: bool, maximize: bool, lr_tensor: Optional[Tensor] = None,
                            found_inf: Optional[Tensor] = None) -> None:
    checks.check_adam_options(amsgrad, max_exp_avg_sqs)
    lists = [params, grads, backups] + ([head_grads] if head_grads else []) + [exp_avgs, exp_avg_sqs] + (
        [max_exp_avg_sqs] if amsgrad else [])

    def validate():
        checks.adam_step_lists(params, grads, backups, head_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad)

    if not params:
        return
    checks.check_step_scalars("restore_adam_step_", params, lr_tensor, found_inf)
    checks.check_adam_steps(params, state_steps, found_inf)
    device = params[0].device
    with tables.on_device(params[0]):
        plan = tables.plan_for(lists, validate)
        flag = (found_inf if found_inf is not None else _zero_flag(device)).to(torch.float32)
        lr_ptr = lr_tensor.to(torch.float32) if lr_tensor is not None else flag
        steps.increment(state_steps, None if found_inf is None else flag)
        coefs = steps.bias_corrections(state_steps, device, lr if lr_tensor is None else lr_tensor, beta1, beta2)
        n_head = 1 if head_grads else 0
        for storage, math, tab in plan.groups:
            a = tab.addrs
            h = a[3] if head_grads else a[0]
            vmax = a[5 + n_head] if amsgrad else a[0]
            tables.launch(K.adam_kernel, tab, a[0], a[1], a[2], h, a[3 + n_head], a[4 + n_head], vmax, tab.index,
                          coefs, decay=1 - lr * weight_decay, lr_ptr=lr_ptr, found_inf_ptr=flag,
                          lerp_weight=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2, eps=eps,
                          weight_decay=weight_decay, HAS_HEAD=bool(head_grads), AMSGRAD=amsgrad,
                          DECOUPLED=decoupled_weight_decay, HAS_WD=weight_decay != 0, MAXIMIZE=maximize,
                          HAS_LR_PTR=lr_tensor is not None, DTYPE=storage, MATH=math)


_grad_norm = torch.library.custom_op("imbsam::triton_grad_norm", _grad_norm_impl, mutates_args=())
_perturb = torch.library.custom_op("imbsam::triton_perturb_", _perturb_impl, mutates_args=("params", "backups"))
_restore = torch.library.custom_op("imbsam::triton_restore_", _restore_impl, mutates_args=("params",))
_add_head_grads = torch.library.custom_op("imbsam::triton_add_head_grads_", _add_head_grads_impl,
                                          mutates_args=("grads",))
_restore_sgd_step = torch.library.custom_op("imbsam::triton_restore_sgd_step_", _restore_sgd_step_impl,
                                            mutates_args=("params", "momentum_buffers"))


@_grad_norm.register_fake
def _(grads, adaptive_grads, adaptive_params, eta_a):
    everything = list(grads) + list(adaptive_grads)
    return everything[0].new_empty((), dtype=reference.norm_dtype(everything))


_restore_adam_step = torch.library.custom_op(
    "imbsam::triton_restore_adam_step_", _restore_adam_step_impl,
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"))


for _op in (_perturb, _restore, _add_head_grads, _restore_sgd_step, _restore_adam_step):
    _op.register_fake(lambda *args, **kwargs: None)


# ---- the same Python signatures as the reference and compiled ops ----------------------

_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)
_is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def _eager(t: Tensor) -> bool:
    """Whether a call can skip the custom-op dispatcher: plain tensors, no tracing, no
    dispatch mode (FakeTensor, functionalisation, vmap and grad transforms all need the op)."""
    return (type(t) in _PLAIN_TENSORS and not torch.compiler.is_compiling() and not _is_wrapped(t)
            and _python_dispatch._get_current_dispatch_mode() is None)


def grad_norm(grads, adaptive_grads, adaptive_params, eta_a):
    if not grads and not adaptive_grads:
        return reference.grad_norm(grads, adaptive_grads, adaptive_params, eta_a)
    first = (list(grads) + list(adaptive_grads))[0]
    call = _grad_norm_impl if _eager(first) else torch.ops.imbsam.triton_grad_norm
    return call(list(grads), list(adaptive_grads), list(adaptive_params), float(eta_a))


def perturb_(params, grads, backups, norm, rho, eta_a, adaptive):
    if params:
        call = _perturb_impl if _eager(params[0]) else torch.ops.imbsam.triton_perturb_
        call(list(params), list(grads), list(backups), norm, float(rho), float(eta_a), bool(adaptive))


def restore_(params, backups):
    if params:
        call = _restore_impl if _eager(params[0]) else torch.ops.imbsam.triton_restore_
        call(list(params), list(backups))


def add_head_grads_(grads, head_grads):
    if grads:
        call = _add_head_grads_impl if _eager(grads[0]) else torch.ops.imbsam.triton_add_head_grads_
        call(list(grads), list(head_grads))


def restore_sgd_step_(params, grads, backups, head_grads, momentum_buffers, lr, momentum, dampening, weight_decay,
                      nesterov, maximize, first_momentum_step, lr_tensor=None, found_inf=None):
    if params:
        call = _restore_sgd_step_impl if _eager(params[0]) else torch.ops.imbsam.triton_restore_sgd_step_
        call(list(params), list(grads), list(backups), list(head_grads), list(momentum_buffers), float(lr),
             float(momentum), float(dampening), float(weight_decay), bool(nesterov), bool(maximize),
             bool(first_momentum_step), lr_tensor, found_inf)


def restore_adam_step_(params, grads, backups, head_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr,
                       beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, lr_tensor=None,
                       found_inf=None):
    if params:
        call = _restore_adam_step_impl if _eager(params[0]) else torch.ops.imbsam.triton_restore_adam_step_
        call(list(params), list(grads), list(backups), list(head_grads), list(exp_avgs), list(exp_avg_sqs),
             list(max_exp_avg_sqs), list(state_steps), float(lr), float(beta1), float(beta2), float(eps),
             float(weight_decay), bool(decoupled_weight_decay), bool(amsgrad), bool(maximize), lr_tensor, found_inf)
