"""Whole-optimizer runs: compiled backends against the reference, state_dict, schedulers."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import imbsam
from imbsam.train.step import make_step

from conftest import fast_backend, max_err
from models import batches, small_cnn, step_by_hand

# Tail classes 7, 8, 9: most batches hold some, and the test data has one batch without.
COUNTS = [500, 400, 300, 200, 150, 100, 60, 15, 10, 5]
SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)


def sam_step(model, opt, x, y):
    make_step("sam", model, opt)(x, y)


def imbsam_step(model, opt, x, y, split):
    make_step("imbsam", model, opt, split)(x, y)


def train(kind, backend, steps=6, base=torch.optim.SGD, base_kw=SGD_KW, data=None, model=None, opt=None):
    model = model or small_cnn()
    split = imbsam.HeadTailLoss(COUNTS)
    if opt is None:
        if kind == "imbsam":
            opt = imbsam.ImbSAM(model.parameters(), base, rho=0.05, backend=backend, **base_kw)
        else:
            opt = imbsam.SAM(model.parameters(), base, rho=0.05, adaptive=(kind == "asam"), backend=backend,
                             **base_kw)
    for x, y in data or batches(steps):
        if kind == "imbsam":
            imbsam_step(model, opt, x, y, split)
        else:
            sam_step(model, opt, x, y)
    return model, opt


def state_tensors(opt):
    return [s["momentum_buffer"] for s in opt.base_optimizer.state.values() if "momentum_buffer" in s]


@fast_backend
@pytest.mark.parametrize("kind", ["sam", "asam", "imbsam"])
def test_trajectory_matches_reference(backend, device, kind):
    ref_model, ref_opt = train(kind, "reference")
    fast_model, fast_opt = train(kind, backend)
    assert max_err(fast_model.parameters(), ref_model.parameters()) < 1e-5
    assert max_err(fast_model.buffers(), ref_model.buffers()) < 1e-5  # BatchNorm statistics
    assert len(state_tensors(fast_opt)) == len(state_tensors(ref_opt)) > 0
    assert max_err(state_tensors(fast_opt), state_tensors(ref_opt)) < 1e-5


@fast_backend
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
@pytest.mark.parametrize("sgd_kw", [dict(lr=0.05, momentum=0.9, nesterov=True),
                                    dict(lr=0.05, momentum=0.5, dampening=0.2, maximize=False),
                                    dict(lr=0.05)], ids=["nesterov", "dampening", "no-momentum"])
def test_trajectory_sgd_options(backend, device, kind, sgd_kw):
    ref_model, _ = train(kind, "reference", base_kw=sgd_kw, steps=4)
    fast_model, _ = train(kind, backend, base_kw=sgd_kw, steps=4)
    assert max_err(fast_model.parameters(), ref_model.parameters()) < 1e-5


@fast_backend
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_non_sgd_base_optimizer(backend, device, kind):
    ref_model, _ = train(kind, "reference", base=torch.optim.AdamW, base_kw=dict(lr=1e-3), steps=4)
    fast_model, _ = train(kind, backend, base=torch.optim.AdamW, base_kw=dict(lr=1e-3), steps=4)
    assert max_err(fast_model.parameters(), ref_model.parameters()) < 1e-5


@fast_backend
def test_bf16_parameters_follow_fp32(backend, device):
    # bf16 weights drift from an fp32 run by rounding; the fused path must drift no more
    # than the reference path does in bf16.
    exact_model, _ = train("imbsam", "reference", steps=3, model=small_cnn().double(),
                           data=[(x.double(), y) for x, y in batches(3)])
    errs = {}
    for b in ("reference", backend):
        m, _ = train("imbsam", b, steps=3, model=small_cnn().bfloat16(),
                     data=[(x.bfloat16(), y) for x, y in batches(3)])
        errs[b] = max_err(m.parameters(), exact_model.parameters())
    assert errs[backend] <= 1.5 * errs["reference"] + 1e-3, errs


@pytest.mark.parametrize("backend", imbsam.available_backends())
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_state_dict_round_trip_continues_identically(backend, kind):
    data = batches(6)
    model, opt = train(kind, backend, data=data[:3])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(kind, backend, data=data[3:], model=model, opt=opt)

    resumed = small_cnn(seed=123)
    resumed.load_state_dict(saved_model)
    cls = imbsam.ImbSAM if kind == "imbsam" else imbsam.SAM
    resumed_opt = cls(resumed.parameters(), torch.optim.SGD, rho=0.05, backend=backend, **SGD_KW)
    resumed_opt.load_state_dict(saved_opt)
    train(kind, backend, data=data[3:], model=resumed, opt=resumed_opt)
    assert max_err(resumed.parameters(), model.parameters()) == 0.0
    assert resumed_opt.param_groups is resumed_opt.base_optimizer.param_groups


@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_lr_scheduler_drives_the_base_step(backend):
    model = small_cnn()
    opt = imbsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, backend=backend, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0 if epoch >= 1 else 1.0)
    (x, y), = batches(1)
    before = [p.clone() for p in model.parameters()]
    sam_step(model, opt, x, y)
    assert max_err(model.parameters(), before) > 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Detected call of `lr_scheduler.step\\(\\)` before")
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.0
    before = [p.clone() for p in model.parameters()]
    sam_step(model, opt, x, y)  # lr 0: the perturbation is undone and the step moves nothing
    assert max_err(model.parameters(), before) == 0.0


@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_parameters_without_gradients_are_untouched(backend):
    model = small_cnn()
    unused = torch.nn.Linear(4, 4).to(next(model.parameters()).device)
    opt = imbsam.ImbSAM(list(model.parameters()) + list(unused.parameters()), torch.optim.SGD, rho=0.05,
                        backend=backend, **SGD_KW)
    before = [p.clone() for p in unused.parameters()]
    train("imbsam", backend, steps=2, model=model, opt=opt)
    assert all(torch.equal(a, b) for a, b in zip(unused.parameters(), before))


@pytest.mark.parametrize("backend", imbsam.available_backends())
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_non_finite_first_gradient_skips_the_step(backend, kind):
    model, opt = train(kind, backend, steps=2)
    params = [p.clone() for p in model.parameters()]
    bufs = [b.clone() for b in state_tensors(opt)]
    (x, y), = batches(1, seed=5)
    x[0, 0, 0, 0] = float("nan")  # poisons the first gradient (and the second)
    split = imbsam.HeadTailLoss(COUNTS)
    if kind == "imbsam":
        imbsam_step(model, opt, x, y, split)
    else:
        sam_step(model, opt, x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    assert all(torch.equal(a, b) for a, b in zip(state_tensors(opt), bufs))


@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_closure_step_equals_phases(backend):
    data = batches(3)
    phased, _ = train("sam", backend, data=data)
    model = small_cnn()
    opt = imbsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, backend=backend, **SGD_KW)
    for x, y in data:
        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)
        assert loss.dim() == 0
        opt.zero_grad()
    assert max_err(model.parameters(), phased.parameters()) == 0.0


@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_imbsam_closure_step_equals_phases(backend):
    data = batches(3)
    phased, _ = train("imbsam", backend, data=data)
    model = small_cnn()
    split = imbsam.HeadTailLoss(COUNTS)
    opt = imbsam.ImbSAM(model.parameters(), torch.optim.SGD, rho=0.05, backend=backend, **SGD_KW)
    for x, y in data:
        opt.step(lambda: split(model(x), y))
        opt.zero_grad()
    assert max_err(model.parameters(), phased.parameters()) == 0.0


@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_memory_buffers(backend):
    model = small_cnn()
    opt = imbsam.ImbSAM(model.parameters(), torch.optim.SGD, rho=0.05, backend=backend, **SGD_KW)
    (x, y), = batches(1)
    split = imbsam.HeadTailLoss(COUNTS)
    head, tail = split(model(x), y)
    head.backward(retain_graph=True)
    grads = {p: p.grad for p in model.parameters()}
    opt.first_step()
    # g_H was handed over, not copied; at most two extra buffers per parameter.
    (ids, held), = opt._engine.head_grads.values()  # one param group
    assert ids == [id(p) for p in grads] and all(h is g for h, g in zip(held, grads.values()))
    assert all(p.grad is None for p in grads)
    tail.backward()
    opt.second_step()
    split(model(x), y)[1].backward()
    opt.third_step()
    assert set(opt._engine.backups) == {id(p) for p in model.parameters()}  # one backup each, kept
    assert not opt._engine.head_grads  # g_H released after the step


@pytest.mark.parametrize("backend", imbsam.available_backends())
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_external_found_inf_skips_the_step(backend, kind):
    model, opt = train(kind, backend, steps=2)
    params, bufs = [p.clone() for p in model.parameters()], [b.clone() for b in state_tensors(opt)]
    (x, y), = batches(1, seed=7)
    # The phases by hand, the last one handed a GradScaler-style flag.
    step_by_hand(kind, model, opt, x, y, COUNTS, last_kw=dict(found_inf=torch.ones(())))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    assert all(torch.equal(a, b) for a, b in zip(state_tensors(opt), bufs))
    with pytest.raises(ValueError, match="found_inf must hold one value"):
        opt._engine.restore_and_step(with_head=False, found_inf=torch.zeros(2))


@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_phase_hooks_run_before_each_phase(backend):
    model = small_cnn()
    opt = imbsam.ImbSAM(model.parameters(), torch.optim.SGD, rho=0.05, backend=backend, **SGD_KW)
    seen = []
    handle = opt.register_phase_hook(lambda phase, ps, gs: seen.append((phase, len(ps), all(
        p.grad is g for p, g in zip(ps, gs)))))
    train("imbsam", backend, steps=1, model=model, opt=opt)
    n = len(list(model.parameters()))
    assert seen == [("head", n, True), ("perturb", n, True), ("step", n, True)]
    handle.remove()
    train("imbsam", backend, steps=1, model=model, opt=opt)
    assert len(seen) == 3


@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_a_phase_hook_can_rewrite_the_gradients(backend):
    # Zeroing the gradients before the perturbation makes e = 0: SAM with rho = 0.
    data = batches(2)
    model = small_cnn()
    opt = imbsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, backend=backend, **SGD_KW)
    opt.register_phase_hook(lambda phase, ps, gs: [g.zero_() for g in gs] if phase == "perturb" else None)
    train("sam", backend, data=data, model=model, opt=opt)
    plain = small_cnn()
    plain_opt = imbsam.SAM(plain.parameters(), torch.optim.SGD, rho=0.0, backend=backend, **SGD_KW)
    train("sam", backend, data=data, model=plain, opt=plain_opt)
    assert max_err(model.parameters(), plain.parameters()) == 0.0


@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_a_skip_is_not_carried_into_the_next_step(backend):
    model, opt = train("sam", backend, steps=1)
    (x, y), = batches(1, seed=8)
    x_bad = x.clone()
    x_bad[0, 0, 0, 0] = float("nan")
    sam_step(model, opt, x_bad, y)  # skipped: the first gradient is not finite
    before = [p.clone() for p in model.parameters()]
    sam_step(model, opt, x, y)  # a finite step: decided by its own norm, not the last one's
    assert max_err(model.parameters(), before) > 0
