"""What skips a step: a non-finite head gradient (ImbSAM's g_H), and the flags that hooks
report with ``report_found_inf`` (the optimizer owns the flag, so a hook cannot lose it by
rebinding a name)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import imbsam

from models import batches, small_cnn, step_by_hand

COUNTS = [500, 400, 300, 200, 150, 100, 60, 15, 10, 5]
SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
BACKENDS = imbsam.available_backends()


class PlainSGD(torch.optim.SGD):
    """torch.optim.SGD by another name: the generic (non-fused) step path."""


def build(kind, backend, base=torch.optim.SGD):
    """A model and its optimizer after one step: the momentum buffers exist, so that a
    skipped step and a taken one differ in the weights and the buffers (a skipped first
    step would allocate zero buffers)."""
    torch.manual_seed(0)
    model = small_cnn()
    cls = imbsam.ImbSAM if kind == "imbsam" else imbsam.SAM
    opt = cls(model.parameters(), base, rho=0.05, backend=backend, **SGD_KW)
    (x, y), = batches(1, seed=11)
    run_step(kind, model, opt, x, y)
    return model, opt


def run_step(kind, model, opt, x, y, **kw):
    step_by_hand(kind, model, opt, x, y, COUNTS, **kw)


def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {id(p): s["momentum_buffer"].clone() for p, s in opt.state.items() if "momentum_buffer" in s})


def unchanged(model, opt, snap) -> bool:
    params, bufs = snapshot(model, opt)
    return (all(torch.equal(a, b) for a, b in zip(params, snap[0])) and bufs.keys() == snap[1].keys()
            and all(torch.equal(bufs[k], snap[1][k]) for k in bufs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", [torch.optim.SGD, PlainSGD], ids=["fused_sgd", "generic"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_head_gradient_skips_the_step(backend, base, bad):
    model, opt = build("imbsam", backend, base)
    (x2, y2), = batches(1, seed=3)
    snap = snapshot(model, opt)
    run_step("imbsam", model, opt, x2, y2, poison_head=bad)  # g_T finite, g_H not
    assert unchanged(model, opt, snap), "a non-finite g_H changed the weights or the momentum"
    run_step("imbsam", model, opt, x2, y2)  # the flag does not outlive its step
    assert not unchanged(model, opt, snap)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_head_gradient_flag_is_dropped_by_abandon_step(backend):
    model, opt = build("imbsam", backend)
    (x, y), = batches(1, seed=3)
    head, _ = imbsam.HeadTailLoss(COUNTS)(model(x), y)
    head.backward()
    next(model.parameters()).grad.view(-1)[0] = float("nan")
    opt.first_step()
    opt.abandon_step()
    opt.zero_grad()
    snap = snapshot(model, opt)
    run_step("imbsam", model, opt, x, y)
    assert not unchanged(model, opt, snap)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_fused_step_decides_the_head_gradient_skip_without_a_host_read(monkeypatch):
    # The fused SGD path must not read a flag on the host (a sync per step on a GPU, and
    # no CUDA graph capture): any bool()/item() of a tensor in the last phase fails here.
    model, opt = build("imbsam", "cpp")
    (x, y), = batches(1, seed=3)
    snap = snapshot(model, opt)

    def host_read(*_):
        raise AssertionError("the last phase read a tensor on the host")

    def forbid_host_reads():
        monkeypatch.setattr(torch.Tensor, "__bool__", host_read)
        monkeypatch.setattr(torch.Tensor, "item", host_read)
    run_step("imbsam", model, opt, x, y, poison_head=float("inf"), before_last=forbid_host_reads)
    monkeypatch.undo()
    assert unchanged(model, opt, snap)


def reporting_hook(opt, values):
    """A phase hook that, like an unscale, makes a new flag tensor at each call and reports it."""
    def hook(phase, params, grads):
        if phase == "step":
            for value in values:
                found_inf = torch.tensor(value)  # a new tensor each time: rebinding is harmless
                opt.report_found_inf(found_inf)
    return hook


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
@pytest.mark.parametrize("base", [torch.optim.SGD, PlainSGD], ids=["fused_sgd", "generic"])
@pytest.mark.parametrize("values,skips", [([1.0], True), ([0.0], False), ([0.0, 1.0], True), ([1.0, 0.0], True),
                                          ([float("nan")], True), ([True], True), ([0], False)])
def test_a_flag_reported_by_a_hook_decides_the_step(backend, kind, base, values, skips):
    model, opt = build(kind, backend, base)
    (x2, y2), = batches(1, seed=4)
    handle = opt.register_phase_hook(reporting_hook(opt, values))
    snap = snapshot(model, opt)
    run_step(kind, model, opt, x2, y2)
    assert unchanged(model, opt, snap) == skips
    handle.remove()
    snap = snapshot(model, opt)
    run_step(kind, model, opt, x2, y2)  # the reported flag ended with its step
    assert not unchanged(model, opt, snap)


@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_the_found_inf_argument_is_read_when_passed_and_a_hook_should_report_instead(kind):
    # The trap the argument leaves: a "step" hook that rebinds the name of the flag it was
    # given changes nothing, because the argument was evaluated before the hook ran.
    model, opt = build(kind, "cpp")
    (x, y), = batches(1, seed=4)
    flag = torch.zeros(())

    def rebinding_hook(phase, params, grads):
        nonlocal flag
        if phase == "step":
            flag = torch.ones(())
    opt.register_phase_hook(rebinding_hook)
    snap = snapshot(model, opt)
    run_step(kind, model, opt, x, y, last_kw=dict(found_inf=flag))
    assert not unchanged(model, opt, snap)  # documented: the flag passed was zero
    # The same hook written with report_found_inf skips, however it names its tensors.
    opt2_model, opt2 = build(kind, "cpp")
    opt2.register_phase_hook(reporting_hook(opt2, [1.0]))
    snap = snapshot(opt2_model, opt2)
    run_step(kind, opt2_model, opt2, x, y, last_kw=dict(found_inf=torch.zeros(())))
    assert unchanged(opt2_model, opt2, snap)


def test_a_reported_flag_is_copied_when_reported():
    model, opt = build("sam", "cpp")
    (x, y), = batches(1, seed=4)
    flag = torch.zeros(())
    snap = snapshot(model, opt)
    run_step("sam", model, opt, x, y, before_last=lambda: (opt.report_found_inf(flag), flag.fill_(1)))
    assert not unchanged(model, opt, snap)  # the zero reported, not the one written after


def test_report_found_inf_refuses_what_it_cannot_use():
    model, opt = build("sam", "cpp")
    with pytest.raises(RuntimeError, match="between steps"):
        opt.report_found_inf(torch.ones(()))  # no step in progress: it would skip a later one
    (x, y), = batches(1, seed=4)
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    with pytest.raises(TypeError, match="takes a tensor flag"):
        opt.report_found_inf(1.0)
    with pytest.raises(ValueError, match="one real value"):
        opt.report_found_inf(torch.zeros(2))
    with pytest.raises(ValueError, match="one real value"):
        opt.report_found_inf(torch.zeros((), dtype=torch.complex64))
    snap = snapshot(model, opt)
    opt.report_found_inf(torch.ones(1, dtype=torch.float64))  # one value of any real dtype
    opt.abandon_step()  # drops the flag
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    F.cross_entropy(model(x), y).backward()
    opt.second_step()
    assert not unchanged(model, opt, snap)


def test_a_flag_left_by_a_phase_that_raised_does_not_skip_the_next_step():
    model, opt = build("sam", "cpp")
    (x, y), = batches(1, seed=4)

    def report_then_fail(phase, params, grads):
        opt.report_found_inf(torch.ones(()))
        raise RuntimeError("the hook's collective failed")
    handle = opt.register_phase_hook(report_then_fail)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="collective failed"):
        opt.first_step()
    handle.remove()
    opt.zero_grad()
    snap = snapshot(model, opt)
    run_step("sam", model, opt, x, y)
    assert not unchanged(model, opt, snap)


@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_the_paper_style_adapters_take_reports_too(kind):
    torch.manual_seed(0)
    model = small_cnn()
    base = torch.optim.SGD(model.parameters(), **SGD_KW)
    opt = (imbsam.compat.ImbSAM if kind == "imbsam" else imbsam.compat.SAM)(base, model, rho=0.05, backend="cpp")
    opt.register_phase_hook(reporting_hook(opt, [1.0]))
    (x, y), = batches(1, seed=4)
    before = [p.detach().clone() for p in model.parameters()]
    run_step(kind, model, opt, x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
