"""imbsam's CUDA kernels run on the CPU: the device code of csrc/cuda/device/, built by
clang++ against tests/cuda_emu/cuda_emu.h, called through ctypes.

Each function here has the signature of the op of the same name in ``imbsam.backends.reference``
and does what the op's .cu glue does (csrc/cuda/*.cu): group the tensors by dtype, one
launch sequence per group, the norm's partial-sum slots one group after another. The
tensors are CPU tensors; the kernels read and write their memory directly.

Builds are cached in build/cuda_emu/, keyed by the sources and flags.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from imbsam.backends import adam_steps

ROOT = Path(__file__).resolve().parent.parent
# What a build depends on besides its own .cpp (the cache key hashes them all).
SOURCES = [ROOT / "tests/cuda_emu/cuda_emu.h",
           ROOT / "csrc/math_type.h", ROOT / "csrc/adam_math.h", ROOT / "csrc/adam_args.h",
           ROOT / "csrc/cuda/mta_plan.h", *sorted((ROOT / "csrc/cuda/device").glob("*.cuh"))]
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
ORDERS = {"forward": 0, "reverse": 1, "random": 2}
# -ffp-contract=off: the kernels must round as written (nvcc is told the same with --fmad=false).
FLAGS = ["-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-ffp-contract=off", "-Wall", "-Werror",
         "-Wno-unknown-pragmas"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


def compiler() -> Optional[str]:
    return shutil.which(os.environ.get("IMBSAM_EMU_CXX", "clang++"))


def build(large_args: bool, sanitize: bool = False, source: str = "kernels") -> Path:
    """Compiles tests/cuda_emu/SOURCE.cpp (the emulated kernels, or the emulator's own
    self-test) once per sources and flags, and returns the library."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("the CUDA emulator needs clang++ (apt-get install clang)")
    torch_include = Path(torch.__file__).parent / "include"
    flags = FLAGS + (SANITIZE if sanitize else []) + [
        f"-DIMBSAM_MTA_LARGE_ARGS={int(large_args)}", f"-I{ROOT / 'csrc'}", f"-I{torch_include}"]
    main = ROOT / "tests" / "cuda_emu" / f"{source}.cpp"
    key = hashlib.sha256("\0".join([cxx, *flags, *(p.read_text() for p in [main, *SOURCES])]).encode()).hexdigest()
    variant = f"{source}-{'large' if large_args else 'small'}{'-asan' if sanitize else ''}"
    out = ROOT / "build" / "cuda_emu" / f"{variant}-{key[:16]}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        subprocess.run([cxx, *flags, str(main), "-o", str(tmp)], check=True)
        os.replace(tmp, out)  # atomic: a concurrent worker never loads half a library
    return out


class EmulatorError(RuntimeError):
    """A launch the emulator aborted: a barrier or shuffle not every thread reached, a
    misaligned vector access, ..."""


class Kernels:
    """One build of the emulated kernels (4 KiB or 32 KiB kernel-argument metadata)."""

    def __init__(self, large_args: bool, sanitize: bool = False):
        lib = ctypes.CDLL(str(build(large_args, sanitize)))
        lib.emu_last_error.restype = ctypes.c_char_p
        for name in ("emu_launches", "emu_chunk_size"):
            getattr(lib, name).restype = ctypes.c_int64
        self.lib = lib
        self.large_args = bool(lib.emu_large_args())
        self.chunk_size = lib.emu_chunk_size()
        self.max_blocks = lib.emu_max_blocks()
        assert self.large_args == large_args

    def configure(self, order: str, seed: int = 0) -> None:
        self.lib.emu_configure(ORDERS[order], ctypes.c_uint64(seed))

    def launches(self) -> int:
        return self.lib.emu_launches()

    def _check(self, rc: int) -> None:
        if rc != 0:
            message = self.lib.emu_last_error().decode()
            self.lib.emu_clear_error()
            raise EmulatorError(message)

    # -- the ops, as their .cu glue runs them ------------------------------------------

    def grad_norm(self, grads: Sequence[Tensor], adaptive_grads: Sequence[Tensor],
                  adaptive_params: Sequence[Tensor], eta_a: float) -> Tensor:
        return self.grad_norm_and_partials(grads, adaptive_grads, adaptive_params, eta_a)[0]

    def grad_norm_and_partials(self, grads, adaptive_grads, adaptive_params, eta_a) -> tuple[Tensor, Tensor]:
        """The norm and stage 1's per-chunk sums of squares, in slot order."""
        everything = list(grads) + list(adaptive_grads)
        if not everything:
            return torch.zeros((), dtype=torch.float32), torch.zeros(0, dtype=torch.float64)
        any_double = any(t.dtype == torch.float64 for t in everything)
        partials = torch.empty(max(self.count_chunks(everything), 1), dtype=torch.float64)
        out = torch.empty((), dtype=torch.float64 if any_double else torch.float32)
        slot = 0
        for adaptive, (gs, ws) in enumerate(((list(grads), [None] * len(grads)),
                                             (list(adaptive_grads), list(adaptive_params)))):
            for dtype, idx in group_by_dtype(gs):
                g = [gs[i] for i in idx]
                w = [ws[i] for i in idx] if adaptive else g
                self._check(self.lib.emu_sum_squares(
                    DTYPE_CODES[dtype], len(idx), pointers(g), pointers(w), numels(g), ctypes.c_double(eta_a),
                    adaptive, ctypes.c_void_p(partials.data_ptr() + 8 * slot)))
                slot += self.count_chunks(g)
        self._check(self.lib.emu_finalize_norm(ctypes.c_void_p(partials.data_ptr()),
                                               ctypes.c_int64(self.count_chunks(everything)), int(any_double),
                                               ctypes.c_void_p(out.data_ptr())))
        return out, partials[:slot]

    def perturb_(self, params, grads, backups, norm: Tensor, rho: float, eta_a: float, adaptive: bool) -> None:
        for dtype, idx in group_by_dtype(params):
            w, g, b = ([lst[i] for i in idx] for lst in (params, grads, backups))
            self._check(self.lib.emu_perturb(
                DTYPE_CODES[dtype], len(idx), pointers(w), pointers(g), pointers(b), numels(w),
                ctypes.c_void_p(norm.data_ptr()), int(norm.dtype == torch.float64), ctypes.c_double(rho),
                ctypes.c_double(eta_a), int(adaptive)))

    def restore_(self, params, backups) -> None:
        for dtype, idx in group_by_dtype(params):
            w, b = ([lst[i] for i in idx] for lst in (params, backups))
            self._check(self.lib.emu_restore(DTYPE_CODES[dtype], len(idx), pointers(w), pointers(b), numels(w)))

    def add_head_grads_(self, grads, head_grads) -> None:
        for dtype, idx in group_by_dtype(grads):
            g, h = ([lst[i] for i in idx] for lst in (grads, head_grads))
            self._check(self.lib.emu_add_head_grads(DTYPE_CODES[dtype], len(idx), pointers(g), pointers(h),
                                                    numels(g)))

    def restore_sgd_step_(self, params, grads, backups, head_grads, momentum_buffers, lr, momentum, dampening,
                          weight_decay, nesterov, maximize, first_momentum_step, lr_tensor=None,
                          found_inf=None) -> None:
        # The glue hands the kernels float32 copies of the device scalars.
        lr_f = lr_tensor.to(torch.float32) if lr_tensor is not None else None
        inf_f = found_inf.to(torch.float32) if found_inf is not None else None
        for dtype, idx in group_by_dtype(params):
            w, g, b = ([lst[i] for i in idx] for lst in (params, grads, backups))
            h = pointers([head_grads[i] for i in idx]) if len(head_grads) else None
            bufs = pointers([momentum_buffers[i] for i in idx]) if momentum != 0 else None
            self._check(self.lib.emu_restore_sgd_step(
                DTYPE_CODES[dtype], len(idx), pointers(w), pointers(g), pointers(b), h, bufs, numels(w),
                ctypes.c_double(lr), ctypes.c_double(momentum), ctypes.c_double(dampening),
                ctypes.c_double(weight_decay), int(nesterov), int(maximize), int(first_momentum_step),
                ctypes.c_void_p(lr_f.data_ptr()) if lr_f is not None else None,
                ctypes.c_void_p(inf_f.data_ptr()) if inf_f is not None else None))

    def restore_adam_step_(self, params, grads, backups, head_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                           state_steps, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad,
                           maximize, lr_tensor=None, found_inf=None) -> None:
        # The glue's torch part (csrc/cuda/adam_step.cu, the same as the Triton backend's
        # adam_steps): the step counts, then each tensor's bias corrections in float64.
        lr_f = lr_tensor.to(torch.float32) if lr_tensor is not None else None
        inf_f = found_inf.to(torch.float32) if found_inf is not None else None
        if not len(params):
            return
        adam_steps.increment(state_steps, inf_f)
        coefs = adam_steps.bias_corrections(state_steps, params[0].device, lr if lr_tensor is None else lr_tensor,
                                            beta1, beta2)
        for dtype, idx in group_by_dtype(params):
            w, g, b, m, v = ([lst[i] for i in idx] for lst in (params, grads, backups, exp_avgs, exp_avg_sqs))
            h = pointers([head_grads[i] for i in idx]) if len(head_grads) else None
            vmax = pointers([max_exp_avg_sqs[i] for i in idx]) if amsgrad else None
            group_coefs = coefs.view(-1, 2)[idx].contiguous()  # the glue points into the call's own table
            self._check(self.lib.emu_restore_adam_step(
                DTYPE_CODES[dtype], len(idx), pointers(w), pointers(g), pointers(b), h, pointers(m), pointers(v),
                vmax, numels(w), ctypes.c_void_p(group_coefs.data_ptr()), ctypes.c_double(lr),
                ctypes.c_double(beta1), ctypes.c_double(beta2), ctypes.c_double(eps), ctypes.c_double(weight_decay),
                int(decoupled_weight_decay), int(amsgrad), int(maximize),
                ctypes.c_void_p(lr_f.data_ptr()) if lr_f is not None else None,
                ctypes.c_void_p(inf_f.data_ptr()) if inf_f is not None else None))

    def count_chunks(self, tensors: Sequence[Tensor]) -> int:
        return sum(-(-t.numel() // self.chunk_size) for t in tensors)


def group_by_dtype(tensors: Sequence[Tensor]) -> list[tuple[torch.dtype, list[int]]]:
    """Indices per dtype, in the order the dtypes first appear (dispatch.cuh's group_by_dtype)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return list(groups.items())


def pointers(tensors: Sequence[Tensor]):
    return (ctypes.c_void_p * max(len(tensors), 1))(*(t.data_ptr() for t in tensors))


def numels(tensors: Sequence[Tensor]):
    return (ctypes.c_int64 * max(len(tensors), 1))(*(t.numel() for t in tensors))


@lru_cache(maxsize=None)
def kernels(large_args: bool, sanitize: bool = False) -> Kernels:
    return Kernels(large_args, sanitize)
