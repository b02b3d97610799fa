"""Which implementation of the ops runs: names, availability and the ``auto`` choice."""
from __future__ import annotations

import functools
import types
import warnings

import torch

from imbsam import _library, ops, reference, triton_ops

BACKENDS = ("auto", "reference", "cpp", "cuda", "triton")

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
    if torch.cuda.is_available() and _library.has_kernel("CUDA") and cuda_image_error(None) is None:
        names.append("cuda")
    if triton_ops.usable_on("cuda") or triton_ops.usable_on("cpu"):
        names.append("triton")
    return tuple(names)


@functools.lru_cache(maxsize=None)
def cuda_image_error(device_index: int | None) -> str | None:
    """Why imbsam's CUDA kernels cannot run on this GPU (None when they can): a library
    built for other architectures has no kernel image for it. Asked once per device."""
    index = torch.cuda.current_device() if device_index is None else device_index
    probe = getattr(torch.ops.imbsam, "cuda_kernel_image_error", None) if _library.LOADED else None
    if probe is None:
        return "imbsam._C was built without its CUDA kernels"
    reason = probe(index)
    if not reason:
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return (f"imbsam._C has no kernel image for {torch.cuda.get_device_name(index)} (compute capability "
            f"{major}.{minor}): {reason}; rebuild for it with TORCH_CUDA_ARCH_LIST={major}.{minor} "
            f"pip install --no-build-isolation .")


def _cuda_usable_on(device: torch.device) -> bool:
    return "cuda" in _available() and cuda_image_error(device.index) is None


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
    if backend == "cuda" and _library.has_kernel("CUDA"):
        return cuda_image_error(None) or "its kernels cannot run on this GPU"
    return "imbsam._C was built without its kernels (CUDA toolkit missing at build time?)"


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``; ``auto`` picks the fastest usable one."""
    if backend == "auto":
        # The fastest usable backend for the device: compiled kernels, then Triton.
        if device.type == "cuda" and _library.has_kernel("CUDA") and torch.cuda.is_available():
            if _cuda_usable_on(device):
                return "cuda"
            _warn_once(f"imbsam: backend='auto' cannot use the compiled CUDA kernels on {device}: "
                       f"{cuda_image_error(device.index)}")
        for want in (("triton",) if device.type == "cuda" else ("cpp",)):
            if want in _available():
                return want
        _warn_once(f"imbsam: backend='auto' falls back to the slow 'reference' backend on {device.type}: "
                   f"{_why_unavailable('cuda' if device.type == 'cuda' else 'cpp')}")
        return "reference"
    if backend == "triton":
        if not triton_ops.usable_on(device.type):
            raise ValueError(f"backend 'triton' cannot run on {device} tensors: {triton_ops.why_unusable()}")
        return backend
    expected = {"cpp": "cpu", "cuda": "cuda"}.get(backend)
    if expected is not None and device.type != expected:
        raise ValueError(f"backend {backend!r} runs on {expected} tensors, but the parameters are on {device}; "
                         f"use backend='auto' or move the model")
    if backend == "cuda" and cuda_image_error(device.index) is not None:
        raise ValueError(f"backend 'cuda' cannot run on {device}: {cuda_image_error(device.index)}")
    return backend


_warned: set = set()


def _warn_once(message: str) -> None:
    """One warning per distinct reason and process: a fallback is reported, not repeated every phase."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def ops_for(concrete_backend: str) -> types.ModuleType:
    """The module whose functions implement the ops for a concrete (non-auto) backend."""
    return {"reference": reference, "triton": triton_ops}.get(concrete_backend, ops)
