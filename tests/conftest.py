"""Shared test helpers: which fast backends run here, and dtype-aware comparisons."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter; the flag
# must be set before the kernels are defined (on import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import imbsam  # noqa: E402
from imbsam import backends  # noqa: E402

# Under pytest-xdist (CI: two workers on two cores) each worker computes on one thread: two
# workers with torch's default of one thread per core each made the trainer tests 20x
# slower (OpenMP's threads waiting on each other's cores). OMP_NUM_THREADS reaches the
# processes the tests start too. The cpp kernels' parallel split is tested with 1 and 2
# threads explicitly (test_ops.py).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# GPU results compared bitwise or to rounding must not depend on cuDNN's choice of
# algorithm or on TF32 (10-bit mantissas in fp32 convolutions and matmuls). Set here, at
# conftest import, so that every process running tests has it: each pytest-xdist worker
# imports this file, and no test's outcome depends on which file ran first.
torch.backends.cudnn.deterministic = True
torch.backends.cudnn.benchmark = False
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

# torch.compile functionalizes an op that mutates a list of tensors only from torch 2.5
# (auto_functionalize of Tensor(a!)[]); 2.4 rejects every imbsam op when tracing.
COMPILES_MUTABLE_LISTS = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)

DTYPES = list(imbsam.backends.checks.SUPPORTED)  # every dtype the ops take
SIZES = [1, 7, 65537, 278011, 0]


def fast_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs of the compiled backends usable here, each on its home device."""
    return [(b, backends.home_device(b)) for b in imbsam.available_backends() if backends.record(b).fast]


FAST = fast_backends()
fast_backend = pytest.mark.parametrize("backend,device", FAST or [pytest.param("cpp", "cpu", marks=pytest.mark.skip(
    reason="imbsam._C did not load: " + str(imbsam.backends.compiled.LOAD_ERROR)))])


def max_err(a, b) -> float:
    a, b = list(a), list(b)
    errs = [(x.double() - y.double()).abs().max().item() for x, y in zip(a, b) if x.numel()]
    return max(errs, default=0.0)


def assert_close_to_exact(fast, ref_same_dtype, ref_fp64, dtype, slack: float = 2.0) -> None:
    """The fast result may be off the float64 truth by at most ``slack`` times what the
    reference in the same dtype is off by (plus one rounding step of the dtype)."""
    err_fast = max_err(fast, ref_fp64)
    err_ref = max_err(ref_same_dtype, ref_fp64)
    scale = max((r.double().abs().max().item() for r in ref_fp64 if r.numel()), default=1.0)
    ulp = torch.finfo(dtype).eps * max(scale, 1.0)
    assert err_fast <= slack * err_ref + ulp, f"{dtype}: fast error {err_fast:.3g}, reference error {err_ref:.3g}"


def device_of(backend) -> str:
    """Where a backend's tensors live: a compiled backend's home device, else the CPU."""
    if backend in backends.REGISTRY and backends.record(backend).fast:
        return backends.home_device(backend)
    return "cpu"


@pytest.fixture(autouse=True)
def _models_follow_the_backend(request):
    """Tests parametrised by backend build their models and batches on its device."""
    import models

    callspec = getattr(request.node, "callspec", None)
    models.DEVICE = device_of(callspec.params.get("backend") if callspec else None)
    yield
    models.DEVICE = "cpu"
