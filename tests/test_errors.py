"""Bad input gets a clear error naming the problem and what is allowed; nothing is written."""
from __future__ import annotations

import copy

import pytest
import torch

import imbsam
from imbsam import backends

from models import small_cnn


def params():
    return small_cnn().parameters()


@pytest.mark.parametrize("rho", [-0.1, float("nan"), float("inf")])
def test_bad_rho(rho):
    with pytest.raises(ValueError, match="rho"):
        imbsam.SAM(params(), torch.optim.SGD, rho=rho, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        imbsam.ImbSAM(params(), torch.optim.SGD, rho=rho, lr=0.1)


def test_bad_rho_in_a_param_group():
    model = small_cnn()
    with pytest.raises(ValueError, match="rho"):
        imbsam.SAM([{"params": model.parameters(), "rho": -1.0}], torch.optim.SGD, lr=0.1)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'.*allowed"):
        imbsam.SAM(params(), torch.optim.SGD, backend="fast", lr=0.1)


def test_base_optimizer_must_be_a_class():
    model = small_cnn()
    with pytest.raises(TypeError, match="optimizer class"):
        imbsam.SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="subclass of torch.optim.Optimizer"):
        imbsam.ImbSAM(model.parameters(), dict, lr=0.1)


def test_sparse_gradients():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = imbsam.SAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="sparse|dense gradients"):
        opt.first_step()
    assert torch.equal(emb.weight, before)


def test_mixed_devices():
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(3, device="meta"))
    opt = imbsam.SAM([a, b], torch.optim.SGD, lr=0.1, backend="reference")
    a.grad, b.grad = torch.ones(3), torch.ones(3, device="meta")
    with pytest.raises(ValueError, match="more than one device"):
        opt.first_step()


def test_unsupported_parameter_dtype():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = imbsam.SAM([p], torch.optim.SGD, lr=0.1)
    p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match="complex64.*supported: float32"):
        opt.first_step()


def test_closure_required():
    with pytest.raises(ValueError, match="closure"):
        imbsam.SAM(params(), torch.optim.SGD, lr=0.1).step()
    with pytest.raises(ValueError, match="closure"):
        imbsam.ImbSAM(params(), torch.optim.SGD, lr=0.1).step()


def test_compat_needs_an_optimizer_instance():
    model = small_cnn()
    with pytest.raises(TypeError, match="torch.optim.Optimizer instance"):
        imbsam.compat.SAM(torch.optim.SGD, model, rho=0.05)


def bad_op_calls(ops, device):
    """(error, message, call) for each kind of bad input, on params ``ps`` that a call must not write."""
    ps = [torch.randn(5, device=device), torch.randn(7, device=device)]
    ints = [torch.zeros(3, dtype=torch.int32, device=device)]
    gappy = torch.randn(4, 4, device=device)[:, ::2]
    norm = torch.tensor(1.0, device=device)
    sgd = dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
               first_momentum_step=True)
    return ps, [
        (ValueError, r"grads has 1 tensors but params has 2",
         lambda: ops.restore_sgd_step_(ps, ps[:1], [p.clone() for p in ps], [], [], **sgd)),
        (ValueError, r"momentum_buffers has 1 tensors but params has 2",
         lambda: ops.restore_sgd_step_(ps, ps, [p.clone() for p in ps], [], ps[:1], **{**sgd, "momentum": 0.9})),
        (ValueError, r"momentum is 0 but momentum_buffers were given",
         lambda: ops.restore_sgd_step_(ps, ps, [p.clone() for p in ps], [], ps, **sgd)),
        (ValueError, r"nesterov needs momentum > 0",
         lambda: ops.restore_sgd_step_(ps, ps, [p.clone() for p in ps], [], [], **{**sgd, "nesterov": True})),
        (ValueError, r"found_inf must hold one value",
         lambda: ops.restore_sgd_step_(ps, ps, [p.clone() for p in ps], [], [], **sgd,
                                       found_inf=torch.zeros(2, device=device))),
        (TypeError, r"has dtype (Int|torch\.int32); supported dtypes are",
         lambda: ops.restore_(ints, [t.clone() for t in ints])),
        (TypeError, r"backups\[1\] is (Double|torch\.float64) but params\[1\] is (Float|torch\.float32)",
         lambda: ops.restore_(ps, [ps[0].clone(), ps[1].double()])),
        (ValueError, r"head_grads\[1\] has shape \[?\(?8,?\)?\]? but grads\[1\] has shape",
         lambda: ops.add_head_grads_(ps, [ps[0], torch.randn(8, device=device)])),
        (ValueError, r"is not dense in memory", lambda: ops.restore_([gappy], [gappy.clone()])),
        (ValueError, r"grads\[1\] has shape",
         lambda: ops.perturb_(ps, [ps[0], torch.randn(8, device=device)], [p.clone() for p in ps], norm, 0.05,
                              0.01, False)),
        (ValueError, r"norm must hold one value",
         lambda: ops.perturb_(ps, ps, [p.clone() for p in ps], torch.ones(2, device=device), 0.05, 0.01, False)),
        (ValueError, r"adaptive_grads has 1 tensors but adaptive_params has 2",
         lambda: ops.grad_norm([], ps[:1], ps, 0.01)),
    ]


@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_every_backend_refuses_bad_input_before_it_writes(backend):
    """The reference too: its ops run the checks of the fast backends, with their messages."""
    ops, device = backends.ops_for(backend), backends.home_device(backend)
    ps, cases = bad_op_calls(ops, device)
    before = [p.clone() for p in ps]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
        assert all(torch.equal(p, b) for p, b in zip(ps, before)), message


@pytest.mark.skipif("triton" not in imbsam.available_backends(), reason="needs the triton backend")
def test_triton_ops_name_the_tensor_that_does_not_match():
    from imbsam.backends.triton import ops as triton_ops

    from conftest import device_of

    dev = device_of("triton")
    ps = [torch.randn(5, device=dev), torch.randn(7, device=dev)]
    with pytest.raises(TypeError, match=r"backups\[1\] is torch.float64 but params\[1\] is torch.float32"):
        triton_ops.restore_sgd_step_(ps, ps, [ps[0], ps[1].double()], [], [], 0.1, 0.0, 0.0, 0.0, False, False, True)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(8,\) but params\[1\] has shape \(7,\)"):
        triton_ops.perturb_(ps, [ps[0], torch.randn(8, device=dev)], ps, torch.tensor(1.0, device=dev), 0.05, 0.01,
                            False)
    with pytest.raises(ValueError, match=r"momentum_buffers has 1 tensors but params has 2"):
        triton_ops.restore_sgd_step_(ps, ps, ps, [], ps[:1], 0.1, 0.9, 0.0, 0.0, False, False, True)
    empty, other_strides = torch.empty(0, 3, device=dev), torch.empty(3, 0, device=dev).t()
    assert empty.stride() != other_strides.stride()
    triton_ops.restore_sgd_step_([empty], [other_strides], [empty], [], [], 0.1, 0.0, 0.0, 0.0, False, False, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only where there is no GPU")
def test_triton_interpreter_runs_the_kernels():
    """With this project's pins the interpreter runs the kernels (a failing probe would
    quietly drop every Triton test: this says so instead)."""
    probe = pytest.importorskip("imbsam.backends.triton.probe")
    if probe.IMPORT_ERROR is not None:
        pytest.skip(f"triton did not import: {probe.IMPORT_ERROR}")
    assert probe.interpreter_error() is None, probe.why_unusable()
    assert "triton" in imbsam.available_backends()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only where there is no GPU")
def test_a_broken_triton_interpreter_makes_the_backend_unusable_and_says_why(monkeypatch):
    from imbsam.backends.triton import probe, tables
    if probe.IMPORT_ERROR is not None:
        pytest.skip(f"triton did not import: {probe.IMPORT_ERROR}")

    def broken(*args, **kwargs):
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    monkeypatch.setattr(tables, "launch", broken)
    probe.interpreter_error.cache_clear()
    try:
        assert not probe.usable_on("cpu")
        assert "interpreter fails on the kernels: TypeError: only 0-dimensional" in probe.why_unusable()
    finally:
        probe.interpreter_error.cache_clear()


def _optimizer_and_phases(which: str, model):
    """The optimizer (or paper-style adapter) named ``which`` and its phase methods in order."""
    kw = dict(lr=0.1, momentum=0.9)
    if which.startswith("compat."):
        opt = getattr(imbsam.compat, which[len("compat."):])(torch.optim.SGD(model.parameters(), **kw), model)
    else:
        opt = getattr(imbsam, which)(model.parameters(), torch.optim.SGD, **kw)
    return opt, [opt.first_step, opt.second_step] + ([opt.third_step] if hasattr(opt, "third_step") else [])


def _with_grads(model):
    for p in model.parameters():
        p.grad = torch.randn_like(p)


@pytest.mark.parametrize("which", ["SAM", "ImbSAM", "compat.SAM", "compat.ImbSAM"])
def test_phases_out_of_order_raise_and_write_nothing(which):
    model = small_cnn()
    opt, phases = _optimizer_and_phases(which, model)
    weights = [p.detach().clone() for p in model.parameters()]
    _with_grads(model)
    # The last phase without a perturbation, and (ImbSAM) the perturbation without the head phase.
    with pytest.raises(RuntimeError, match=rf"{phases[-1].__name__}\(\) without {phases[-2].__name__}\(\)"):
        phases[-1]()
    if len(phases) == 3:
        with pytest.raises(RuntimeError, match=r"second_step\(\) without first_step\(\): the head gradients"):
            phases[1]()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert not opt.state_dict()["state"]  # no momentum buffer was made
    # Perturbed: perturbing again (or ImbSAM's head phase) would back up w + e as w.
    for phase in phases[:-1]:
        _with_grads(model)
        phase()
    perturbed = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(p, w) for p, w in zip(perturbed, weights))
    for phase in phases[:-1]:
        _with_grads(model)
        with pytest.raises(RuntimeError, match="still perturbed.*would lose w"):
            phase()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), perturbed))
    # The way out that the message names: abandon_step() restores w exactly, touching no state.
    opt.abandon_step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert not opt.state_dict()["state"]
    opt.abandon_step()  # between steps: nothing to undo
    _with_grads(model)
    phases[0]()  # and the next step may begin


def test_imbsam_closure_must_return_head_and_tail():
    model = small_cnn()
    opt = imbsam.ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(TypeError, match=r"must return \(head_loss, tail_loss\).*returned Tensor"):
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))


def test_head_tail_loss_checks_the_number_of_classes():
    split = imbsam.HeadTailLoss([50, 20, 1])
    with pytest.raises(ValueError, match=r"shape \(batch, 3\).*got \(4, 5\)"):
        split(torch.randn(4, 5), torch.tensor([0, 1, 2, 1]))


@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_a_closure_that_raises_at_the_perturbed_point_leaves_w(kind):
    model = small_cnn()
    cls = imbsam.SAM if kind == "sam" else imbsam.ImbSAM
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    split = imbsam.HeadTailLoss([50, 40, 30, 20, 10, 5, 4, 3, 2, 1])
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:  # the forward at w + e
            raise MemoryError("out of memory at w + e")
        if kind == "imbsam":
            return split(model(x), y)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(MemoryError):
        opt.step(closure)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert not opt.state_dict()["state"]
    opt.step(closure)  # the closure fails only on its second call: this step runs
    assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), weights))


@pytest.mark.parametrize("eta,error", [(float("nan"), ValueError), (-0.01, ValueError), (float("inf"), ValueError),
                                       ("0.01", TypeError), (True, TypeError)])
def test_bad_adaptive_eta(eta, error):
    # NaN used to be accepted: every norm NaN, every step skipped, the model never trained.
    with pytest.raises(error, match="adaptive_eta must be a finite float >= 0|adaptive_eta must be a float"):
        imbsam.SAM(params(), torch.optim.SGD, rho=0.05, adaptive=True, adaptive_eta=eta, lr=0.1)


@pytest.mark.parametrize("adaptive", ["yes", 2, None])
def test_bad_adaptive(adaptive):
    with pytest.raises(TypeError, match="adaptive must be True or False"):
        imbsam.SAM(params(), torch.optim.SGD, rho=0.05, adaptive=adaptive, lr=0.1)
    with pytest.raises(TypeError, match="adaptive must be True or False"):
        imbsam.SAM([{"params": params(), "adaptive": adaptive}], torch.optim.SGD, lr=0.1)


def test_a_group_rho_changed_to_nan_is_refused_before_any_write():
    model = torch.nn.Linear(4, 2)
    opt = imbsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["rho"] = float("nan")
    with pytest.raises(ValueError, match="rho must be a finite float >= 0, got nan"):
        opt.first_step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_imbsam_first_step_twice_is_refused():
    model = torch.nn.Linear(4, 2)
    opt = imbsam.ImbSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.first_step()
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(RuntimeError, match=r"first_step\(\) twice: the head gradients of the first call"):
        opt.first_step()
    opt.abandon_step()
    opt.first_step()  # after abandon_step a step starts afresh


def test_load_state_dict_of_a_plain_sgd_fills_the_defaults():
    model = torch.nn.Linear(4, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    sgd.step()
    opt = imbsam.SAM(model.parameters(), torch.optim.SGD, rho=0.07, lr=0.1, momentum=0.9)
    opt.load_state_dict(sgd.state_dict())  # used to raise KeyError('rho') after loading
    assert opt.param_groups[0]["rho"] == 0.07 and opt.param_groups[0]["adaptive"] is False
    assert torch.equal(opt.state[model.weight]["momentum_buffer"], sgd.state[model.weight]["momentum_buffer"])


def test_load_state_dict_with_a_bad_rho_changes_nothing():
    model = torch.nn.Linear(4, 2)
    opt = imbsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    bad = opt.state_dict()
    bad["param_groups"][0]["rho"] = -1.0
    bad["param_groups"][0]["lr"] = 123.0
    with pytest.raises(ValueError, match="rho must be a finite float >= 0, got -1.0"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["rho"] == 0.05


class TwoParts(torch.nn.Module):
    """Two linear maps on the same input, each in its own param group and dtype."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.a(x.to(self.a.weight.dtype)).square().sum() + self.b(x.to(self.b.weight.dtype)).square().sum()

    def groups(self):
        return [{"params": self.a.parameters()}, {"params": self.b.parameters()}]


def backward(model):
    model.zero_grad(set_to_none=True)
    model(torch.randn(4, 6)).backward()


# The fused backends' ops reject the mismatch; the generic path's check (the next test) too.
@pytest.mark.parametrize("backend", [b for b in imbsam.available_backends() if b != "reference"])
@pytest.mark.parametrize("cls", [imbsam.SAM, imbsam.ImbSAM])
def test_a_rejected_last_phase_leaves_the_step_to_retry_or_abandon(backend, cls):
    model = TwoParts()
    opt = cls(model.groups(), torch.optim.SGD, rho=0.05, backend=backend, lr=0.1, momentum=0.9)
    phases = [opt.first_step, opt.second_step] + ([opt.third_step] if cls is imbsam.ImbSAM else [])
    for phase in phases:  # one full step: the momentum buffers exist, in fp32
        backward(model)
        phase()
    model.b.double()  # the second group's params become fp64; their buffers stay fp32
    w = [p.detach().clone() for p in model.parameters()]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    for phase in phases[:-1]:
        backward(model)
        phase()
    backward(model)
    rejected = r"momentum_buffers\[0\] is (Float|torch.float32) but params\[0\] is (Double|torch.float64)"
    with pytest.raises(TypeError, match=rejected):
        phases[-1]()
    # Neither group stepped (the first one's input was fine), the base state is untouched,
    # and the step can still be abandoned: exactly w again.
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), bufs))
    opt.abandon_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
def test_a_rejected_generic_step_leaves_the_base_state_as_it_was(base):
    """On the generic path (the base optimizer's own step()), torch.optim.Adam used to
    raise only after adding 1 to a parameter's step count (3 after a retry, not 2), and
    torch.optim.SGD added fp64 gradients into fp32 momentum without a word."""
    model = TwoParts()
    kw = dict(lr=0.1, momentum=0.9) if base is torch.optim.SGD else dict(lr=0.1)
    opt = imbsam.SAM(model.groups(), base, rho=0.05, backend="reference", **kw)
    for phase in (opt.first_step, opt.second_step):
        backward(model)
        phase()
    model.b.double()
    before = copy.deepcopy(opt.state_dict()["state"])
    backward(model)
    opt.first_step()
    backward(model)
    with pytest.raises(TypeError, match=r"state '(exp_avg|momentum_buffer)' of a parameter .* is torch.float32 .* "
                                        r"the parameter is torch.float64.*abandon_step"):
        opt.second_step()
    after = opt.state_dict()["state"]
    assert all(torch.equal(before[k][n], after[k][n]) for k in before for n in before[k])
    opt.abandon_step()
    for p in model.b.parameters():  # the way out the message names: the state converted too
        opt.state[p] = {k: v.double() if v.shape == p.shape else v for k, v in opt.state[p].items()}
    for phase in (opt.first_step, opt.second_step):
        backward(model)
        phase()
    if base is torch.optim.Adam:
        assert all(float(opt.state[p]["step"]) == 2 for p in model.parameters())


@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_parameters_on_two_devices_are_refused_before_any_write(backend):
    model = TwoParts()
    model.b.to("meta")
    opt = imbsam.SAM(model.groups(), torch.optim.SGD, rho=0.05, backend=backend, lr=0.1)
    model.a.weight.grad = torch.ones_like(model.a.weight)
    model.b.weight.grad = torch.ones_like(model.b.weight)
    before = model.a.weight.detach().clone()
    with pytest.raises(ValueError, match="parameters are on more than one device .cpu and meta."):
        opt.first_step()
    assert torch.equal(model.a.weight, before)


def _state(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])


def _same(a, b) -> bool:
    (wa, sa), (wb, sb) = a, b
    return all(torch.equal(p, q) for p, q in zip(wa, wb)) and sa.keys() == sb.keys() and all(
        torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])


# Each: the phases called by hand with a backward missing (or undone by zero_grad()); before
# 2026-12-04 each ran, e.g. ImbSAM stepped with 2 g_T + g_H at w (9e-3 off), SAM took no step.
# (which, the calls, the message)
NO_GRADIENT_CASES = {
    "imbsam second_step before the tail backward": (
        "ImbSAM", ["head", "first_step", "second_step"], r"second_step\(\) with no gradients.*tail_loss.backward"),
    "imbsam zero_grad before second_step": (
        "ImbSAM", ["head", "first_step", "tail", "zero_grad", "second_step"], r"second_step\(\) with no gradients"),
    "imbsam third_step without the backward at w + e": (
        "ImbSAM", ["head", "first_step", "tail", "second_step", "third_step"],
        r"third_step\(\) with no gradients.*abandon_step"),
    "imbsam first_step before any backward": ("ImbSAM", ["first_step"], r"first_step\(\) with no gradients"),
    "sam first_step before any backward": ("SAM", ["first_step"], r"first_step\(\) with no gradients.*loss.backward"),
    "sam zero_grad before second_step": (
        "SAM", ["loss", "first_step", "loss", "zero_grad", "second_step"], r"second_step\(\) with no gradients"),
    "sam second_step reading first_step's gradients": (
        "SAM", ["loss", "first_step keeping .grad", "second_step"], r"would read the gradients the phase before"),
    "compat imbsam second_step before the tail backward": (
        "compat.ImbSAM", ["head", "first_step", "second_step"], r"second_step\(\) with no gradients"),
}


@pytest.mark.parametrize("case", list(NO_GRADIENT_CASES))
def test_a_phase_without_fresh_gradients_is_refused_before_it_writes(case):
    which, calls, message = NO_GRADIENT_CASES[case]
    model = small_cnn()
    opt, _ = _optimizer_and_phases(which, model)
    split = imbsam.HeadTailLoss([50, 40, 30, 20, 10, 5, 4, 3, 2, 1])
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8)
    tail = []  # the tail loss of the head's forward, whose graph the head backward keeps

    def head():
        h, t = split(model(x), y)
        h.backward(retain_graph=True)
        tail.append(t)
    do = {"head": head, "tail": lambda: tail.pop().backward(),
          "loss": lambda: torch.nn.functional.cross_entropy(model(x), y).backward(),
          "zero_grad": lambda: opt.zero_grad(),
          "first_step keeping .grad": lambda: opt.first_step(zero_grad=False)}
    for call in calls[:-1]:
        (do.get(call) or getattr(opt, call))()
    before = _state(model, opt)
    with pytest.raises(RuntimeError, match=message):
        getattr(opt, calls[-1])()
    assert _same(before, _state(model, opt))
    opt.abandon_step()
