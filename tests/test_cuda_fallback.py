"""A GPU the library has no kernel image for (built for other architectures): ``auto``
falls back with one clear warning, an explicit ``backend='cuda'`` is refused with the
reason and the rebuild command. The GPU and the probe are stood in for here; the probe
itself runs in test_gpu.py."""
from __future__ import annotations

import warnings

import pytest
import torch

from imbsam import backends
from imbsam.backends import compiled, registry

NO_IMAGE = "no kernel image is available for execution on the device"


@pytest.fixture
def old_gpu(monkeypatch):
    """A visible compute-capability 8.0 GPU for which imbsam._C holds no kernel image."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(compiled, "has_kernel", lambda key: True)
    monkeypatch.setattr(torch.ops.imbsam, "cuda_kernel_image_error", lambda index: NO_IMAGE, raising=False)
    monkeypatch.setattr(registry, "_warned", set())
    backends.clear_caches()
    yield
    backends.clear_caches()


def test_the_reason_names_the_gpu_and_the_rebuild(old_gpu):
    reason = backends.cuda_image_error(0)
    assert NO_IMAGE in reason and "A100" in reason and "compute capability 8.0" in reason
    assert "TORCH_CUDA_ARCH_LIST=8.0" in reason


def test_cuda_is_not_declared_available_on_such_a_gpu(old_gpu):
    assert "cuda" not in backends.available_backends()


def test_auto_falls_back_with_one_warning(old_gpu):
    device = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match="cannot use the 'cuda' backend.*no kernel image") as caught:
        first = backends.resolve("auto", device)
    assert first in ("triton", "reference") and first != "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason is not reported twice
        assert backends.resolve("auto", device) == first
    assert sum("'cuda' backend" in str(w.message) for w in caught) == 1


def test_an_explicit_cuda_backend_is_refused_with_the_reason(old_gpu):
    with pytest.raises(ValueError, match="backend 'cuda' cannot run on cuda:0.*TORCH_CUDA_ARCH_LIST=8.0"):
        backends.resolve("cuda", torch.device("cuda", 0))


def test_a_gpu_with_an_image_gets_the_cuda_backend(old_gpu, monkeypatch):
    monkeypatch.setattr(torch.ops.imbsam, "cuda_kernel_image_error", lambda index: "", raising=False)
    assert backends.cuda_image_error(0) is None
    assert backends.resolve("auto", torch.device("cuda", 0)) == "cuda"


def test_each_gpu_of_a_mixed_machine_gets_its_own_answer(old_gpu, monkeypatch):
    """The probe is cached per device index, not under "the current GPU": GPU 0 has a kernel
    image, GPU 1 (another architecture) has none."""
    monkeypatch.setattr(torch.ops.imbsam, "cuda_kernel_image_error", lambda index: "" if index == 0 else NO_IMAGE,
                        raising=False)
    assert backends.cuda_image_error(None) is None  # the current GPU: 0
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert NO_IMAGE in backends.cuda_image_error(None)
    assert backends.cuda_image_error(0) is None and NO_IMAGE in backends.cuda_image_error(1)
