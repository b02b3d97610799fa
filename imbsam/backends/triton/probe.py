"""Whether the Triton backend can run here, and why not when it cannot."""
import functools
import os
from typing import Optional

import torch

try:
    import triton.language as tl

    from imbsam.backends.triton import kernels as K

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
    return device_type == "cpu" and interpreting() and interpreter_error() is None


def why_unusable() -> str:
    if IMPORT_ERROR is not None:
        return f"triton did not import: {IMPORT_ERROR}"
    if interpreting() and not torch.cuda.is_available() and interpreter_error() is not None:
        return f"Triton's interpreter fails on the kernels: {interpreter_error()}"
    return "triton needs a CUDA device (or TRITON_INTERPRET=1 to run on the CPU)"


@functools.lru_cache(maxsize=None)
def interpreter_error() -> Optional[str]:
    """Why Triton's interpreter fails on one tiny copy, or None when it runs it right.

    Some interpreters cannot run these kernels at all: Triton 3.6's, with numpy >= 2.4,
    hands the chunk loop 1-element arrays as bounds, which numpy no longer turns into ints.
    """
    from imbsam.backends.triton import tables  # needs triton: imported once it is known to be there

    src, dst = torch.arange(3, dtype=torch.float32), torch.zeros(3)
    try:
        for _, _, tab in tables.build_plan([[dst], [src]]):
            tables.launch(K.copy_kernel, tab, tab.addrs[0], tab.addrs[1], DTYPE=tl.float32)
    except Exception as exc:  # whatever the interpreter raises: the backend is unusable, and says why
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None if torch.equal(dst, src) else "a test copy gave wrong values"

