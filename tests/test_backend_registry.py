"""The backend registry is the one table of backends: what it says is what runs, and a
backend added as one record is found by availability, ``auto``, the optimizers and the
engine's capability checks."""
from __future__ import annotations

import pytest
import torch

import imbsam
from imbsam import backends
from imbsam.backends import registry

from models import batches, small_cnn

OPS = imbsam.reference.OPS


def test_every_backend_a_user_may_name_has_a_record_with_every_op():
    assert backends.BACKENDS == ("auto", *backends.REGISTRY)
    for name, record in backends.REGISTRY.items():
        assert record.name == name and record.devices
        assert all(callable(getattr(record.ops, op)) for op in OPS), name


def test_what_runs_on_the_cpu_here_comes_from_the_registry():
    on_cpu = backends.backends_for("cpu")
    assert on_cpu[0] == "reference" and set(on_cpu) <= set(imbsam.available_backends())
    fast_native = backends.backends_for("cpu", fast_only=True, emulated=False)
    assert "reference" not in fast_native and "triton" not in fast_native  # the interpreter is not native
    assert backends.resolve("auto", torch.device("cpu")) == (fast_native or ["reference"])[0]
    for name in imbsam.available_backends():
        assert backends.home_device(name) in backends.record(name).devices


@pytest.fixture
def fake_backend(monkeypatch):
    """A backend registered as one record: the reference's ops, claiming to be fast and to
    check nothing, first in auto's order on the CPU."""
    fake = backends.Backend("fake", imbsam.reference, devices=("cpu",), fast=True, checks_inputs=False,
                            fused_bases=())
    monkeypatch.setattr(registry, "REGISTRY", {"fake": fake, **backends.REGISTRY})
    backends.clear_caches()
    yield fake
    backends.clear_caches()


def test_a_backend_added_as_one_record_is_found_everywhere(fake_backend):
    assert "fake" in imbsam.available_backends()
    assert backends.backends_for("cpu", fast_only=True)[0] == "fake"
    assert backends.resolve("auto", torch.device("cpu")) == "fake"
    model = small_cnn()
    opt = imbsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    assert opt.backend_for("cpu") == "fake"


def test_the_engine_acts_on_capabilities_not_names(fake_backend):
    # checks_inputs=False: the engine makes the checks itself (a sparse gradient is refused
    # with the clear message, before anything is written); fused_bases=(): torch.optim.SGD
    # steps, so the trajectory is the reference backend's exactly.
    data = batches(2, seed=1)

    def run(backend):
        torch.manual_seed(0)
        model = small_cnn()
        opt = imbsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, backend=backend, lr=0.05, momentum=0.9)
        for x, y in data:
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.first_step()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.second_step()
        return model, opt

    fake_model, opt = run("fake")
    ref_model, _ = run("reference")
    assert all(torch.equal(a, b) for a, b in zip(fake_model.parameters(), ref_model.parameters()))
    p = next(fake_model.parameters())
    p.grad = torch.zeros_like(p).to_sparse()
    before = p.detach().clone()
    with pytest.raises(ValueError, match="needs dense gradients"):
        opt.first_step()
    assert torch.equal(p, before)


def test_a_backend_that_checks_nothing_gets_the_engines_checks(fake_backend):
    # The reference ops would perturb a complex parameter without a word; the compiled ops
    # refuse it. A record saying checks_inputs=False makes the engine refuse it first.
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    p.grad = torch.randn(4, dtype=torch.complex64)
    before = p.detach().clone()
    opt = imbsam.SAM([p], torch.optim.SGD, rho=0.05, backend="fake", lr=0.1)
    with pytest.raises(TypeError, match="has dtype torch.complex64"):
        opt.first_step()
    assert torch.equal(p, before)


def test_an_unknown_backend_names_the_registry(fake_backend):
    with pytest.raises(ValueError, match="allowed: 'auto', 'fake', 'reference'"):
        backends.check_backend_name("fast")
