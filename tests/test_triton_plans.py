"""The Triton backend's host side (on the CPU, under Triton's interpreter): eager calls
skip the custom-op dispatcher but tracing still goes through the op; each set of tensors
is validated once, when its plan is built, and any change to what a launch reads (an
address, a parameter's dtype or size) builds and validates a new plan."""
from __future__ import annotations

import pytest
import torch

from imbsam.backends import checks as input_checks
from imbsam.backends.triton import ops as triton_ops
from imbsam.backends.triton import probe, tables

pytestmark = pytest.mark.skipif(not probe.usable_on("cpu") and not torch.cuda.is_available(),
                                reason=f"triton unusable here: {probe.why_unusable()}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def checks(monkeypatch):
    """Counts the list validations the ops run, from an empty plan cache (new tensors may
    sit at the addresses of earlier tests' freed ones, whose plans would be found)."""
    monkeypatch.setattr(tables, "PLANS", {})
    count = [0]
    real = input_checks.check_list

    def counted(*args):
        count[0] += 1
        return real(*args)

    monkeypatch.setattr(input_checks, "check_list", counted)
    return count


def fresh(n=5, size=33):
    return [torch.randn(size, device=DEVICE) for _ in range(n)]


def test_eager_calls_skip_the_dispatcher(monkeypatch):
    def refuse(*args):
        raise AssertionError("an eager call went through the custom op")

    monkeypatch.setattr(torch.ops.imbsam, "triton_restore_", refuse)
    a, b = fresh(), fresh()
    triton_ops.restore_(a, b)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_tracing_goes_through_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a, b = [torch.empty(8, device=DEVICE)], [torch.empty(8, device=DEVICE)]
        triton_ops.restore_(a, b)  # FakeTensors: the op's fake kernel, no launch
        norm = triton_ops.grad_norm(a, [], [], 0.0)
    assert norm.shape == () and norm.dtype == torch.float32


def test_a_set_of_tensors_ischecksd_once(checks):
    a, b = fresh(), fresh()
    triton_ops.restore_(a, b)
    triton_ops.restore_(a, b)
    triton_ops.restore_(a, b)
    assert checks[0] == 1
    c = fresh()
    triton_ops.restore_(c, b)  # other tensors: another plan, checked
    assert checks[0] == 2


def test_a_changed_dtype_at_the_same_address_is_checked_again(checks):
    a, b = fresh(1), fresh(1)
    triton_ops.restore_(a, b)
    same_memory = [a[0].view(torch.int32)]  # same address and size, another dtype
    with pytest.raises(TypeError, match="imbsam.restore_: params\\[0\\] has dtype torch.int32"):
        triton_ops.restore_(same_memory, [b[0].view(torch.int32)])
    assert checks[0] == 2


def test_a_gradient_laid_out_unlike_before_at_the_same_address_is_checked_again(checks):
    """A new gradient often lands at a freed one's address: one laid out unlike its
    parameter there must be refused (the engine then copies it into the parameter's
    layout), not walked with the old plan as if it were laid out like it."""
    params = [torch.randn(4, 5), torch.randn(3)]
    memory = torch.randn(20)
    grads, heads = [memory.view(4, 5), torch.randn(3)], [p.clone() for p in params]
    triton_ops.add_head_grads_(grads, heads)  # a plan for these addresses
    transposed = [memory.as_strided((4, 5), (1, 4)), grads[1]]  # the same address, other strides
    before = memory.clone()
    with pytest.raises(ValueError, match="head_grads\\[0\\] has strides \\(5, 1\\) but grads\\[0\\] has strides"):
        triton_ops.add_head_grads_(transposed, heads)
    assert torch.equal(memory, before) and checks[0] == 2


def test_a_rejected_call_writes_nothing_and_caches_nothing():
    a, b = fresh(2), fresh(2)
    bad = [b[0], b[1].double()]
    before = [t.clone() for t in a]
    n_plans = len(tables.PLANS)
    with pytest.raises(TypeError, match="backups\\[1\\] is torch.float64 but params\\[1\\] is torch.float32"):
        triton_ops.restore_(a, bad)
    assert all(torch.equal(x, y) for x, y in zip(a, before))
    assert len(tables.PLANS) == n_plans
