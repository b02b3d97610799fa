"""Input checks of the Python ops (the reference and Triton): the same messages as csrc/checks.h.

One function per op checks its tensor lists (``*_lists``: the Triton ops run it once per
set of tensors, when they build its plan) and ``check_scalar_on`` / ``check_sgd_options``
what changes every call. Every backend checks everything before it writes.
"""
from __future__ import annotations

import operator
from typing import Iterator, Sequence

import torch
from torch import Tensor

# The storage dtypes every op takes (csrc/dtypes.h dispatches the same four): the one list
# in Python, which the engine and the tests read.
SUPPORTED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_NAMES = [str(d).removeprefix("torch.") for d in SUPPORTED]
SUPPORTED_NAMES = ", ".join(_NAMES[:-1]) + " and " + _NAMES[-1]  # as csrc/checks.h words it

def each(attr: str, ts: Sequence[Tensor]) -> Iterator:
    """``attr`` of every tensor, read through map(): a C-level loop, several times faster than
    a Python loop over the tensors, which costs the Triton ops most of their host time. The
    getter is made per call (~0.1 us) because dynamo traces an attrgetter made inside the code
    it compiles, but not one made at import."""
    return map(operator.attrgetter(attr), ts)


def _layouts_strided(ts: Sequence[Tensor]) -> bool:
    return all(layout is torch.strided for layout in set(each("layout", ts)))


def check_list(op: str, ts: Sequence[Tensor], name: str) -> None:
    if (_layouts_strided(ts) and len(set(each("device", ts))) <= 1 and set(each("dtype", ts)).issubset(SUPPORTED)
            and all(map(Tensor.is_contiguous, ts))):
        return  # the usual case; anything else is examined tensor by tensor below
    for i, t in enumerate(ts):
        if t.layout != torch.strided:
            raise TypeError(f"imbsam.{op}: {name}[{i}] is a sparse tensor; only dense (strided) tensors are supported")
        if t.device != ts[0].device:
            raise ValueError(f"imbsam.{op}: {name}[{i}] is on {t.device} but {name}[0] is on {ts[0].device}; "
                             "all tensors of one call must be on one device")
        if t.dtype not in SUPPORTED:
            raise TypeError(f"imbsam.{op}: {name}[{i}] has dtype {t.dtype}; supported dtypes are {SUPPORTED_NAMES}")
        if t.numel() and not t.is_contiguous() and not _dense(t):
            raise ValueError(f"imbsam.{op}: {name}[{i}] is not dense in memory (a view with gaps or overlaps); "
                             "pass dense tensors")


def _dense(t: Tensor) -> bool:
    # Dense in some dimension order: the strides, sorted, are those of a contiguous tensor.
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def check_matches(op: str, ref: Sequence[Tensor], ref_name: str, other: Sequence[Tensor], other_name: str) -> None:
    """``other`` pairs up with ``ref`` tensor for tensor."""
    if len(ref) != len(other):
        raise ValueError(f"imbsam.{op}: {other_name} has {len(other)} tensors but {ref_name} has {len(ref)}; "
                         "they must pair up one to one")
    for i, (r, o) in enumerate(zip(ref, other)):
        if o.layout != torch.strided:
            raise TypeError(f"imbsam.{op}: {other_name}[{i}] is a sparse tensor; only dense (strided) tensors "
                            "are supported")
        if o.device != r.device:
            raise ValueError(f"imbsam.{op}: {other_name}[{i}] is on {o.device} but {ref_name}[{i}] is on "
                             f"{r.device}; all tensors of one call must be on one device")
        if o.dtype != r.dtype:
            raise TypeError(f"imbsam.{op}: {other_name}[{i}] is {o.dtype} but {ref_name}[{i}] is {r.dtype}; "
                            "each must have its parameter's dtype")
        if o.shape != r.shape:
            raise ValueError(f"imbsam.{op}: {other_name}[{i}] has shape {tuple(o.shape)} but {ref_name}[{i}] has "
                             f"shape {tuple(r.shape)}")
        if o.numel() and o.stride() != r.stride():
            raise ValueError(f"imbsam.{op}: {other_name}[{i}] has strides {o.stride()} but {ref_name}[{i}] has "
                             f"strides {r.stride()}; each must share its parameter's memory layout")


def check_all_match(op: str, ref: Sequence[Tensor], ref_name: str, *others: tuple[Sequence[Tensor], str]) -> None:
    """check_matches for several lists against one (``ref`` already passed check_list): the
    reference's metadata is read once, and a list that differs anywhere goes through
    check_matches for the precise error (or the allowed difference: an empty tensor's strides)."""
    ref_meta = None
    for other, name in others:
        if len(other) != len(ref):
            check_matches(op, ref, ref_name, other, name)  # raises: the lengths differ
        if not _layouts_strided(other):  # before strides: a sparse tensor has none
            check_matches(op, ref, ref_name, other, name)
            continue
        if ref_meta is None:
            getters = (operator.attrgetter("device"), operator.attrgetter("dtype"), Tensor.size, Tensor.stride)
            ref_meta = [list(map(f, ref)) for f in getters]
        if any(list(map(f, other)) != meta for f, meta in zip(getters, ref_meta)):
            check_matches(op, ref, ref_name, other, name)


def check_scalar_on(op: str, s: Tensor, name: str, ref: Sequence[Tensor]) -> None:
    if s.numel() != 1:
        raise ValueError(f"imbsam.{op}: {name} must hold one value, got shape {tuple(s.shape)}")
    if ref and s.device != ref[0].device:
        raise ValueError(f"imbsam.{op}: {name} is on {s.device} but the tensors are on {ref[0].device}")


def check_step_scalars(op: str, params: Sequence[Tensor], lr_tensor, found_inf) -> None:
    """The fused steps' optional 0-d scalars: one value each, on the parameters' device."""
    for name, s in (("lr_tensor", lr_tensor), ("found_inf", found_inf)):
        if s is not None:
            check_scalar_on(op, s, name, params)


# ---- one check per op --------------------------------------------------------------------

def grad_norm_lists(grads: Sequence[Tensor], adaptive_grads: Sequence[Tensor],
                    adaptive_params: Sequence[Tensor]) -> None:
    check_matches("grad_norm", adaptive_params, "adaptive_params", adaptive_grads, "adaptive_grads")
    check_list("grad_norm", list(grads) + list(adaptive_grads), "grads + adaptive_grads")


def perturb_lists(params: Sequence[Tensor], grads: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    check_list("perturb_", params, "params")
    check_all_match("perturb_", params, "params", (grads, "grads"), (backups, "backups"))


def restore_lists(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    check_list("restore_", params, "params")
    check_all_match("restore_", params, "params", (backups, "backups"))


def add_head_grads_lists(grads: Sequence[Tensor], head_grads: Sequence[Tensor]) -> None:
    check_list("add_head_grads_", grads, "grads")
    check_all_match("add_head_grads_", grads, "grads", (head_grads, "head_grads"))


def check_sgd_options(momentum: float, dampening: float, nesterov: bool, momentum_buffers: Sequence[Tensor]) -> None:
    op = "restore_sgd_step_"
    if momentum == 0 and momentum_buffers:
        raise ValueError(f"imbsam.{op}: momentum is 0 but momentum_buffers were given; pass an empty list")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"imbsam.{op}: nesterov needs momentum > 0 and dampening == 0")


def sgd_step_lists(params: Sequence[Tensor], grads: Sequence[Tensor], backups: Sequence[Tensor],
                   head_grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], momentum: float) -> None:
    """The lists the SGD step reads: g_H only for ImbSAM, the buffers only with momentum."""
    others = [(grads, "grads"), (backups, "backups")] + ([(head_grads, "head_grads")] if head_grads else []) + (
        [(momentum_buffers, "momentum_buffers")] if momentum != 0 else [])
    check_list("restore_sgd_step_", params, "params")
    check_all_match("restore_sgd_step_", params, "params", *others)


def check_adam_options(amsgrad: bool, max_exp_avg_sqs: Sequence[Tensor]) -> None:
    if not amsgrad and max_exp_avg_sqs:
        raise ValueError("imbsam.restore_adam_step_: amsgrad is off but max_exp_avg_sqs were given; pass an empty "
                         "list")


def adam_step_lists(params: Sequence[Tensor], grads: Sequence[Tensor], backups: Sequence[Tensor],
                    head_grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
                    max_exp_avg_sqs: Sequence[Tensor], amsgrad: bool) -> None:
    """The lists the Adam step reads: g_H only for ImbSAM, max_exp_avg_sqs only with amsgrad."""
    op = "restore_adam_step_"
    check_adam_options(amsgrad, max_exp_avg_sqs)
    others = [(grads, "grads"), (backups, "backups")] + ([(head_grads, "head_grads")] if head_grads else []) + [
        (exp_avgs, "exp_avgs"), (exp_avg_sqs, "exp_avg_sqs")] + (
        [(max_exp_avg_sqs, "max_exp_avg_sqs")] if amsgrad else [])
    check_list(op, params, "params")
    check_all_match(op, params, "params", *others)


_STEP_DTYPES = (torch.float32, torch.float64)


def check_adam_steps(params: Sequence[Tensor], steps: Sequence[Tensor], found_inf) -> None:
    """One 0-d float32/float64 step count per parameter, all on the parameters' device or all
    on the CPU (where torch.optim.Adam keeps them unless capturable or fused); with CPU steps
    for device parameters no found_inf (a skip decided on the device would need a host sync)."""
    op = "restore_adam_step_"
    if len(steps) != len(params):
        raise ValueError(f"imbsam.{op}: state_steps has {len(steps)} tensors but params has {len(params)}; "
                         "they must pair up one to one")
    if not params:
        return
    device = steps[0].device
    # The usual case in map()s (C-level loops, as check_list's): this runs on every call.
    if (set(each("device", steps)) == {device} and set(each("dtype", steps)).issubset(_STEP_DTYPES)
            and _layouts_strided(steps) and set(map(Tensor.numel, steps)) == {1}
            and (device == params[0].device or (device.type == "cpu" and found_inf is None))):
        return
    if device != params[0].device and device.type != "cpu":
        raise ValueError(f"imbsam.{op}: state_steps[0] is on {device} but the parameters are on "
                         f"{params[0].device}; the step counts must be on the parameters' device or on the CPU")
    for i, s in enumerate(steps):
        if s.device != device:
            raise ValueError(f"imbsam.{op}: state_steps[{i}] is on {s.device} but state_steps[0] is on {device}; "
                             "all step counts of one call must be on one device")
        if s.layout != torch.strided or s.numel() != 1 or s.dtype not in _STEP_DTYPES:
            raise TypeError(f"imbsam.{op}: state_steps[{i}] must be one float32 or float64 value, got a "
                            f"{s.dtype} tensor of shape {tuple(s.shape)}")
    if found_inf is not None and device != params[0].device:
        raise ValueError(f"imbsam.{op}: found_inf was given but the step counts are on the CPU and the parameters "
                         f"on {params[0].device}; a skip decided on the device cannot leave a CPU step count "
                         "unchanged without a host sync: keep the steps on the device (Adam's capturable=True or "
                         "fused=True) or skip on the host")
