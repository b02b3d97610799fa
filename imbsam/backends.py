"""Which implementation of the ops runs: the one table of backends, availability, ``auto``.

Everything that asks "which backends, on which device" (the optimizers, the trainer, the
benchmarks, the tests) asks this registry: adding a backend is one ``Backend`` record here,
its ops module, and its availability probe.
"""
from __future__ import annotations

import functools
import types
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from imbsam import _library, ops, reference, triton_ops


@dataclass(frozen=True)
class Backend:
    """One implementation of the ops, and what the engine may rely on it for."""

    name: str
    ops: types.ModuleType  # grad_norm, perturb_, restore_, add_head_grads_, restore_sgd_step_
    devices: tuple[str, ...]  # the device types it runs on, in the order it prefers them
    fast: bool  # a compiled fast path, compared with the reference by benchmarks and tests
    checks_inputs: bool  # its ops check every input before they write (else the engine checks)
    # Its restore_sgd_step_ replaces torch.optim.SGD's step (the reference's is only the spec
    # the others are tested against: with it the engine runs torch.optim.SGD itself).
    fused_sgd: bool
    emulated_on: tuple[str, ...] = ()  # device types where it runs only in an emulator (no speed)
    usable_on: Callable[[str], bool] = lambda device_type: True  # noqa: E731


def _cuda_built_and_usable(device_type: str) -> bool:
    return (device_type == "cuda" and torch.cuda.is_available() and _library.has_kernel("CUDA")
            and cuda_image_error(None) is None)


# In the order ``auto`` prefers them on a device: the first fast, non-emulated, usable one.
REGISTRY: dict[str, Backend] = {b.name: b for b in (
    Backend("reference", reference, devices=("cpu", "cuda"), fast=False, checks_inputs=False, fused_sgd=False),
    Backend("cpp", ops, devices=("cpu",), fast=True, checks_inputs=True, fused_sgd=True,
            usable_on=lambda device_type: device_type == "cpu" and _library.has_kernel("CPU")),
    Backend("cuda", ops, devices=("cuda",), fast=True, checks_inputs=True, fused_sgd=True,
            usable_on=_cuda_built_and_usable),
    Backend("triton", triton_ops, devices=("cuda", "cpu"), fast=True, checks_inputs=True, fused_sgd=True,
            emulated_on=("cpu",), usable_on=triton_ops.usable_on),
)}
BACKENDS = ("auto", *REGISTRY)  # what a user may ask for


def record(name: str) -> Backend:
    """The registry record of a concrete (non-``auto``) backend."""
    return REGISTRY[name]


def available_backends() -> list[str]:
    """The backends usable on this machine, e.g. ``['reference', 'cpp']``."""
    return list(_available())


# Availability is fixed for a process; probing the dispatcher, CUDA and Triton on every
# optimizer phase would cost tens of microseconds each time.
@functools.lru_cache(maxsize=None)
def _usable_devices() -> dict[str, tuple[str, ...]]:
    """Per backend, the device types it is usable on here (empty: not usable)."""
    return {b.name: tuple(d for d in b.devices if b.usable_on(d)) for b in REGISTRY.values()}


@functools.lru_cache(maxsize=None)
def _available() -> tuple[str, ...]:
    return tuple(name for name, devices in _usable_devices().items() if devices)


@functools.lru_cache(maxsize=None)
def _backends_for(device_type: str, fast_only: bool, emulated: bool) -> tuple[str, ...]:
    return tuple(b.name for b in REGISTRY.values()
                 if device_type in _usable_devices()[b.name] and (b.fast or not fast_only)
                 and (emulated or device_type not in b.emulated_on))


def backends_for(device_type: str, fast_only: bool = False, emulated: bool = True) -> list[str]:
    """The usable backends whose ops take tensors on ``device_type`` (``"cpu"``, ``"cuda"``):
    only the compiled fast paths with ``fast_only``, and without those that run there only
    in an emulator (Triton's CPU interpreter) when ``emulated`` is False."""
    return list(_backends_for(device_type, fast_only, emulated))


def clear_caches() -> None:
    """Forgets what was probed (for tests that change what the machine seems to have)."""
    for cached in (_usable_devices, _available, _backends_for, cuda_image_error):
        cached.cache_clear()


def home_device(backend: str) -> str:
    """The device type a backend's tensors live on here: its first usable device."""
    return (_usable_devices()[backend] or REGISTRY[backend].devices)[0]


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
    allowed = ("auto", *REGISTRY)
    if backend not in allowed:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(map(repr, allowed))}")
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
        if device.type == "cuda" and _library.has_kernel("CUDA") and torch.cuda.is_available() \
                and not _cuda_usable_on(device):
            _warn_once(f"imbsam: backend='auto' cannot use the compiled CUDA kernels on {device}: "
                       f"{cuda_image_error(device.index)}")
        for name in _backends_for(device.type, True, False):
            if name != "cuda" or _cuda_usable_on(device):
                return name
        _warn_once(f"imbsam: backend='auto' falls back to the slow 'reference' backend on {device.type}: "
                   f"{_why_unavailable('cuda' if device.type == 'cuda' else 'cpp')}")
        return "reference"
    if backend == "triton":
        if not triton_ops.usable_on(device.type):
            raise ValueError(f"backend 'triton' cannot run on {device} tensors: {triton_ops.why_unusable()}")
        return backend
    devices = REGISTRY[backend].devices
    if device.type not in devices:
        raise ValueError(f"backend {backend!r} runs on {' or '.join(devices)} tensors, but the parameters are on "
                         f"{device}; use backend='auto' or move the model")
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
    return REGISTRY[concrete_backend].ops
