"""SAM and ImbSAM with torch.amp.GradScaler through ``imbsam.use_grad_scaler``: a scaled run
is the unscaled run, an overflow in any phase skips the step without touching weights or
momentum and backs the scale off, and the next step is taken (on the CPU: GradScaler("cpu"))."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import imbsam

COUNTS = [400, 200, 100, 10, 5]  # classes 3 and 4 are tail
KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
BACKENDS = [b for b in ("reference", "cpp") if b in imbsam.available_backends()]
SCALE = 2.0 ** 12  # a power of two: scaling and unscaling are exact, the runs equal bit for bit
PHASES = {"sam": ("perturb", "step"), "imbsam": ("head", "perturb", "step")}


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, len(COUNTS)))


def batches(n: int = 3):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, len(COUNTS), (8,), generator=gen)) for _ in range(n)]


def setup(kind: str, backend: str, scaler=None, base=torch.optim.SGD):
    model = mlp()
    cls = imbsam.ImbSAM if kind == "imbsam" else imbsam.SAM
    opt = cls(model.parameters(), base, rho=0.5, backend=backend, **(KW if base is torch.optim.SGD else dict(lr=1e-2)))
    if scaler is not None:
        imbsam.use_grad_scaler(opt, scaler)
    return model, opt


def one_step(kind, model, opt, x, y, scale=lambda loss: loss, overflow_in=None, before=lambda phase: None):
    """One step through the phases, each loss scaled by ``scale``; the backward before
    phase ``overflow_in`` gets an infinite gradient; ``before(phase)`` runs after it."""
    def backward(loss, phase, **kw):
        if phase == overflow_in:
            loss = loss * float("inf")
        scale(loss).backward(**kw)
        before(phase)

    if kind == "imbsam":
        split = imbsam.HeadTailLoss(COUNTS)
        head, tail = split(model(x), y)
        backward(head, "head", retain_graph=True)
        opt.first_step()
        backward(tail, "perturb")
        opt.second_step()
        backward(split(model(x), y)[1], "step")
        opt.third_step()
    else:
        backward(F.cross_entropy(model(x), y), "perturb")
        opt.first_step(zero_grad=True)
        backward(F.cross_entropy(model(x), y), "step")
        opt.second_step(zero_grad=True)


def state(model, opt):
    """The weights, and every tensor of the base optimizer's state (SGD's momentum buffers;
    Adam's step counts and moments)."""
    return ([p.detach().clone() for p in model.parameters()],
            [v.clone() for p in model.parameters() for _, v in sorted(opt.base_optimizer.state[p].items())])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_a_scaled_run_is_the_unscaled_run(kind, backend):
    plain = setup(kind, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
    scaled = setup(kind, backend, scaler)
    for x, y in batches():
        one_step(kind, *plain, x, y)
        one_step(kind, *scaled, x, y, scale=scaler.scale)
        scaler.update()
    for a, b in zip(*(state(*run) for run in (plain, scaled))):
        assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert scaler.get_scale() == SCALE  # no step overflowed, none was skipped


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,phase", [(k, p) for k in PHASES for p in PHASES[k]])
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW], ids=["sgd", "adamw"])
def test_an_overflow_in_any_phase_skips_the_step_and_backs_off(kind, phase, backend, base):
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, backoff_factor=0.5, growth_interval=1000)
    model, opt = setup(kind, backend, scaler, base)
    (x, y), (x2, y2) = batches(2)
    one_step(kind, model, opt, x, y, scale=scaler.scale)  # a step first: the base state exists
    scaler.update()
    before = state(model, opt)
    one_step(kind, model, opt, x2, y2, scale=scaler.scale, overflow_in=phase)
    after = state(model, opt)
    for a, b in zip(before, after):
        assert all(torch.equal(p, q) for p, q in zip(a, b)), f"an overflow in {phase} changed the state"
    scaler.update()
    assert scaler.get_scale() == SCALE / 2
    one_step(kind, model, opt, x2, y2, scale=scaler.scale)  # the next step is taken
    scaler.update()
    assert any(not torch.equal(p, q) for p, q in zip(before[0], state(model, opt)[0]))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_scale_grows_after_a_run_of_good_steps():
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_factor=2.0, growth_interval=2)
    model, opt = setup("imbsam", BACKENDS[-1], scaler)
    for x, y in batches(2):
        one_step("imbsam", model, opt, x, y, scale=scaler.scale)
        scaler.update()
    assert scaler.get_scale() == 2 * SCALE


def test_fp16_autocast_with_a_scaler_trains_close_to_fp32():
    """The whole recipe as a user writes it: fp16 autocast, scaled losses, scaler.update()."""
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.Linear(2, 2)(torch.ones(1, 2))
    except RuntimeError as exc:  # an older torch without fp16 autocast on the CPU
        pytest.skip(f"no fp16 autocast on the CPU here: {exc}")
    fp32 = setup("imbsam", BACKENDS[-1])
    scaler = torch.amp.GradScaler("cpu")
    model, opt = setup("imbsam", BACKENDS[-1], scaler)
    split = imbsam.HeadTailLoss(COUNTS)
    for x, y in batches():
        one_step("imbsam", *fp32, x, y)
        with torch.autocast("cpu", dtype=torch.float16):
            head, tail = split(model(x), y)
        scaler.scale(head).backward(retain_graph=True)
        opt.first_step()
        scaler.scale(tail).backward()
        opt.second_step()
        with torch.autocast("cpu", dtype=torch.float16):
            tail = split(model(x), y)[1]
        scaler.scale(tail).backward()
        opt.third_step()
        scaler.update()
    for p, q in zip(model.parameters(), fp32[0].parameters()):
        assert torch.allclose(p, q, atol=2e-2), (p - q).abs().max().item()


def test_use_grad_scaler_refuses_what_it_cannot_use():
    model, opt = setup("sam", BACKENDS[-1])
    with pytest.raises(TypeError, match="takes a torch.amp.GradScaler"):
        imbsam.use_grad_scaler(opt, object())
    with pytest.raises(TypeError, match="an imbsam optimizer"):
        imbsam.use_grad_scaler(torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu"))


def test_a_step_without_scaler_update_before_it_is_refused_before_it_writes():
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    model, opt = setup("sam", BACKENDS[-1], scaler)
    (x, y), (x2, y2) = batches(2)
    one_step("sam", model, opt, x, y, scale=scaler.scale)  # no scaler.update() after it
    scaler.scale(F.cross_entropy(model(x2), y2)).backward()
    opt.first_step(zero_grad=True)
    scaler.scale(F.cross_entropy(model(x2), y2)).backward()
    perturbed = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="since the last update"):
        opt.second_step(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), perturbed))  # still at w + e
    opt.abandon_step()


def closure_step(kind, model, opt, x, y, scale=lambda loss: loss):
    """One step through ``step(closure)``: ImbSAM's closure returns its losses (the optimizer
    scales them); SAM's calls backward on ``scale(loss)`` itself."""
    split = imbsam.HeadTailLoss(COUNTS)

    def closure():
        if kind == "imbsam":
            return split(model(x), y)
        loss = F.cross_entropy(model(x), y)
        scale(loss).backward()
        return loss
    loss = opt.step(closure)
    opt.zero_grad()  # step(closure) leaves the last gradient in .grad, as torch.optim's do
    return loss


@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_step_with_a_closure_and_a_scaler_is_the_unscaled_step(kind):
    """ImbSAM.step(closure) used to backpropagate unscaled losses that the phases then divided
    by the scale (65536): the weights moved 1e-7 instead of 1e-2."""
    plain = setup(kind, BACKENDS[-1])
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
    scaled = setup(kind, BACKENDS[-1], scaler)
    start = state(*plain)[0]
    for x, y in batches():
        closure_step(kind, *plain, x, y)
        closure_step(kind, *scaled, x, y, scale=scaler.scale)
        scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(state(*plain)[0], state(*scaled)[0]))
    assert max((p - q).abs().max().item() for p, q in zip(state(*plain)[0], start)) > 1e-3


def test_a_sam_closure_that_does_not_scale_its_loss_is_refused_before_it_writes():
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    model, opt = setup("sam", BACKENDS[-1], scaler)
    (x, y), = batches(1)
    before = state(model, opt)
    with pytest.raises(RuntimeError, match=r"no loss was scaled by the scaler.*scaler.scale\(loss\).backward\(\)"):
        closure_step("sam", model, opt, x, y)  # loss.backward(), not scaler.scale(loss).backward()
    assert all(torch.equal(p, q) for a, b in zip(before, state(model, opt)) for p, q in zip(a, b))
    assert opt._engine.phase == "idle"


@pytest.mark.parametrize("kind,phase", [(k, p) for k in PHASES for p in PHASES[k]])
def test_the_users_own_unscale_before_a_phase_is_not_repeated(kind, phase):
    """scaler.unscale_(optimizer) before a phase (to clip, say) used to leave that phase to
    unscale again (g_H 2e-3 off in one step); its inf check joins the step's."""
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, backoff_factor=0.5, growth_interval=1000)
    model, opt = setup(kind, BACKENDS[-1], scaler)
    plain = setup(kind, BACKENDS[-1])

    def unscale(ph):
        if ph == phase:
            scaler.unscale_(opt)
    for x, y in batches():
        one_step(kind, model, opt, x, y, scale=scaler.scale, before=unscale)
        one_step(kind, *plain, x, y)
        scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(state(model, opt)[0], state(*plain)[0]))
    # An overflow that only the user's unscale_ checked still skips the step and backs off.
    (x, y), = batches(1)
    before = state(model, opt)
    one_step(kind, model, opt, x, y, scale=scaler.scale, overflow_in=phase, before=unscale)
    assert all(torch.equal(p, q) for a, b in zip(before, state(model, opt)) for p, q in zip(a, b))
    scaler.update()
    assert scaler.get_scale() == SCALE / 2


def test_use_grad_scaler_twice_on_one_optimizer_is_refused():
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    model, opt = setup("imbsam", BACKENDS[-1], scaler)
    with pytest.raises(RuntimeError, match="already called on this optimizer.*unscale every gradient twice"):
        imbsam.use_grad_scaler(opt, scaler)
    with pytest.raises(RuntimeError, match="already called"):
        imbsam.use_grad_scaler(opt, torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_scaler_step_names_use_grad_scaler_and_leaves_nothing_perturbed(kind):
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    model, opt = setup(kind, BACKENDS[-1])
    (x, y), = batches(1)
    w = state(model, opt)[0]
    if kind == "imbsam":
        head, tail = imbsam.HeadTailLoss(COUNTS)(model(x), y)
        scaler.scale(head).backward(retain_graph=True)
        opt.first_step()
        scaler.scale(tail).backward()
        opt.second_step()
        scaler.scale(imbsam.HeadTailLoss(COUNTS)(model(x), y)[1]).backward()
    else:
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        opt.first_step()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(ValueError, match=r"abandoned \(the weights are back at w\).*use_grad_scaler"):
        scaler.step(opt)
    assert all(torch.equal(p, q) for p, q in zip(state(model, opt)[0], w))
    assert opt._engine.phase == "idle"


def test_found_inf_that_is_not_a_tensor_is_refused_by_name():
    model, opt = setup("sam", BACKENDS[-1])
    (x, y), = batches(1)
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(TypeError, match="found_inf must be a tensor holding one value.*got float 1.0"):
        opt.second_step(found_inf=1.0)
    opt.abandon_step()
