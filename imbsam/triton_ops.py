"""The Triton backend: the five imbsam ops as torch custom ops ``torch.ops.imbsam.triton_*``.

Same signatures and semantics as ``imbsam.reference`` (the spec) and the compiled ops.
They are registered with ``torch.library.custom_op`` rather than ``triton_op``: the
kernels read tensor addresses from tables built on the host, which a traced
``triton_op`` body cannot do, so ``torch.compile`` sees each op as one opaque call
(with the fake kernels below). On a CPU the kernels run under ``TRITON_INTERPRET=1``.
"""
import contextlib
import functools
import os
import warnings
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor
from torch.utils import _python_dispatch

from imbsam import _validate, reference

try:
    import triton.language as tl

    from imbsam import triton_kernels as K

    IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # no triton, or a broken install: the backend is unavailable
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def usable_on(device_type: str) -> bool:
    """Triton runs on CUDA GPUs, and on the CPU only through its interpreter."""
    if IMPORT_ERROR is not None:
        return False
    if device_type == "cuda":
        return torch.cuda.is_available() and not interpreting()
    return device_type == "cpu" and interpreting() and _interpreter_error() is None


def why_unusable() -> str:
    if IMPORT_ERROR is not None:
        return f"triton did not import: {IMPORT_ERROR}"
    if interpreting() and not torch.cuda.is_available() and _interpreter_error() is not None:
        return f"Triton's interpreter fails on the kernels: {_interpreter_error()}"
    return "triton needs a CUDA device (or TRITON_INTERPRET=1 to run on the CPU)"


@functools.lru_cache(maxsize=None)
def _interpreter_error() -> Optional[str]:
    """Why Triton's interpreter fails on one tiny copy, or None when it runs it right.

    Some interpreters cannot run these kernels at all: Triton 3.6's, with numpy >= 2.4,
    hands the chunk loop 1-element arrays as bounds, which numpy no longer turns into ints.
    """
    src, dst = torch.arange(3, dtype=torch.float32), torch.zeros(3)
    try:
        for _, _, tab in _build_plan([[dst], [src]]):
            _launch(K.copy_kernel, tab, tab.addrs[0], tab.addrs[1], DTYPE=tl.float32)
    except Exception as exc:  # whatever the interpreter raises: the backend is unusable, and says why
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None if torch.equal(dst, src) else "a test copy gave wrong values"


# ---- address tables --------------------------------------------------------------

class _Tables:
    """One launch group (one dtype, one alignment): tensor addresses per list, sizes, and
    the chunk -> (tensor, start) map, on the tensors' device."""

    def __init__(self, lists: list[list[Tensor]], aligned: bool):
        device = lists[0][0].device
        sizes = [t.numel() for t in lists[0]]
        chunk_tensor, chunk_start = [], []
        for i, n in enumerate(sizes):
            for start in range(0, n, K.CHUNK):
                chunk_tensor.append(i)
                chunk_start.append(start)
        host = [torch.tensor([[t.data_ptr() for t in lst] for lst in lists], dtype=torch.int64),
                torch.tensor(sizes, dtype=torch.int64), torch.tensor(chunk_tensor, dtype=torch.int64),
                torch.tensor(chunk_start, dtype=torch.int64)]
        self.streams: set = set()
        if device.type == "cuda":
            # Pinned source + non_blocking: the copy is queued on the stream, no host sync.
            # The pinned tensors stay referenced: a graph that captured this copy replays it.
            self._host = [h.pin_memory() for h in host]
            stream = torch.cuda.current_stream(device)
            self.addrs, self.sizes, self.chunk_tensor, self.chunk_start = (
                h.to(device, non_blocking=True) for h in self._host)
            self.streams.add(stream)
            self.ready = torch.cuda.Event()
            if not torch.cuda.is_current_stream_capturing():  # a captured plan is never used eagerly
                self.ready.record(stream)
        else:
            self.addrs, self.sizes, self.chunk_tensor, self.chunk_start = host
        self.n_chunks = len(chunk_tensor)
        # Every list's tensor 16-byte aligned: the kernels may load and store 16 bytes at a time.
        self.aligned = aligned

    def use_on(self, stream, capturing: bool) -> None:
        """Makes the tables safe to read on ``stream``: it waits for their copy, and the
        allocator will not reuse their memory before the stream is done with it."""
        if capturing or stream in self.streams:
            # In a capture: torch.cuda.graph synchronised before it began, so the copy is
            # done, and _CAPTURE_PLANS keeps the memory for as long as graphs may replay.
            return
        stream.wait_event(self.ready)
        for t in (self.addrs, self.sizes, self.chunk_tensor, self.chunk_start):
            t.record_stream(stream)
        self.streams.add(stream)


def _aligned(lists: Sequence[Sequence[Tensor]], i: int) -> bool:
    return all(lst[i].data_ptr() % 16 == 0 for lst in lists)


def _build_plan(lists: Sequence[Sequence[Tensor]]) -> list:
    """(triton dtype, math dtype, tables) per launch group: one group per dtype and
    alignment, so one misaligned tensor (a view into a DDP bucket, say) leaves the others
    on the 16-byte path. Empty tensors get no group."""
    by_group: dict = {}
    for i, t in enumerate(lists[0]):
        if t.numel():
            by_group.setdefault((t.dtype, _aligned(lists, i)), []).append(i)
    return [(*_types(dtype), _Tables([[lst[i] for i in idx] for lst in lists], aligned))
            for (dtype, aligned), idx in by_group.items()]


# Plans of eager calls: a training loop uses a handful of tensor sets (one per op and
# param group), so a small cache hits every step; the oldest entry goes when it is full.
_PLANS: dict = {}
_PLANS_SIZE = 64
# Plans that a CUDA-graph capture used. A graph replays the launches it captured, which
# read these tables' device memory (and copy from their pinned memory, when the capture
# built them): they are kept apart from the eager plans, never handed to an eager call
# (a capture's copies only run at replay), and kept while there is room.
_CAPTURE_PLANS: dict = {}
_CAPTURE_PLANS_SIZE = 1024
_warned_capture_eviction = False


def _plan(lists: Sequence[Sequence[Tensor]], validate: Callable[[], None]) -> "_Plan":
    """The launch groups for these tensors, validated once (``validate`` raises before any
    write). A plan is found again by every tensor's address and the parameters' dtypes
    and sizes: what the launches read. The other lists' dtypes equal the parameters' when
    the plan is built, and stay so while their addresses do: they are the parameters'
    gradients (torch refuses a gradient of another dtype) and the optimizer's own
    backups and buffers (made as the parameters' twins)."""
    global _warned_capture_eviction
    key = (len(lists), *(tuple(map(Tensor.data_ptr, lst)) for lst in lists),
           tuple(map(_validate.dtype_of, lists[0])), tuple(map(Tensor.numel, lists[0])))
    on_cuda = lists[0][0].is_cuda
    capturing = on_cuda and torch.cuda.is_current_stream_capturing()
    plan = _PLANS.get(key)
    if capturing:
        plan = plan or _CAPTURE_PLANS.get(key)
    if plan is None:
        validate()
        plan = _Plan(_build_plan(lists), lists)
        if not capturing:
            if len(_PLANS) >= _PLANS_SIZE:
                _PLANS.pop(next(iter(_PLANS)))
            _PLANS[key] = plan
    if capturing and key not in _CAPTURE_PLANS:
        if len(_CAPTURE_PLANS) >= _CAPTURE_PLANS_SIZE:
            _CAPTURE_PLANS.pop(next(iter(_CAPTURE_PLANS)))
            if not _warned_capture_eviction:
                _warned_capture_eviction = True
                warnings.warn(f"imbsam (triton): more than {_CAPTURE_PLANS_SIZE} tensor sets captured in CUDA "
                              "graphs; the oldest one's address tables are released, so a graph captured that "
                              "long ago must be captured again before it is replayed", RuntimeWarning, stacklevel=2)
        _CAPTURE_PLANS[key] = plan
    if on_cuda:
        stream = torch.cuda.current_stream(lists[0][0].device)
        for _, _, tables in plan.groups:
            tables.use_on(stream, capturing)
    return plan


class _Plan:
    """One op call's launch groups, and what the call needs of the tensors besides."""

    def __init__(self, groups: list, lists: Sequence[Sequence[Tensor]]):
        self.groups = groups
        self.n_chunks = sum(tab.n_chunks for _, _, tab in groups)
        self.has_double = torch.float64 in set(map(_validate.dtype_of, lists[0]))


def _types(dtype: torch.dtype):
    """(storage, math) Triton types of a torch dtype: fp64 computes in fp64, the rest in fp32."""
    storage = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
               torch.float16: tl.float16}[dtype]
    return storage, tl.float64 if dtype == torch.float64 else tl.float32


def _launch(kernel, tables: _Tables, *args, **meta):
    # enable_fp_fusion=False: no fused multiply-adds (Triton fuses by default), so the GPU
    # rounds each product and sum as the reference does; memory-bound kernels lose nothing.
    if tables.n_chunks:
        kernel[(tables.n_chunks,)](*args, tables.sizes, tables.chunk_tensor, tables.chunk_start, **meta,
                                   CHUNK=K.CHUNK, BLOCK=K.BLOCK, ALIGNED=tables.aligned, enable_fp_fusion=False)


def _on_device(t: Tensor):
    """Launches run on the current device: make it the tensors' (a model on cuda:1 while
    cuda:0 is current would otherwise launch on the wrong GPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


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
        _validate.check_matches("grad_norm", adaptive_params, "adaptive_params", adaptive_grads, "adaptive_grads")
        _validate.check_list("grad_norm", list(grads) + list(adaptive_grads), "grads + adaptive_grads")

    first = grads[0] if grads else adaptive_grads[0]
    if grads and adaptive_grads and grads[0].device != adaptive_grads[0].device:
        validate()  # raises: each list's plan checks its own tensors, this is the one check across them
    device = first.device
    with _on_device(first):
        plans = [(False, _plan([grads], validate))] if grads else []
        if adaptive_grads:
            plans.append((True, _plan([adaptive_grads, adaptive_params], validate)))
        # Every chunk writes its own slot: no need to zero them.
        partials = torch.empty(max(1, sum(p.n_chunks for _, p in plans)), dtype=torch.float64, device=device)
        offset = 0
        for adaptive, plan in plans:
            for storage, math, tab in plan.groups:
                w_addrs = tab.addrs[1] if adaptive else tab.addrs[0]
                _launch(K.sum_squares_kernel, tab, tab.addrs[0], w_addrs, partials=partials[offset:], eta=eta_a,
                        ADAPTIVE=adaptive, DTYPE=storage, MATH=math)
                offset += tab.n_chunks
        # Stage two on the device: a double sum over the per-chunk partials, then sqrt.
        norm = partials[:offset].sum().sqrt_()
        return norm if any(p.has_double for _, p in plans) else norm.to(torch.float32)


def _perturb_impl(params: List[Tensor], grads: List[Tensor], backups: List[Tensor], norm: Tensor, rho: float,
                  eta_a: float, adaptive: bool) -> None:
    def validate():
        _validate.check_list("perturb_", params, "params")
        _validate.check_all_match("perturb_", params, "params", (grads, "grads"), (backups, "backups"))

    _validate.check_scalar_on("perturb_", norm, "norm", params)
    if not params:
        return
    with _on_device(params[0]):
        for storage, math, tab in _plan([params, grads, backups], validate).groups:
            _launch(K.perturb_kernel, tab, tab.addrs[0], tab.addrs[1], tab.addrs[2], norm_ptr=norm, rho=rho,
                    eta=eta_a, ADAPTIVE=adaptive, DTYPE=storage, MATH=math)


def _restore_impl(params: List[Tensor], backups: List[Tensor]) -> None:
    def validate():
        _validate.check_list("restore_", params, "params")
        _validate.check_all_match("restore_", params, "params", (backups, "backups"))

    if not params:
        return
    with _on_device(params[0]):
        for storage, _, tab in _plan([params, backups], validate).groups:
            _launch(K.copy_kernel, tab, tab.addrs[0], tab.addrs[1], DTYPE=storage)


def _add_head_grads_impl(grads: List[Tensor], head_grads: List[Tensor]) -> None:
    def validate():
        _validate.check_list("add_head_grads_", grads, "grads")
        _validate.check_all_match("add_head_grads_", grads, "grads", (head_grads, "head_grads"))

    if not grads:
        return
    with _on_device(grads[0]):
        for storage, math, tab in _plan([grads, head_grads], validate).groups:
            _launch(K.add_kernel, tab, tab.addrs[0], tab.addrs[1], DTYPE=storage, MATH=math)


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
    op = "restore_sgd_step_"
    if momentum == 0 and momentum_buffers:
        raise ValueError(f"imbsam.{op}: momentum is 0 but momentum_buffers were given; pass an empty list")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"imbsam.{op}: nesterov needs momentum > 0 and dampening == 0")
    lists = [params, grads, backups] + ([head_grads] if head_grads else []) + (
        [momentum_buffers] if momentum != 0 else [])
    names = ["params", "grads", "backups"] + (["head_grads"] if head_grads else []) + (
        ["momentum_buffers"] if momentum != 0 else [])

    def validate():
        _validate.check_list(op, params, "params")
        _validate.check_all_match(op, params, "params", *zip(lists[1:], names[1:]))

    if not params:
        return
    for name, s in (("lr_tensor", lr_tensor), ("found_inf", found_inf)):
        if s is not None:
            _validate.check_scalar_on(op, s, name, params)
    device = params[0].device
    with _on_device(params[0]):
        plan = _plan(lists, validate)
        flag = (found_inf if found_inf is not None else _zero_flag(device)).to(torch.float32)
        lr_ptr = lr_tensor.to(torch.float32) if lr_tensor is not None else flag
        for storage, math, tab in plan.groups:
            h = tab.addrs[3] if head_grads else tab.addrs[0]
            buf = tab.addrs[-1] if momentum != 0 else tab.addrs[0]
            _launch(K.sgd_kernel, tab, tab.addrs[0], tab.addrs[1], tab.addrs[2], h, buf, lr=lr, lr_ptr=lr_ptr,
                    found_inf_ptr=flag, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                    HAS_HEAD=bool(head_grads), HAS_MOMENTUM=momentum != 0, FIRST=first_momentum_step,
                    NESTEROV=nesterov, MAXIMIZE=maximize, HAS_LR_PTR=lr_tensor is not None, DTYPE=storage,
                    MATH=math)


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


for _op in (_perturb, _restore, _add_head_grads, _restore_sgd_step):
    _op.register_fake(lambda *args, **kwargs: None)


# ---- the same Python signatures as imbsam.ops / imbsam.reference ----------------------

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
