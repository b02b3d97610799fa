"""The engine when parameters have gradients in some phases only, when a gradient is laid
out unlike its parameter, and when a parameter's storage is replaced between steps.

Gradients are assigned by hand, so the expected result is exact and independent of the
perturbation: whatever moved must come back bitwise, and the base step must be
torch.optim.SGD's on the combined gradient of each parameter that has one.
"""
from __future__ import annotations

import copy

import pytest
import torch

import imbsam

from conftest import device_of

SGD_KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
NAMES = "abcde"


def make_params(device, dtype=torch.float32, shapes=((3, 4), (5,), (2, 3), (7,), (4, 1))):
    gen = torch.Generator().manual_seed(0)
    return {n: torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=dtype).to(device))
            for n, s in zip(NAMES, shapes)}


def grads_for(params, names, seed):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(params[n].shape, generator=gen, dtype=params[n].dtype).to(params[n].device)
            for n in names}


def assign(params, grads):
    for n, p in params.items():
        p.grad = grads.get(n)


# Phase by phase, which parameters have a gradient: b is reached by the head loss only,
# c is perturbed but gets no gradient at w + e, e has one only at w + e.
IRREGULAR = ("abd", "acd", "ade")  # (head, tail, at w + e)
REGULAR = (NAMES,) * 3


def twins(backend, cls, **kw):
    """The parameters under ``cls`` and a copy under torch.optim.SGD that gets the combined gradients."""
    params = make_params(device_of(backend))
    expected = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    opt = cls(list(params.values()), torch.optim.SGD, rho=0.5, backend=backend, **kw)
    return params, expected, opt, torch.optim.SGD(list(expected.values()), **kw)


def imbsam_step_by_hand(opt, params, seed, perturbed_seen=None, pattern=IRREGULAR):
    head, tail, last = (grads_for(params, names, seed + k) for k, names in enumerate(pattern))
    assign(params, head)
    opt.first_step()
    assert all(p.grad is None for p in params.values())
    assign(params, tail)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt.second_step()
    if perturbed_seen is not None:
        perturbed_seen.append({n for n in params if not torch.equal(params[n], before[n])})
    # What torch.optim.SGD must see: g' + g_H, g_H alone, or g' alone; c none. (Computed
    # first: the step leaves g' + g_H in .grad, written in place.)
    combined = {n: last.get(n, 0) + head.get(n, 0) for n in set(last) | set(head)}
    assign(params, last)
    opt.third_step()
    return combined


@pytest.mark.parametrize("backend", imbsam.available_backends())
@pytest.mark.parametrize("two_groups", [False, True])
def test_gradients_in_some_phases_only(backend, two_groups):
    device = device_of(backend)
    params = make_params(device)
    expected = {n: p.detach().clone().requires_grad_() for n, p in params.items()}

    def groups(ps):
        if not two_groups:
            return list(ps.values())
        return [{"params": [ps[n] for n in "abc"]}, {"params": [ps[n] for n in "de"], "lr": 0.03, "rho": 0.2}]

    opt = imbsam.ImbSAM(groups(params), torch.optim.SGD, rho=0.5, backend=backend, **SGD_KW)
    sgd = torch.optim.SGD(groups(expected), **SGD_KW)
    seen = []
    for step in range(3):  # momentum buffers appear in the first step, then plans are reused
        combined = imbsam_step_by_hand(opt, params, seed=10 * step, perturbed_seen=seen)
        assign(expected, combined)
        sgd.step()
        for n in NAMES:
            assert torch.allclose(params[n], expected[n], rtol=0, atol=1e-6), (step, n)
    assert seen == [set(IRREGULAR[1])] * 3  # only the parameters with a tail gradient were perturbed
    assert torch.equal(params["c"], expected["c"])  # restored bitwise, never stepped
    assert "momentum_buffer" not in opt.state[params["c"]]


@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_regular_and_irregular_steps_alternate(backend):
    """A step where every parameter has a gradient in every phase, then an irregular one, then a regular one."""
    params, expected, opt, sgd = twins(backend, imbsam.ImbSAM, **SGD_KW)
    for step, pattern in enumerate([REGULAR, IRREGULAR, REGULAR]):
        assign(expected, imbsam_step_by_hand(opt, params, seed=10 * step, pattern=pattern))
        sgd.step()
        for n in NAMES:
            assert torch.allclose(params[n], expected[n], rtol=0, atol=1e-6), (step, n)


@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_sam_gradient_gone_at_the_perturbed_point(backend):
    params, expected, opt, sgd = twins(backend, imbsam.SAM, **SGD_KW)
    for step in range(2):
        assign(params, grads_for(params, "abcd", seed=step))
        opt.first_step()
        last = grads_for(params, "abe", seed=100 + step)  # c, d: perturbed, no gradient now; e: new
        assign(params, last)
        opt.second_step()
        assign(expected, last)
        sgd.step()
        for n in NAMES:
            assert torch.allclose(params[n], expected[n], rtol=0, atol=1e-6), (step, n)


@pytest.mark.parametrize("backend", imbsam.available_backends())
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_gradient_laid_out_unlike_its_parameter_is_copied(backend, kind):
    """A channels-last weight with a contiguous gradient: the step equals the one with the gradient in its layout."""
    device = device_of(backend)
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(4, 3, 5, 5, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    results = []
    for layout in (torch.channels_last, torch.contiguous_format):
        w = torch.nn.Parameter(w0.clone(memory_format=torch.channels_last))
        cls = imbsam.SAM if kind == "sam" else imbsam.ImbSAM
        opt = cls([w], torch.optim.SGD, rho=0.5, backend=backend, **SGD_KW)
        for step in range(2):
            phases = [opt.first_step, opt.second_step] + ([opt.third_step] if kind == "imbsam" else [])
            for k, phase in enumerate(phases):
                g = torch.randn(w.shape, generator=torch.Generator().manual_seed(10 * step + k)).to(device)
                w.grad = g.contiguous(memory_format=layout)
                phase()
        assert w.is_contiguous(memory_format=torch.channels_last)
        results.append(w.detach().clone())
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_parameter_storage_replaced_between_steps(backend):
    """model.double() between steps: the backups follow the new dtype, and the step is exact."""
    params, expected, opt, sgd = twins(backend, imbsam.ImbSAM, lr=0.1)
    for step in range(3):
        if step == 1:  # as Module.double() does: same Parameter objects, new storage
            for ps in (params, expected):
                for p in ps.values():
                    p.data = p.data.double()
        assign(expected, imbsam_step_by_hand(opt, params, seed=10 * step))
        sgd.step()
        for n in NAMES:
            assert params[n].dtype == (torch.float64 if step else torch.float32)
            assert torch.allclose(params[n], expected[n], rtol=0, atol=1e-6), (step, n)


@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_sparse_gradient_in_the_last_phase_changes_nothing(backend):
    """An op that rejects its input leaves every weight and buffer as it was before the phase."""
    device = device_of(backend)
    emb = torch.nn.Embedding(10, 4).to(device)
    lin = torch.nn.Linear(4, 2).to(device)
    opt = imbsam.SAM(list(lin.parameters()) + list(emb.parameters()), torch.optim.SGD, rho=0.5, backend=backend,
                     **SGD_KW)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.first_step()
    perturbed = copy.deepcopy([p.detach() for p in opt.param_groups[0]["params"]])
    for p in lin.parameters():
        p.grad = torch.ones_like(p)
    emb.weight.grad = torch.ones_like(emb.weight).to_sparse()
    with pytest.raises(ValueError, match="dense gradients"):
        opt.second_step()
    for p, q in zip(opt.param_groups[0]["params"], perturbed):
        assert torch.equal(p, q)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_a_perturbation_refused_in_a_later_group_puts_the_earlier_ones_back(monkeypatch, adaptive):
    """The groups are perturbed one op at a time: an op that refuses after others have
    written (the last group's here) used to leave those at w + e with the phase idle,
    where abandon_step() restores nothing."""
    params = make_params("cpu")
    groups = [{"params": [params["a"], params["b"]]}, {"params": [params["c"], params["d"]]},
              {"params": [params["e"]]}]
    opt = imbsam.SAM(groups, torch.optim.SGD, rho=0.5, adaptive=adaptive, backend="reference", **SGD_KW)
    w = {n: p.detach().clone() for n, p in params.items()}
    assign(params, grads_for(params, NAMES, 1))
    ops = imbsam.backends.record("reference").ops
    real, calls = ops.perturb_, []

    def perturb_(ps, *args):
        calls.append(len(ps))
        if any(p is params["e"] for p in ps):
            raise RuntimeError("refused")
        return real(ps, *args)
    monkeypatch.setattr(ops, "perturb_", perturb_)
    with pytest.raises(RuntimeError, match="refused"):
        opt.first_step()
    assert len(calls) >= 3  # the earlier groups' ops had run
    assert all(torch.equal(p, w[n]) for n, p in params.items())
    assert opt._engine.phase == "idle"
    monkeypatch.setattr(ops, "perturb_", real)
    opt.first_step()  # the step can begin again
    opt.abandon_step()
    assert all(torch.equal(p, w[n]) for n, p in params.items())
