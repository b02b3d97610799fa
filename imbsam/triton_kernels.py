"""Triton kernels of the imbsam ops, multi-tensor through address tables.

One launch covers every tensor of a dtype group: the host packs each list's tensor
addresses into an int64 table, and every program handles one chunk of one tensor
(``chunk_tensor[pid]``, ``chunk_start[pid]``), casting the address to a typed pointer.
Math runs in fp32 (fp64 for fp64 storage), as in the reference; Triton passes Python
float arguments (lr, momentum, rho, ...) as fp32, so fp64 parameters see fp32-rounded
hyperparameters on this backend.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Elements per program and per loop iteration: 16 Ki-element chunks keep programs
# short enough to balance a list of mixed sizes; 1 Ki vectors fill the load units.
CHUNK = 16384
BLOCK = 1024


@triton.jit
def _ptr(addrs, t, DTYPE: tl.constexpr):
    return tl.load(addrs + t).to(tl.pointer_type(DTYPE))


@triton.jit
def _chunk(sizes, chunk_tensor, chunk_start, CHUNK: tl.constexpr):
    """This program's tensor and its element range [start, end)."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    return t, start, tl.minimum(start + CHUNK, tl.load(sizes + t))


@triton.jit
def _store_cast(x, DTYPE: tl.constexpr):
    """x (math precision) rounded to nearest even in DTYPE, as torch rounds.

    bf16 is rounded on the fp32 bits first: Triton's interpreter truncates fp32 -> bf16,
    and after this rounding every cast is exact, so the CPU interpreter and the GPU agree.
    """
    if DTYPE == tl.bfloat16:
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, r).to(DTYPE)
    else:
        return x.to(DTYPE)


@triton.jit
def sum_squares_kernel(g_addrs, w_addrs, sizes, chunk_tensor, chunk_start, partials, eta,
                       ADAPTIVE: tl.constexpr, DTYPE: tl.constexpr, MATH: tl.constexpr,
                       CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, end = _chunk(sizes, chunk_tensor, chunk_start, CHUNK)
    g_ptr = _ptr(g_addrs, t, DTYPE)
    acc = tl.zeros([BLOCK], dtype=MATH)
    for s in range(start, end, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        mask = offs < end
        v = tl.load(g_ptr + offs, mask=mask, other=0).to(MATH)
        if ADAPTIVE:
            w = tl.load(_ptr(w_addrs, t, DTYPE) + offs, mask=mask, other=0).to(MATH)
            v = v * (tl.abs(w) + eta)
        acc += v * v
    tl.store(partials + tl.program_id(0), tl.sum(acc, axis=0).to(tl.float64))


@triton.jit
def perturb_kernel(w_addrs, g_addrs, b_addrs, sizes, chunk_tensor, chunk_start, norm_ptr, rho, eta,
                   ADAPTIVE: tl.constexpr, DTYPE: tl.constexpr, MATH: tl.constexpr,
                   CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, end = _chunk(sizes, chunk_tensor, chunk_start, CHUNK)
    w_ptr = _ptr(w_addrs, t, DTYPE)
    g_ptr = _ptr(g_addrs, t, DTYPE)
    b_ptr = _ptr(b_addrs, t, DTYPE)
    norm = tl.load(norm_ptr).to(tl.float64)
    finite = (norm - norm) == 0  # inf - inf and NaN - NaN are NaN
    scale = (rho / (norm + 1e-16)).to(MATH)
    for s in range(start, end, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        mask = offs < end
        w_raw = tl.load(w_ptr + offs, mask=mask)
        tl.store(b_ptr + offs, w_raw, mask=mask)
        w = w_raw.to(MATH)
        e = scale * tl.load(g_ptr + offs, mask=mask).to(MATH)
        if ADAPTIVE:
            t_w = tl.abs(w) + eta
            e = e * (t_w * t_w)
        # A non-finite norm leaves w unchanged (0 * NaN would be NaN).
        tl.store(w_ptr + offs, tl.where(finite, _store_cast(w + e, DTYPE), w_raw), mask=mask)


@triton.jit
def copy_kernel(dst_addrs, src_addrs, sizes, chunk_tensor, chunk_start, DTYPE: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, end = _chunk(sizes, chunk_tensor, chunk_start, CHUNK)
    dst = _ptr(dst_addrs, t, DTYPE)
    src = _ptr(src_addrs, t, DTYPE)
    for s in range(start, end, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        mask = offs < end
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@triton.jit
def add_kernel(g_addrs, h_addrs, sizes, chunk_tensor, chunk_start, DTYPE: tl.constexpr, MATH: tl.constexpr,
               CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, end = _chunk(sizes, chunk_tensor, chunk_start, CHUNK)
    g_ptr = _ptr(g_addrs, t, DTYPE)
    h_ptr = _ptr(h_addrs, t, DTYPE)
    for s in range(start, end, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        mask = offs < end
        g = tl.load(g_ptr + offs, mask=mask).to(MATH) + tl.load(h_ptr + offs, mask=mask).to(MATH)
        tl.store(g_ptr + offs, _store_cast(g, DTYPE), mask=mask)


@triton.jit
def sgd_kernel(w_addrs, g_addrs, b_addrs, h_addrs, buf_addrs, sizes, chunk_tensor, chunk_start,
               lr, lr_ptr, found_inf_ptr, momentum, dampening, weight_decay,
               HAS_HEAD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
               MAXIMIZE: tl.constexpr, HAS_LR_PTR: tl.constexpr,
               DTYPE: tl.constexpr, MATH: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """w <- backup; d = g (+ g_H); torch.optim.SGD's update of w and the momentum buffer.

    ``found_inf_ptr`` always points at a 0-d float32 (zero when the caller has none):
    nonzero restores w and leaves the buffers alone.
    """
    t, start, end = _chunk(sizes, chunk_tensor, chunk_start, CHUNK)
    w_ptr = _ptr(w_addrs, t, DTYPE)
    g_ptr = _ptr(g_addrs, t, DTYPE)
    b_ptr = _ptr(b_addrs, t, DTYPE)
    step_lr = lr
    if HAS_LR_PTR:
        step_lr = tl.load(lr_ptr).to(tl.float32)
    keep = tl.load(found_inf_ptr) == 0
    for s in range(start, end, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        mask = offs < end
        w_raw = tl.load(b_ptr + offs, mask=mask)
        w = w_raw.to(MATH)
        d = tl.load(g_ptr + offs, mask=mask).to(MATH)
        if HAS_HEAD:
            d += tl.load(_ptr(h_addrs, t, DTYPE) + offs, mask=mask).to(MATH)
        if MAXIMIZE:
            d = -d
        d = d + weight_decay * w
        if HAS_MOMENTUM:
            buf_ptr = _ptr(buf_addrs, t, DTYPE)
            old_buf = tl.load(buf_ptr + offs, mask=mask)
            if FIRST:
                nb = d
            else:
                nb = momentum * old_buf.to(MATH) + (1 - dampening) * d
            stored = _store_cast(nb, DTYPE)  # SGD steps with the buffer as stored
            tl.store(buf_ptr + offs, tl.where(keep, stored, old_buf), mask=mask)
            if NESTEROV:
                d = d + momentum * stored.to(MATH)
            else:
                d = stored.to(MATH)
        new_w = _store_cast(w - step_lr * d, DTYPE)
        tl.store(w_ptr + offs, tl.where(keep, new_w, w_raw), mask=mask)
