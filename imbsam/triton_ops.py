"""The Triton backend: the five imbsam ops as torch custom ops ``torch.ops.imbsam.triton_*``.

Same signatures and semantics as ``imbsam.reference`` (the spec) and the compiled ops.
They are registered with ``torch.library.custom_op`` rather than ``triton_op``: the
kernels read tensor addresses from tables built on the host, which a traced
``triton_op`` body cannot do, so ``torch.compile`` sees each op as one opaque call
(with the fake kernels below). On a CPU the kernels run under ``TRITON_INTERPRET=1``.
"""
import functools
import itertools
import os
from typing import List, Optional, Sequence

import torch
from torch import Tensor

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
        for _, _, lists in _groups([[dst], [src]]):
            tab = _tables(lists)
            _launch(K.copy_kernel, tab, tab.addrs[0], tab.addrs[1], DTYPE=tl.float32)
    except Exception as exc:  # whatever the interpreter raises: the backend is unusable, and says why
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None if torch.equal(dst, src) else "a test copy gave wrong values"


# ---- address tables --------------------------------------------------------------

_TABLE_CACHE: dict = {}
_TABLE_CACHE_SIZE = 64  # distinct (tensor set, op) combinations a training loop uses: a handful


class _Tables:
    """Per dtype group: tensor addresses per list, sizes, and the chunk -> (tensor, start) map."""

    def __init__(self, lists: list[list[Tensor]]):
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
        if device.type == "cuda":
            # Pinned source + non_blocking: the copy is queued on the stream, no host sync;
            # the cache keeps the pinned tensors alive while the copy may be in flight.
            host = [h.pin_memory() for h in host]
            self._host = host
            self.addrs, self.sizes, self.chunk_tensor, self.chunk_start = (
                h.to(device, non_blocking=True) for h in host)
        else:
            self.addrs, self.sizes, self.chunk_tensor, self.chunk_start = host
        self.n_chunks = len(chunk_tensor)
        # Every address 16-byte aligned: the kernels may load and store 16 bytes at a time.
        self.aligned = all(t.data_ptr() % 16 == 0 for lst in lists for t in lst)


# Tables a CUDA graph captured: its replays read their device memory (and copy from their
# pinned host memory, when the capture built them), so they are never evicted or freed.
_GRAPH_TABLES: dict = {}


def _tables(lists: list[list[Tensor]]) -> _Tables:
    # Addresses of every list, sizes of the first: the ops checked that the others match it.
    key = (len(lists), *itertools.chain.from_iterable([map(Tensor.data_ptr, lst) for lst in lists]),
           *map(Tensor.numel, lists[0]))
    tables = _TABLE_CACHE.get(key) or _GRAPH_TABLES.get(key)
    if tables is None:
        if len(_TABLE_CACHE) >= _TABLE_CACHE_SIZE:
            _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
        tables = _TABLE_CACHE[key] = _Tables(lists)
    if lists[0][0].is_cuda and torch.cuda.is_current_stream_capturing():
        _GRAPH_TABLES[key] = tables
    return tables


def _types(dtype: torch.dtype):
    """(storage, math) Triton types of a torch dtype: fp64 computes in fp64, the rest in fp32."""
    storage = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
               torch.float16: tl.float16}[dtype]
    return storage, tl.float64 if dtype == torch.float64 else tl.float32


def _groups(lists: Sequence[Sequence[Tensor]]) -> list:
    """(triton dtype, math dtype, lists restricted to one dtype, without empty tensors) per dtype."""
    dtypes = set(map(_validate.dtype_of, lists[0]))
    if len(dtypes) == 1 and all(map(Tensor.numel, lists[0])):
        return [(*_types(dtypes.pop()), [list(lst) for lst in lists])]  # the usual case: the lists whole
    by_dtype: dict = {}
    for i, t in enumerate(lists[0]):
        if t.numel():
            by_dtype.setdefault(t.dtype, []).append(i)
    return [(*_types(dtype), [[lst[i] for i in idx] for lst in lists]) for dtype, idx in by_dtype.items()]


def _launch(kernel, tables: _Tables, *args, **meta):
    # enable_fp_fusion=False: no fused multiply-adds (Triton fuses by default), so the GPU
    # rounds each product and sum as the reference does; memory-bound kernels lose nothing.
    if tables.n_chunks:
        kernel[(tables.n_chunks,)](*args, tables.sizes, tables.chunk_tensor, tables.chunk_start, **meta,
                                   CHUNK=K.CHUNK, BLOCK=K.BLOCK, ALIGNED=tables.aligned, enable_fp_fusion=False)


# ---- the ops ---------------------------------------------------------------------
# typing.List, not list[...], and no `from __future__ import annotations` in this file: torch < 2.5
# infers a custom op's schema from evaluated typing annotations only.

@torch.library.custom_op("imbsam::triton_grad_norm", mutates_args=())
def _grad_norm(grads: List[Tensor], adaptive_grads: List[Tensor], adaptive_params: List[Tensor],
               eta_a: float) -> Tensor:
    _validate.check_matches("grad_norm", adaptive_params, "adaptive_params", adaptive_grads, "adaptive_grads")
    everything = list(grads) + list(adaptive_grads)
    _validate.check_list("grad_norm", everything, "grads + adaptive_grads")
    device = everything[0].device
    plain_groups, scaled_groups = _groups([grads]), _groups([adaptive_grads, adaptive_params])
    plain = [_tables(lists) for _, _, lists in plain_groups]
    scaled = [_tables(lists) for _, _, lists in scaled_groups]
    partials = torch.zeros(max(1, sum(t.n_chunks for t in plain + scaled)), dtype=torch.float64, device=device)
    offset = 0
    for adaptive, groups, tables in ((False, plain_groups, plain), (True, scaled_groups, scaled)):
        for (storage, math, _), tab in zip(groups, tables):
            w_addrs = tab.addrs[1] if adaptive else tab.addrs[0]
            _launch(K.sum_squares_kernel, tab, tab.addrs[0], w_addrs, partials=partials[offset:], eta=eta_a,
                    ADAPTIVE=adaptive, DTYPE=storage, MATH=math)
            offset += tab.n_chunks
    # Stage two on the device: a double sum over the per-chunk partials, then sqrt.
    return partials.sum().sqrt().to(reference.norm_dtype(everything))


@_grad_norm.register_fake
def _(grads, adaptive_grads, adaptive_params, eta_a):
    everything = list(grads) + list(adaptive_grads)
    return everything[0].new_empty((), dtype=reference.norm_dtype(everything))


@torch.library.custom_op("imbsam::triton_perturb_", mutates_args=("params", "backups"))
def _perturb(params: List[Tensor], grads: List[Tensor], backups: List[Tensor], norm: Tensor, rho: float,
             eta_a: float, adaptive: bool) -> None:
    _validate.check_list("perturb_", params, "params")
    _validate.check_all_match("perturb_", params, "params", (grads, "grads"), (backups, "backups"))
    _validate.check_scalar_on("perturb_", norm, "norm", params)
    for storage, math, lists in _groups([params, grads, backups]):
        tab = _tables(lists)
        _launch(K.perturb_kernel, tab, tab.addrs[0], tab.addrs[1], tab.addrs[2], norm_ptr=norm, rho=rho, eta=eta_a,
                ADAPTIVE=adaptive, DTYPE=storage, MATH=math)


@_perturb.register_fake
def _(params, grads, backups, norm, rho, eta_a, adaptive):
    return None


@torch.library.custom_op("imbsam::triton_restore_", mutates_args=("params",))
def _restore(params: List[Tensor], backups: List[Tensor]) -> None:
    _validate.check_list("restore_", params, "params")
    _validate.check_all_match("restore_", params, "params", (backups, "backups"))
    for storage, _, lists in _groups([params, backups]):
        tab = _tables(lists)
        _launch(K.copy_kernel, tab, tab.addrs[0], tab.addrs[1], DTYPE=storage)


@_restore.register_fake
def _(params, backups):
    return None


@torch.library.custom_op("imbsam::triton_add_head_grads_", mutates_args=("grads",))
def _add_head_grads(grads: List[Tensor], head_grads: List[Tensor]) -> None:
    _validate.check_list("add_head_grads_", grads, "grads")
    _validate.check_all_match("add_head_grads_", grads, "grads", (head_grads, "head_grads"))
    for storage, math, lists in _groups([grads, head_grads]):
        tab = _tables(lists)
        _launch(K.add_kernel, tab, tab.addrs[0], tab.addrs[1], DTYPE=storage, MATH=math)


@_add_head_grads.register_fake
def _(grads, head_grads):
    return None


_ZEROS: dict = {}


@torch.library.custom_op("imbsam::triton_restore_sgd_step_", mutates_args=("params", "momentum_buffers"))
def _restore_sgd_step(params: List[Tensor], grads: List[Tensor], backups: List[Tensor], head_grads: List[Tensor],
                      momentum_buffers: List[Tensor], lr: float, momentum: float, dampening: float,
                      weight_decay: float, nesterov: bool, maximize: bool, first_momentum_step: bool,
                      lr_tensor: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    op = "restore_sgd_step_"
    _validate.check_list(op, params, "params")
    _validate.check_all_match(op, params, "params", (grads, "grads"), (backups, "backups"),
                              *([(head_grads, "head_grads")] if head_grads else []),
                              *([(momentum_buffers, "momentum_buffers")] if momentum != 0 else []))
    if momentum == 0 and momentum_buffers:
        raise ValueError(f"imbsam.{op}: momentum is 0 but momentum_buffers were given; pass an empty list")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"imbsam.{op}: nesterov needs momentum > 0 and dampening == 0")
    for name, s in (("lr_tensor", lr_tensor), ("found_inf", found_inf)):
        if s is not None:
            _validate.check_scalar_on(op, s, name, params)
    if not params:
        return
    device = params[0].device
    if found_inf is None:  # the kernel always reads a flag: a cached zero when there is none
        found_inf = _ZEROS.get(device)
        if found_inf is None:
            found_inf = _ZEROS[device] = torch.zeros((), dtype=torch.float32, device=device)
    lists = [params, grads, backups] + ([head_grads] if head_grads else []) + (
        [momentum_buffers] if momentum != 0 else [])
    for storage, math, group in _groups(lists):
        tab = _tables(group)
        h = tab.addrs[3] if head_grads else tab.addrs[0]
        buf = tab.addrs[-1] if momentum != 0 else tab.addrs[0]
        _launch(K.sgd_kernel, tab, tab.addrs[0], tab.addrs[1], tab.addrs[2], h, buf, lr=lr,
                lr_ptr=lr_tensor.to(torch.float32) if lr_tensor is not None else found_inf,
                found_inf_ptr=found_inf.to(torch.float32), momentum=momentum, dampening=dampening,
                weight_decay=weight_decay, HAS_HEAD=bool(head_grads), HAS_MOMENTUM=momentum != 0,
                FIRST=first_momentum_step, NESTEROV=nesterov, MAXIMIZE=maximize, HAS_LR_PTR=lr_tensor is not None,
                DTYPE=storage, MATH=math)


@_restore_sgd_step.register_fake
def _(params, grads, backups, head_grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
      maximize, first_momentum_step, lr_tensor=None, found_inf=None):
    return None


# ---- the same Python signatures as imbsam.ops / imbsam.reference ----------------------

def grad_norm(grads, adaptive_grads, adaptive_params, eta_a):
    if not grads and not adaptive_grads:
        return reference.grad_norm(grads, adaptive_grads, adaptive_params, eta_a)
    return torch.ops.imbsam.triton_grad_norm(list(grads), list(adaptive_grads), list(adaptive_params), float(eta_a))


def perturb_(params, grads, backups, norm, rho, eta_a, adaptive):
    if params:
        torch.ops.imbsam.triton_perturb_(list(params), list(grads), list(backups), norm, float(rho), float(eta_a),
                                         bool(adaptive))


def restore_(params, backups):
    if params:
        torch.ops.imbsam.triton_restore_(list(params), list(backups))


def add_head_grads_(grads, head_grads):
    if grads:
        torch.ops.imbsam.triton_add_head_grads_(list(grads), list(head_grads))


def restore_sgd_step_(params, grads, backups, head_grads, momentum_buffers, lr, momentum, dampening, weight_decay,
                      nesterov, maximize, first_momentum_step, lr_tensor=None, found_inf=None):
    if params:
        torch.ops.imbsam.triton_restore_sgd_step_(
            list(params), list(grads), list(backups), list(head_grads), list(momentum_buffers), float(lr),
            float(momentum), float(dampening), float(weight_decay), bool(nesterov), bool(maximize),
            bool(first_momentum_step), lr_tensor, found_inf)
