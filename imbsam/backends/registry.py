"""Which implementation of the ops runs: the one table of backends, availability, ``auto``.

Everything that asks "which backends, on which device" (the optimizers, the trainer, the
benchmarks, the tests) asks this registry: adding a backend is one ``Backend`` record here
and its module (ops with the reference's signatures, availability probes); see README.md.
"""
from __future__ import annotations

import functools
import types
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from imbsam.backends import compiled, reference
from imbsam.backends.triton import ops as triton_ops
from imbsam.backends.triton import probe as triton_probe


@dataclass(frozen=True)
class Backend:
    """One implementation of the ops, and what the engine may rely on it for."""

    name: str
    ops: types.ModuleType  # a function per name in reference.OPS, with the reference's signature
    devices: tuple[str, ...]  # the device types it runs on, in the order it prefers them
    fast: bool  # a compiled fast path, compared with the reference by benchmarks and tests
    checks_inputs: bool  # its ops check every input before they write (else the engine checks)
    # The base optimizers whose step its fused ops replace: "sgd" (restore_sgd_step_ for
    # torch.optim.SGD), "adam" (restore_adam_step_ for torch.optim.Adam and AdamW). The
    # reference's are only the spec the others are tested against: with it the engine runs
    # the base optimizer itself.
    fused_bases: tuple[str, ...]
    emulated_on: tuple[str, ...] = ()  # device types where it runs only in an emulator (no speed)
    usable_on: Callable[[str], bool] = lambda device_type: True  # noqa: E731
    # Why it is not usable here at all (asked for the message when usable_on says it is not).
    why_unusable: Callable[[], str] = lambda: "it is not usable here"  # noqa: E731
    # Why it cannot run on one device it is usable on (a GPU it has no code for), or None.
    unusable_at: Callable[[torch.device], "str | None"] = lambda device: None  # noqa: E731


# The base optimizers every fast backend fuses (the engine's _fused_sgd and _fused_adam).
FUSED_BASES = ("sgd", "adam")

# In the order ``auto`` prefers them on a device: the first fast, non-emulated, usable one.
REGISTRY: dict[str, Backend] = {b.name: b for b in (
    Backend("reference", reference, devices=("cpu", "cuda"), fast=False, checks_inputs=True, fused_bases=()),
    Backend("cpp", compiled, devices=("cpu",), fast=True, checks_inputs=True, fused_bases=FUSED_BASES,
            usable_on=compiled.usable_on_cpu, why_unusable=lambda: compiled.why_unusable("CPU")),
    Backend("cuda", compiled, devices=("cuda",), fast=True, checks_inputs=True, fused_bases=FUSED_BASES,
            usable_on=compiled.usable_on_cuda, why_unusable=lambda: compiled.why_unusable("CUDA"),
            unusable_at=compiled.cuda_unusable_at),
    Backend("triton", triton_ops, devices=("cuda", "cpu"), fast=True, checks_inputs=True, fused_bases=FUSED_BASES,
            emulated_on=("cpu",), usable_on=triton_probe.usable_on, why_unusable=triton_probe.why_unusable),
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
    for cached in (_usable_devices, _available, _backends_for, _auto, compiled._image_error_of):
        cached.cache_clear()


def home_device(backend: str) -> str:
    """The device type a backend's tensors live on here: its first usable device."""
    return (_usable_devices()[backend] or REGISTRY[backend].devices)[0]


def check_backend_name(backend: str) -> None:
    allowed = ("auto", *REGISTRY)
    if backend not in allowed:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(map(repr, allowed))}")
    if backend != "auto" and backend not in available_backends():
        raise ValueError(f"backend {backend!r} is not available here ({REGISTRY[backend].why_unusable()}); "
                         f"available: {available_backends()}")


# A constant to torch.compile, computed once when it traces (what is usable is fixed for a
# process): dynamo neither traces the probes and caches below nor breaks the graph here.
@torch.compiler.assume_constant_result
def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``; ``auto`` picks the fastest usable one."""
    if backend == "auto":
        return _auto(device)
    entry = REGISTRY[backend]
    if device.type not in entry.devices:
        raise ValueError(f"backend {backend!r} runs on {' or '.join(entry.devices)} tensors, but the parameters "
                         f"are on {device}; use backend='auto' or move the model")
    if device.type not in _usable_devices()[backend]:
        raise ValueError(f"backend {backend!r} cannot run on {device} tensors: {entry.why_unusable()}")
    reason = entry.unusable_at(device)
    if reason is not None:
        raise ValueError(f"backend {backend!r} cannot run on {device}: {reason}")
    return backend


@functools.lru_cache(maxsize=None)  # asked every phase; what is usable is fixed for a process
def _auto(device: torch.device) -> str:
    """The first fast backend that runs natively on ``device``, else the reference, with a warning."""
    natives = [b for b in REGISTRY.values() if b.fast and device.type in b.devices and device.type not in b.emulated_on]
    for b in natives:
        reason = b.unusable_at(device)
        if reason is not None:  # there, but not for this device: say so once, then try the next
            _warn_once(f"imbsam: backend='auto' cannot use the {b.name!r} backend on {device}: {reason}")
        elif device.type in _usable_devices()[b.name]:
            return b.name
    # Why the first fast backend meant for this device is missing (the one a user expects).
    why = natives[0].why_unusable() if natives else f"no fast backend runs on {device.type}"
    _warn_once(f"imbsam: backend='auto' falls back to the slow 'reference' backend on {device.type}: {why}")
    return "reference"


_warned: set = set()


def _warn_once(message: str) -> None:
    """One warning per distinct reason and process: a fallback is reported, not repeated every phase."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def ops_for(concrete_backend: str) -> types.ModuleType:
    """The module whose functions implement the ops for a concrete (non-auto) backend."""
    return REGISTRY[concrete_backend].ops
