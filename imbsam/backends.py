"""Which implementation of the ops runs: names, availability and the ``auto`` choice."""
from __future__ import annotations

import functools
import types
import warnings

import torch

from imbsam import _library, ops, reference, triton_ops

BACKENDS = ("auto", "reference", "cpp", "cuda", "triton")

_warned_fallback = False


def available_backends() -> list[str]:
    """The backends usable on this machine, e.g. ``['reference', 'cpp']``."""
    return list(_available())


# Availability is fixed for a process; probing the dispatcher, CUDA and Triton on every
# optimizer phase would cost tens of microseconds each time.
@functools.lru_cache(maxsize=None)
def _available() -> tuple[str, ...]:
    names = ["reference"]
    if _library.has_kernel("CPU"):
        names.append("cpp")
    if torch.cuda.is_available() and _library.has_kernel("CUDA"):
        names.append("cuda")
    if triton_ops.usable_on("cuda") or triton_ops.usable_on("cpu"):
        names.append("triton")
    return tuple(names)


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(map(repr, BACKENDS))}")
    if backend != "auto" and backend not in available_backends():
        raise ValueError(f"backend {backend!r} is not available here ({_why_unavailable(backend)}); "
                         f"available: {available_backends()}")


def _why_unavailable(backend: str) -> str:
    if backend == "triton":
        return triton_ops.why_unusable()
    if not _library.LOADED:
        return f"the compiled library did not load: {_library.LOAD_ERROR}"
    if backend == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible"
    return "imbsam._C was built without its kernels (CUDA toolkit missing at build time?)"


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``; ``auto`` picks the fastest usable one."""
    global _warned_fallback
    if backend == "auto":
        # The fastest usable backend for the device: compiled kernels, then Triton.
        for want in (("cuda", "triton") if device.type == "cuda" else ("cpp",)):
            if want in _available():
                return want
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"imbsam: backend='auto' falls back to the slow 'reference' backend on {device.type}: "
                          f"{_why_unavailable('cuda' if device.type == 'cuda' else 'cpp')}", RuntimeWarning,
                          stacklevel=3)
        return "reference"
    if backend == "triton":
        if not triton_ops.usable_on(device.type):
            raise ValueError(f"backend 'triton' cannot run on {device} tensors: {triton_ops.why_unusable()}")
        return backend
    expected = {"cpp": "cpu", "cuda": "cuda"}.get(backend)
    if expected is not None and device.type != expected:
        raise ValueError(f"backend {backend!r} runs on {expected} tensors, but the parameters are on {device}; "
                         f"use backend='auto' or move the model")
    return backend


def ops_for(concrete_backend: str) -> types.ModuleType:
    """The module whose functions implement the ops for a concrete (non-auto) backend."""
    return {"reference": reference, "triton": triton_ops}.get(concrete_backend, ops)
