"""The implementations of imbsam's five ops, and the one table that says which runs where.

    registry.py    one ``Backend`` record per backend; available / for-device / ``auto``
    reference.py   the spec: plain per-tensor PyTorch (the ``reference`` backend)
    compiled.py    imbsam._C's ops (``cpp`` on the CPU, ``cuda`` on NVIDIA GPUs)
    triton/        the Triton kernels, their address tables, ops and availability probe
    checks.py      the input checks every fast backend makes before it writes

README.md beside this file says how to add a backend or an op.
"""
from imbsam.backends.compiled import cuda_image_error
from imbsam.backends.registry import (
    BACKENDS,
    REGISTRY,
    Backend,
    available_backends,
    backends_for,
    check_backend_name,
    clear_caches,
    home_device,
    ops_for,
    record,
    resolve,
)

__all__ = ["BACKENDS", "REGISTRY", "Backend", "available_backends", "backends_for", "check_backend_name",
           "clear_caches", "cuda_image_error", "home_device", "ops_for", "record", "resolve"]
