"""Triton kernels of the imbsam ops, multi-tensor through address tables.

One launch covers every tensor of a dtype group: the host packs each list's tensor
addresses into an int64 table, and every program handles one chunk of one tensor
(``chunk_tensor[pid]``, ``chunk_start[pid]``), casting the address to a typed pointer.
Math runs in fp32 (fp64 for fp64 storage), as in the reference; Triton passes Python
float arguments (lr, momentum, rho, ...) as fp32, so fp64 parameters see fp32-rounded
hyperparameters on this backend.

Each program walks its chunk in full BLOCKs without a mask, then one masked BLOCK for
the rest. When every address of a launch is 16-byte aligned (``ALIGNED``, checked on the
host) the unmasked loop tells the compiler so, and it loads and stores 16 bytes per
instruction: the addresses come from a table, so it cannot know it otherwise.
"""
# No `from __future__ import annotations`: Triton 3.0 does not recognise a constexpr
# parameter whose annotation is the string "tl.constexpr".
import triton
import triton.language as tl

# Elements per program and per loop iteration: 16 Ki-element chunks keep programs
# short enough to balance a list of mixed sizes; 1 Ki vectors fill the load units.
CHUNK = 16384
BLOCK = 1024


@triton.jit
def _ptr(addrs, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    # One branch per dtype, not tl.pointer_type(DTYPE): Triton 3.0 rejects a constexpr there.
    a = tl.load(addrs + t)
    if DTYPE == tl.float32:
        p = a.to(tl.pointer_type(tl.float32))
    elif DTYPE == tl.float64:
        p = a.to(tl.pointer_type(tl.float64))
    elif DTYPE == tl.bfloat16:
        p = a.to(tl.pointer_type(tl.bfloat16))
    else:
        p = a.to(tl.pointer_type(tl.float16))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _chunk(sizes, chunk_tensor, chunk_start, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tensor, the start of its chunk, and how many elements the unmasked
    BLOCK loop covers (the rest, fewer than BLOCK, up to ``end``, is the masked tail)."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.multiple_of(tl.load(chunk_start + pid), CHUNK)  # chunks start at multiples of CHUNK
    end = tl.minimum(start + CHUNK, tl.load(sizes + t))
    return t, start, end, (end - start) // BLOCK * BLOCK


@triton.jit
def _full_block(s, BLOCK: tl.constexpr):
    """The offsets of an unmasked block starting at s (a multiple of BLOCK within the chunk)."""
    return tl.max_contiguous(tl.multiple_of(s + tl.arange(0, BLOCK), BLOCK), BLOCK)


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
                       CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    t, start, end, n_full = _chunk(sizes, chunk_tensor, chunk_start, CHUNK, BLOCK)
    g_ptr = _ptr(g_addrs, t, DTYPE, ALIGNED)
    w_ptr = _ptr(w_addrs, t, DTYPE, ALIGNED)  # read only when ADAPTIVE
    acc = tl.zeros([BLOCK], dtype=MATH)
    for s in range(start, start + n_full, BLOCK):
        offs = _full_block(s, BLOCK)
        v = tl.load(g_ptr + offs).to(MATH)
        if ADAPTIVE:
            v = v * (tl.abs(tl.load(w_ptr + offs).to(MATH)) + eta)
        acc += v * v
    # The tail: masked lanes read 0 (a load with `other` needs a mask, so it is not shared).
    offs = start + n_full + tl.arange(0, BLOCK)
    mask = offs < end
    v = tl.load(g_ptr + offs, mask=mask, other=0).to(MATH)
    if ADAPTIVE:
        v = v * (tl.abs(tl.load(w_ptr + offs, mask=mask, other=0).to(MATH)) + eta)
    acc += v * v
    tl.store(partials + tl.program_id(0), tl.sum(acc, axis=0).to(tl.float64))


@triton.jit
def _perturb_block(w_ptr, g_ptr, b_ptr, offs, mask, finite, scale, eta, ADAPTIVE: tl.constexpr,
                   DTYPE: tl.constexpr, MATH: tl.constexpr):
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
def perturb_kernel(w_addrs, g_addrs, b_addrs, sizes, chunk_tensor, chunk_start, norm_ptr, rho, eta,
                   ADAPTIVE: tl.constexpr, DTYPE: tl.constexpr, MATH: tl.constexpr,
                   CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    t, start, end, n_full = _chunk(sizes, chunk_tensor, chunk_start, CHUNK, BLOCK)
    w_ptr = _ptr(w_addrs, t, DTYPE, ALIGNED)
    g_ptr = _ptr(g_addrs, t, DTYPE, ALIGNED)
    b_ptr = _ptr(b_addrs, t, DTYPE, ALIGNED)
    norm = tl.load(norm_ptr).to(tl.float64)
    finite = (norm - norm) == 0  # inf - inf and NaN - NaN are NaN
    scale = (rho / (norm + 1e-16)).to(MATH)
    for s in range(start, start + n_full, BLOCK):
        _perturb_block(w_ptr, g_ptr, b_ptr, _full_block(s, BLOCK), None, finite, scale, eta, ADAPTIVE, DTYPE, MATH)
    offs = start + n_full + tl.arange(0, BLOCK)
    _perturb_block(w_ptr, g_ptr, b_ptr, offs, offs < end, finite, scale, eta, ADAPTIVE, DTYPE, MATH)


@triton.jit
def copy_kernel(dst_addrs, src_addrs, sizes, chunk_tensor, chunk_start, DTYPE: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    t, start, end, n_full = _chunk(sizes, chunk_tensor, chunk_start, CHUNK, BLOCK)
    dst = _ptr(dst_addrs, t, DTYPE, ALIGNED)
    src = _ptr(src_addrs, t, DTYPE, ALIGNED)
    for s in range(start, start + n_full, BLOCK):
        offs = _full_block(s, BLOCK)
        tl.store(dst + offs, tl.load(src + offs))
    offs = start + n_full + tl.arange(0, BLOCK)
    mask = offs < end
    tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@triton.jit
def _add_block(g_ptr, h_ptr, offs, mask, DTYPE: tl.constexpr, MATH: tl.constexpr):
    g = tl.load(g_ptr + offs, mask=mask).to(MATH) + tl.load(h_ptr + offs, mask=mask).to(MATH)
    tl.store(g_ptr + offs, _store_cast(g, DTYPE), mask=mask)


@triton.jit
def add_kernel(g_addrs, h_addrs, sizes, chunk_tensor, chunk_start, DTYPE: tl.constexpr, MATH: tl.constexpr,
               CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    t, start, end, n_full = _chunk(sizes, chunk_tensor, chunk_start, CHUNK, BLOCK)
    g_ptr = _ptr(g_addrs, t, DTYPE, ALIGNED)
    h_ptr = _ptr(h_addrs, t, DTYPE, ALIGNED)
    for s in range(start, start + n_full, BLOCK):
        _add_block(g_ptr, h_ptr, _full_block(s, BLOCK), None, DTYPE, MATH)
    offs = start + n_full + tl.arange(0, BLOCK)
    _add_block(g_ptr, h_ptr, offs, offs < end, DTYPE, MATH)


@triton.jit
def _sgd_block(w_ptr, g_ptr, b_ptr, h_ptr, buf_ptr, offs, mask, keep, step_lr, momentum, dampening, weight_decay,
               HAS_HEAD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
               MAXIMIZE: tl.constexpr, DTYPE: tl.constexpr, MATH: tl.constexpr):
    w_raw = tl.load(b_ptr + offs, mask=mask)
    w = w_raw.to(MATH)
    d = tl.load(g_ptr + offs, mask=mask).to(MATH)
    if HAS_HEAD:
        d += tl.load(h_ptr + offs, mask=mask).to(MATH)
    if MAXIMIZE:
        d = -d
    d = d + weight_decay * w
    if HAS_MOMENTUM:
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


@triton.jit
def sgd_kernel(w_addrs, g_addrs, b_addrs, h_addrs, buf_addrs, sizes, chunk_tensor, chunk_start,
               lr, lr_ptr, found_inf_ptr, momentum, dampening, weight_decay,
               HAS_HEAD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
               MAXIMIZE: tl.constexpr, HAS_LR_PTR: tl.constexpr,
               DTYPE: tl.constexpr, MATH: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
               ALIGNED: tl.constexpr):
    """w <- backup; d = g (+ g_H); torch.optim.SGD's update of w and the momentum buffer.

    ``found_inf_ptr`` always points at a 0-d float32 (zero when the caller has none):
    nonzero restores w and leaves the buffers alone.
    """
    t, start, end, n_full = _chunk(sizes, chunk_tensor, chunk_start, CHUNK, BLOCK)
    w_ptr = _ptr(w_addrs, t, DTYPE, ALIGNED)
    g_ptr = _ptr(g_addrs, t, DTYPE, ALIGNED)
    b_ptr = _ptr(b_addrs, t, DTYPE, ALIGNED)
    h_ptr = _ptr(h_addrs, t, DTYPE, ALIGNED)  # read only when HAS_HEAD
    buf_ptr = _ptr(buf_addrs, t, DTYPE, ALIGNED)  # read only when HAS_MOMENTUM
    step_lr = lr
    if HAS_LR_PTR:
        step_lr = tl.load(lr_ptr).to(tl.float32)
    keep = tl.load(found_inf_ptr) == 0
    for s in range(start, start + n_full, BLOCK):
        _sgd_block(w_ptr, g_ptr, b_ptr, h_ptr, buf_ptr, _full_block(s, BLOCK), None, keep, step_lr, momentum,
                   dampening, weight_decay, HAS_HEAD, HAS_MOMENTUM, FIRST, NESTEROV, MAXIMIZE, DTYPE, MATH)
    offs = start + n_full + tl.arange(0, BLOCK)
    _sgd_block(w_ptr, g_ptr, b_ptr, h_ptr, buf_ptr, offs, offs < end, keep, step_lr, momentum, dampening,
               weight_decay, HAS_HEAD, HAS_MOMENTUM, FIRST, NESTEROV, MAXIMIZE, DTYPE, MATH)


@triton.jit
def _sqrt(x, MATH: tl.constexpr):
    # fp32: IEEE rounding (tl.sqrt may be approximate on a GPU); fp64's is IEEE already.
    if MATH == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _div(a, b, MATH: tl.constexpr):
    # fp32: IEEE rounding (Triton's fp32 division is approximate by default); fp64's is IEEE.
    if MATH == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _adam_block(w_ptr, g_ptr, b_ptr, h_ptr, m_ptr, v_ptr, vmax_ptr, offs, mask, keep, neg_step_size, bc2_sqrt,
                lerp_weight, beta2, one_minus_beta2, eps, weight_decay, decay, HAS_HEAD: tl.constexpr,
                AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr,
                DTYPE: tl.constexpr, MATH: tl.constexpr):
    # csrc/adam_math.h's order of operations.
    w_raw = tl.load(b_ptr + offs, mask=mask)
    w = w_raw.to(MATH)
    d = tl.load(g_ptr + offs, mask=mask).to(MATH)
    if HAS_HEAD:
        d += tl.load(h_ptr + offs, mask=mask).to(MATH)
    if MAXIMIZE:
        d = -d
    if DECOUPLED:
        w = w * decay
    elif HAS_WD:
        d = d + weight_decay * w
    m_raw = tl.load(m_ptr + offs, mask=mask)
    m0 = m_raw.to(MATH)
    small = (lerp_weight < 0.5) & (lerp_weight > -0.5)  # ATen's lerp: exact at each end of the weight
    m = tl.where(small, m0 + lerp_weight * (d - m0), d - (d - m0) * (1 - lerp_weight))
    v_raw = tl.load(v_ptr + offs, mask=mask)
    v = v_raw.to(MATH) * beta2
    v = v + one_minus_beta2 * d * d
    second = v
    if AMSGRAD:
        vmax_raw = tl.load(vmax_ptr + offs, mask=mask)
        vmax0 = vmax_raw.to(MATH)
        second = tl.where((vmax0 > v) | (vmax0 != vmax0), vmax0, v)  # torch.maximum keeps a NaN
        tl.store(vmax_ptr + offs, tl.where(keep, _store_cast(second, DTYPE), vmax_raw), mask=mask)
    denom = _div(_sqrt(second, MATH), bc2_sqrt, MATH) + eps
    new_w = w + _div(neg_step_size * m, denom, MATH)
    tl.store(m_ptr + offs, tl.where(keep, _store_cast(m, DTYPE), m_raw), mask=mask)
    tl.store(v_ptr + offs, tl.where(keep, _store_cast(v, DTYPE), v_raw), mask=mask)
    tl.store(w_ptr + offs, tl.where(keep, _store_cast(new_w, DTYPE), w_raw), mask=mask)


@triton.jit
def adam_kernel(w_addrs, g_addrs, b_addrs, h_addrs, m_addrs, v_addrs, vmax_addrs, index, coefs, sizes,
                chunk_tensor, chunk_start, decay, lr_ptr, found_inf_ptr, lerp_weight, beta2, one_minus_beta2, eps,
                weight_decay,
                HAS_HEAD: tl.constexpr, AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, HAS_WD: tl.constexpr,
                MAXIMIZE: tl.constexpr, HAS_LR_PTR: tl.constexpr, DTYPE: tl.constexpr, MATH: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """w <- backup; d = g (+ g_H); torch.optim.Adam(W)'s update of w, m, v (and vmax).

    ``lerp_weight`` = 1 - beta1, ``one_minus_beta2`` and ``decay`` = 1 - lr * wd come from
    the host, computed in double as torch computes them.
    ``coefs[2 * i]``, ``coefs[2 * i + 1]``: the call's tensor i's lr / (1 - beta1^step) and
    sqrt(1 - beta2^step) (fp64, computed on the device); ``index[t]`` is this launch's
    tensor t's i. ``found_inf_ptr`` always points at a 0-d float32 (zero when the caller
    has none): nonzero restores w and leaves m, v and vmax alone.
    """
    t, start, end, n_full = _chunk(sizes, chunk_tensor, chunk_start, CHUNK, BLOCK)
    w_ptr = _ptr(w_addrs, t, DTYPE, ALIGNED)
    g_ptr = _ptr(g_addrs, t, DTYPE, ALIGNED)
    b_ptr = _ptr(b_addrs, t, DTYPE, ALIGNED)
    h_ptr = _ptr(h_addrs, t, DTYPE, ALIGNED)  # read only when HAS_HEAD
    m_ptr = _ptr(m_addrs, t, DTYPE, ALIGNED)
    v_ptr = _ptr(v_addrs, t, DTYPE, ALIGNED)
    vmax_ptr = _ptr(vmax_addrs, t, DTYPE, ALIGNED)  # read only when AMSGRAD
    i = tl.load(index + t)
    neg_step_size = (-tl.load(coefs + 2 * i)).to(MATH)
    bc2_sqrt = tl.load(coefs + 2 * i + 1).to(MATH)
    if HAS_LR_PTR:  # else the host computed AdamW's 1 - lr * wd in double, as torch does
        decay = 1 - tl.load(lr_ptr).to(tl.float32) * weight_decay
    keep = tl.load(found_inf_ptr) == 0
    for s in range(start, start + n_full, BLOCK):
        _adam_block(w_ptr, g_ptr, b_ptr, h_ptr, m_ptr, v_ptr, vmax_ptr, _full_block(s, BLOCK), None, keep,
                    neg_step_size, bc2_sqrt, lerp_weight, beta2, one_minus_beta2, eps, weight_decay, decay, HAS_HEAD,
                    AMSGRAD, DECOUPLED, HAS_WD, MAXIMIZE, DTYPE, MATH)
    offs = start + n_full + tl.arange(0, BLOCK)
    _adam_block(w_ptr, g_ptr, b_ptr, h_ptr, m_ptr, v_ptr, vmax_ptr, offs, offs < end, keep, neg_step_size, bc2_sqrt,
                lerp_weight, beta2, one_minus_beta2, eps, weight_decay, decay, HAS_HEAD, AMSGRAD, DECOUPLED, HAS_WD,
                MAXIMIZE, DTYPE, MATH)
