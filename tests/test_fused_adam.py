"""SAM / ImbSAM with torch.optim.Adam and AdamW as the base: the fused step (restore +
combine + Adam(W) in one op) against the generic path (restore, combine, then torch's own
step) on every backend; the state stays torch's own, so a state_dict moves between a
fused run and a plain one; what changes the path (a subclass, betas as tensors)."""
from __future__ import annotations

import copy

import pytest
import torch

import imbsam
from imbsam.backends import ops_for

from models import batches, small_cnn, step_by_hand

COUNTS = [500, 400, 300, 200, 150, 100, 60, 15, 10, 5]
BACKENDS = imbsam.available_backends()
TORCH = tuple(int(x) for x in torch.__version__.split(".")[:2])
FUSED = [b for b in BACKENDS if imbsam.backends.record(b).fused_bases]


class PlainAdam(torch.optim.Adam):
    """torch.optim.Adam by another name: the generic (non-fused) step path."""


class PlainAdamW(torch.optim.AdamW):
    """torch.optim.AdamW by another name: the generic step path."""


PLAIN = {torch.optim.Adam: PlainAdam, torch.optim.AdamW: PlainAdamW}


def train(kind, backend, base, steps=4, data=None, model=None, opt_kw=None, state=None, before_step=None):
    torch.manual_seed(0)
    model = model or small_cnn()
    cls = imbsam.ImbSAM if kind == "imbsam" else imbsam.SAM
    opt = cls(model.parameters(), base, rho=0.05, backend=backend,
              **(opt_kw or dict(lr=2e-3, weight_decay=0.05, amsgrad=False)))
    if state is not None:
        opt.load_state_dict(state)
    for i, (x, y) in enumerate(data or batches(steps, seed=3)):
        if before_step is not None:
            before_step(i, model)
        step_by_hand(kind, model, opt, x, y, COUNTS)
    return model, opt


def close(a, b, tol=2e-6):
    return max((x - y).abs().max().item() for x, y in zip(a, b)) <= tol


def weights(model):
    return [p.detach() for p in model.parameters()]


def states(opt):
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    return [s[k] for s in opt.base_optimizer.state.values() for k in keys if k in s]


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of each backend's restore_adam_step_ (the engine looks the op up per call)."""
    calls = []
    for name in FUSED:
        ops = ops_for(name)
        real = ops.restore_adam_step_
        monkeypatch.setattr(ops, "restore_adam_step_", lambda *a, real=real, **k: (calls.append(1), real(*a, **k)))
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
@pytest.mark.parametrize("base", [torch.optim.Adam, torch.optim.AdamW], ids=["adam", "adamw"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
def test_fused_step_follows_the_generic_path(backend, kind, base, amsgrad, spy):
    kw = dict(lr=2e-3, betas=(0.8, 0.99), weight_decay=0.05, amsgrad=amsgrad)
    fused_model, fused = train(kind, backend, base, opt_kw=kw)
    assert len(spy) == (4 if backend in FUSED else 0), "the fused op takes every step"
    plain_model, plain = train(kind, backend, PLAIN[base], opt_kw=kw)
    assert close(weights(fused_model), weights(plain_model))
    assert close(states(fused), states(plain), 1e-6)
    f, p = fused.base_optimizer.state_dict(), plain.base_optimizer.state_dict()
    assert f["param_groups"] == p["param_groups"]
    for i in p["state"]:  # the same keys, dtypes, devices and step counts as torch's own
        assert f["state"][i].keys() == p["state"][i].keys()
        for k, v in p["state"][i].items():
            assert (f["state"][i][k].dtype, f["state"][i][k].device) == (v.dtype, v.device), k
        assert torch.equal(f["state"][i]["step"], p["state"][i]["step"])


@pytest.mark.parametrize("backend", FUSED)
def test_a_fused_state_dict_continues_in_a_plain_run_and_back(backend, spy):
    data = batches(6, seed=4)
    kw = dict(lr=2e-3, weight_decay=0.05, amsgrad=True)
    model, opt = train("imbsam", backend, torch.optim.AdamW, data=data[:3], opt_kw=kw)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = opt.state_dict()
    # The fused run goes on; a plain AdamW (generic path) and a fused one take over from the same files.
    go_on, _ = train("imbsam", backend, torch.optim.AdamW, data=data[3:], model=model, opt_kw=kw, state=None)

    def resumed(base):
        m = small_cnn()
        m.load_state_dict(saved_model)
        # A copy, as a file would give: torch's Adam increments the loaded step tensors in place.
        return train("imbsam", backend, base, data=data[3:], model=m, opt_kw=kw, state=copy.deepcopy(saved))[0]

    # (go_on used a fresh optimizer: only the resumed ones continue the state.)
    plain, fused = resumed(PlainAdamW), resumed(torch.optim.AdamW)
    assert close(weights(plain), weights(fused))
    assert not close(weights(go_on), weights(fused), 1e-5), "the state matters: a fresh one differs"


@pytest.mark.parametrize("backend", FUSED)
def test_a_parameter_without_a_gradient_keeps_its_own_step_count(backend):
    def freeze_first_layer_at_step_1(i, model):
        next(model.parameters()).requires_grad_(i != 1)

    runs = [train("sam", backend, base, steps=3, before_step=freeze_first_layer_at_step_1)
            for base in (torch.optim.Adam, PlainAdam)]
    (fm, fo), (pm, po) = runs
    assert close(weights(fm), weights(pm))
    f_steps = [s["step"].item() for s in fo.base_optimizer.state.values()]
    assert f_steps == [s["step"].item() for s in po.base_optimizer.state.values()]
    assert sorted(set(f_steps)) == [2.0, 3.0]


@pytest.mark.parametrize("backend", FUSED)
def test_a_non_finite_gradient_skips_the_fused_step(backend):
    model, opt = train("sam", backend, torch.optim.AdamW, steps=2)
    before = [w.clone() for w in weights(model)], [s.clone() for s in states(opt)]
    steps = [s["step"].clone() for s in opt.base_optimizer.state.values()]
    (x, y), = batches(1, seed=9)

    def poison():
        next(model.parameters()).grad.view(-1)[0] = float("nan")

    # A NaN in the perturbation gradient: the step is skipped, decided on the device.
    torch.nn.functional.cross_entropy(model(x), y).backward()
    poison()
    opt.first_step()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step()
    assert all(torch.equal(a, b) for a, b in zip(weights(model), before[0]))
    assert all(torch.equal(a, b) for a, b in zip(states(opt), before[1]))
    assert all(torch.equal(s["step"], t) for s, t in zip(opt.base_optimizer.state.values(), steps))


@pytest.mark.parametrize("backend", FUSED)
def test_tensor_lr_and_capturable_steps(backend, spy):
    float_lr = train("sam", backend, torch.optim.Adam, opt_kw=dict(lr=2e-3))
    tensor_lr = train("sam", backend, torch.optim.Adam, opt_kw=dict(lr=torch.tensor(2e-3), capturable=True))
    assert len(spy) == 8
    assert close(weights(float_lr[0]), weights(tensor_lr[0]))
    for s in tensor_lr[1].base_optimizer.state.values():  # capturable: the steps live on the device
        assert s["step"].device == next(tensor_lr[0].parameters()).device


def test_what_keeps_the_generic_path(spy):
    backend = "cpp" if "cpp" in FUSED else pytest.skip("needs a fused backend on the CPU")
    train("sam", backend, PlainAdamW, steps=1)
    if TORCH >= (2, 6):  # betas as tensors came with torch 2.6
        train("sam", backend, torch.optim.Adam, steps=1,
              opt_kw=dict(lr=1e-3, betas=(torch.tensor(0.9), torch.tensor(0.999)), foreach=False))
    assert spy == [], "a subclass, or betas as tensors, take torch's own step"
    train("sam", backend, torch.optim.AdamW, steps=1)
    assert len(spy) == 1


@pytest.mark.parametrize("backend", FUSED)
def test_a_capture_of_a_step_with_cpu_step_counts_is_refused_before_anything_is_written(backend, monkeypatch):
    """A CUDA graph would replay neither the host-side step increment nor the bias corrections
    made from it (torch.optim.Adam refuses the same capture). The capture is stood in for
    here; capturable=True keeps the steps on the device and is let through."""
    from imbsam.optim import _fused_adam

    model = small_cnn()
    opt = imbsam.SAM(model.parameters(), torch.optim.Adam, rho=0.05, backend=backend, lr=2e-3)
    (x, y), = batches(1, seed=3)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step()
    perturbed = [p.detach().clone() for p in model.parameters()]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    monkeypatch.setattr(_fused_adam, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="capturable=True"):
        opt.second_step()
    assert not opt.base_optimizer.state  # the state the step began to create is forgotten
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), perturbed))
    opt.abandon_step()
    capturable = imbsam.SAM(model.parameters(), torch.optim.Adam, rho=0.05, backend=backend, lr=torch.tensor(2e-3),
                            capturable=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    capturable.first_step()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    capturable.second_step()
    assert all(s["step"].item() == 1 for s in capturable.base_optimizer.state.values())
