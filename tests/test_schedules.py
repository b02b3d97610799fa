"""Sharpness schedules (``imbsam.schedules``): a step the schedule sharpens is the optimizer's
SAM / ImbSAM step, any other one the base optimizer's step on the gradient at w, checked
against a loop that applies the rule by hand to an optimizer without a schedule; with the
helpers (GradScaler, DDP), state_dict, hooks and the misuse a loop can make."""
from __future__ import annotations

import copy
import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_accumulation import COUNTS, cnn_without_batchnorm

import imbsam
from imbsam.schedules import AESAM, Bernoulli, Periodic
from imbsam.train.step import make_step

import models
import ranks

KW = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
STEPS = 6
TAIL = (7, 8, 9)  # COUNTS' tail classes


def data(steps=STEPS, seed=3):
    """Batches with tail samples in each (ImbSAM's g_T is never 0)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        y = torch.randint(0, 10, (16,), generator=gen)
        y[[1, 9]] = torch.tensor([8, 9])
        out.append((torch.randn(16, 3, 8, 8, generator=gen).to(models.DEVICE), y.to(models.DEVICE)))
    return out


def squared_norm(params) -> float:
    return math.fsum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None)


class RuleByHand:
    """The schedules' rules written out, for the oracle loop."""

    def __init__(self, kind, total_steps=2):
        self.kind, self.n, self.mean, self.var, self.total = kind, 0, 0.0, 0.0, total_steps

    def before(self) -> bool:
        return self.n % 2 == 0  # Periodic(2)

    def from_gradient(self, s: float) -> bool:  # AE-SAM with the defaults
        self.mean = 0.9 * self.mean + 0.1 * s
        self.var = 0.9 * self.var + 0.1 * (s - self.mean) ** 2
        c = -1.0 + 2.0 * min(self.n / self.total, 1.0)
        return s >= self.mean + c * math.sqrt(self.var)


def oracle(kind, rule, backend):
    """SAM / ImbSAM without a schedule, with the rule applied by hand: its decisions too."""
    model = cnn_without_batchnorm()
    opt = (imbsam.SAM if kind == "sam" else imbsam.ImbSAM)(model.parameters(), torch.optim.SGD, rho=0.1,
                                                            backend=backend, **KW)
    split, decisions = imbsam.HeadTailLoss(COUNTS), []
    params = list(model.parameters())
    for x, y in data():
        if kind == "sam":
            F.cross_entropy(model(x), y).backward()
            sharpen = rule.before() if rule.kind == "periodic" else rule.from_gradient(squared_norm(params))
            if sharpen:
                opt.first_step()
                F.cross_entropy(model(x), y).backward()
                opt.second_step()
            else:
                opt.base_optimizer.step()
        else:
            head, tail = split(model(x), y)
            if rule.kind == "periodic" and not rule.before():
                sharpen = False
                (head + tail).backward()
                opt.base_optimizer.step()
            else:
                head.backward(retain_graph=True)
                heads = [p.grad.clone() for p in params]
                opt.first_step()
                tail.backward()
                sharpen = rule.before() if rule.kind == "periodic" else rule.from_gradient(squared_norm(params))
                if sharpen:
                    opt.second_step()
                    split(model(x), y)[1].backward()
                    opt.third_step()
                else:
                    opt.abandon_step()  # drops the set-aside g_H: the base step on g_H + g_T by hand
                    for p, h in zip(params, heads):
                        p.grad = p.grad + h
                    opt.base_optimizer.step()
        opt.zero_grad()
        rule.n += 1
        decisions.append(sharpen)
    return model, opt, decisions


def scheduled(kind, schedule, backend, style):
    """The same training through a scheduled optimizer, in one of a loop's styles."""
    model = cnn_without_batchnorm()
    opt = (imbsam.SAM if kind == "sam" else imbsam.ImbSAM)(model.parameters(), torch.optim.SGD, rho=0.1,
                                                            backend=backend, schedule=schedule, **KW)
    split, decisions = imbsam.HeadTailLoss(COUNTS), []
    for x, y in data():
        before = schedule.steps
        if style == "closure":
            if kind == "sam":
                def closure():
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss
                opt.step(closure)
            else:
                opt.step(lambda: split(model(x), y))
            opt.zero_grad()
            decisions.append(None)
        elif style == "trainer":
            step = make_step(kind, model, opt, split)
            step(x, y)
            decisions.append(None)
        else:  # the phases, the perturbation phase returning whether it sharpened
            if kind == "sam":
                F.cross_entropy(model(x), y).backward()
                sharpened = opt.first_step()
                if sharpened:
                    F.cross_entropy(model(x), y).backward()
                    opt.second_step()
            else:
                head, tail = split(model(x), y)
                head.backward(retain_graph=True)
                opt.first_step()
                tail.backward()
                sharpened = opt.second_step()
                if sharpened:
                    split(model(x), y)[1].backward()
                    opt.third_step()
            decisions.append(sharpened)
        assert schedule.steps == before + 1 and opt._engine.phase == "idle"
    return model, opt, decisions


def assert_same_training(a, b, tol=1e-6):
    (ma, oa), (mb, ob) = a, b
    for p, q in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)
        torch.testing.assert_close(oa.state[p]["momentum_buffer"], ob.state[q]["momentum_buffer"], rtol=tol, atol=tol)


@pytest.mark.parametrize("style", ["phases", "closure", "trainer"])
@pytest.mark.parametrize("rule", ["periodic", "aesam"])
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_a_scheduled_run_takes_sam_steps_where_the_rule_says_and_base_steps_elsewhere(backend, kind, rule, style):
    expected_model, expected_opt, expected = oracle(kind, RuleByHand(rule), backend)
    assert any(expected) and not all(expected)  # both kinds of step occur
    schedule = Periodic(2) if rule == "periodic" else AESAM(total_steps=2)
    model, opt, decisions = scheduled(kind, schedule, backend, style)
    if style == "phases":
        assert decisions == expected
    assert opt.schedule.sharpened == sum(expected) and opt.schedule.steps == STEPS
    assert_same_training((model, opt), (expected_model, expected_opt))
    start = cnn_without_batchnorm()
    assert all((p - q).abs().max() > 1e-4 for p, q in zip(model.parameters(), start.parameters()))


@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_accumulated_micro_batches_decide_and_step_as_the_whole_batch(backend):
    """AE-SAM reads the gradient the perturbation phase reads: the accumulated one."""
    runs = []
    for k in (1, 2):
        model = cnn_without_batchnorm()
        opt = imbsam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, backend=backend,
                         schedule=AESAM(total_steps=2), **KW)
        for x, y in data():
            micro = list(zip(x.chunk(k), y.chunk(k)))
            for xs, ys in micro:
                (F.cross_entropy(model(xs), ys) / k).backward()
            if opt.first_step():
                for xs, ys in micro:
                    (F.cross_entropy(model(xs), ys) / k).backward()
                opt.second_step()
            opt.zero_grad()
        runs.append((model, opt))
    assert runs[0][1].schedule.sharpened == runs[1][1].schedule.sharpened < STEPS
    assert_same_training(*runs)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_imbsams_plain_step_by_hand_after_its_head_phase_steps_with_head_plus_tail(backend, base, monkeypatch):
    """plain_step() after first_step() adds the set-aside g_H to the tail's gradient, as one
    backward of head + tail gives it; on a backend with the fused base step, through the fused
    op (its weights read from themselves in place of a backup), once a step."""
    record = imbsam.backends.record(backend)
    op_name = "restore_sgd_step_" if base == "sgd" else "restore_adam_step_"
    calls = []
    if record.fused_bases:
        real = getattr(record.ops, op_name)
        monkeypatch.setattr(record.ops, op_name, lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    optimizer, kw = (torch.optim.SGD, KW) if base == "sgd" else (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.05))
    results = []
    for by_phases in (True, False):
        model = cnn_without_batchnorm()
        opt = imbsam.ImbSAM(model.parameters(), optimizer, rho=0.1, backend=backend, **kw)
        split = imbsam.HeadTailLoss(COUNTS)
        for x, y in data(3):
            head, tail = split(model(x), y)
            if by_phases:
                head.backward(retain_graph=True)
                opt.first_step()
                tail.backward()
            else:
                (head + tail).backward()
            opt.plain_step()
        results.append((model, opt))
    (ma, oa), (mb, ob) = results
    state = "momentum_buffer" if base == "sgd" else "exp_avg_sq"
    for p, q in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(oa.state[p][state], ob.state[q][state], rtol=1e-6, atol=1e-6)
    assert len(calls) == (6 if record.fused_bases else 0)  # two runs of three steps


def test_periodic_and_bernoulli_decide_on_the_host_from_the_step_count_and_seed():
    periodic = Periodic(3)
    seen = []
    for _ in range(7):
        seen.append(periodic.sharpens())
        periodic.step_taken(True)
    assert seen == [True, False, False, True, False, False, True]

    def draws(schedule, n=4000):
        out = []
        for _ in range(n):
            out.append(schedule.sharpens())
            schedule.step_taken(True)
        return out

    a = draws(Bernoulli(0.3, seed=5))
    random.seed(123)
    torch.manual_seed(123)  # global random state is not read
    assert draws(Bernoulli(0.3, seed=5)) == a
    assert draws(Bernoulli(0.3, seed=6)) != a
    assert abs(sum(a) / len(a) - 0.3) < 0.03
    assert not any(draws(Bernoulli(0.0), 200)) and all(draws(Bernoulli(1.0), 200))
    one = Bernoulli(0.5, seed=1)
    assert one.sharpens() == one.sharpens()  # asking twice within a step gives one decision


def test_aesam_decides_by_its_rule_on_the_norms_it_is_given():
    """The statistics take the step's own squared norm before the comparison; c rises from -1
    to 1 over total_steps (norms chosen so that the other order would decide otherwise)."""
    norms = [2.8, 2.8, 0.7, 1.8, 2.8, 3.0, 1.6, 2.7, 2.6, 2.7]
    schedule, by_hand, decisions = AESAM(total_steps=8), RuleByHand("aesam", total_steps=8), []
    for norm in norms:
        decisions.append(schedule.decide(torch.tensor(norm), None))
        assert decisions[-1] == by_hand.from_gradient(norm ** 2), len(decisions)
        schedule.step_taken(True)
        by_hand.n += 1
    assert any(decisions) and not all(decisions)


def test_aesam_skips_a_non_finite_norm_in_its_statistics_and_sharpens_it():
    schedule = AESAM(total_steps=10)
    assert schedule.decide(torch.tensor(2.0), None)  # mean 0.4, var 0.1 * 3.6^2 = 1.296: 4 >= 0.4 - 1.14
    mean, var = schedule.mean.clone(), schedule.var.clone()
    torch.testing.assert_close(mean, torch.tensor(0.4, dtype=torch.float64))
    torch.testing.assert_close(var, torch.tensor(0.1 * 3.6 ** 2, dtype=torch.float64))
    assert schedule.decide(torch.tensor(float("inf")), None)
    assert schedule.decide(torch.tensor(1.0), torch.tensor(1.0))  # a hook reported an inf
    assert torch.equal(schedule.mean, mean) and torch.equal(schedule.var, var)


@pytest.mark.parametrize("bad,error,says", [
    (lambda: Periodic(0), ValueError, "k must be an int >= 1"), (lambda: Periodic(2.0), TypeError, "k must be an int"),
    (lambda: Bernoulli(1.5), ValueError, r"p must be in \[0.0, 1.0\]"),
    (lambda: Bernoulli(float("nan")), ValueError, "p must be in"),
    (lambda: Bernoulli(0.5, seed=-1), ValueError, "seed"),
    (lambda: AESAM(0), ValueError, "total_steps"), (lambda: AESAM(10, delta=1.0), ValueError, "delta must be < 1"),
    (lambda: AESAM(10, delta=0.0), ValueError, "delta"), (lambda: AESAM(10, c_end=float("inf")), ValueError, "c_end"),
])
def test_schedule_arguments_are_checked(bad, error, says):
    with pytest.raises(error, match=says):
        bad()


def test_a_schedule_serves_one_optimizer_and_must_be_a_schedule():
    schedule = Periodic(2)
    imbsam.SAM(cnn_without_batchnorm().parameters(), torch.optim.SGD, schedule=schedule, lr=0.1)
    with pytest.raises(ValueError, match="already belongs to an optimizer"):
        imbsam.ImbSAM(cnn_without_batchnorm().parameters(), torch.optim.SGD, schedule=schedule, lr=0.1)
    with pytest.raises(TypeError, match="imbsam.schedules.Periodic"):
        imbsam.SAM(cnn_without_batchnorm().parameters(), torch.optim.SGD, schedule=2, lr=0.1)


@pytest.mark.parametrize("make", [lambda: Bernoulli(0.5, seed=3), lambda: AESAM(total_steps=2)])
def test_state_dict_and_deepcopy_carry_the_schedule_so_a_resumed_run_sharpens_the_same_steps(make):
    def build(model):
        return imbsam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, backend="reference", schedule=make(), **KW)

    def train(model, opt, batches):
        decisions = []
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
            if opt.first_step():
                F.cross_entropy(model(x), y).backward()
                opt.second_step()
            decisions.append(opt.schedule.steps)
        return decisions

    batches = data()
    straight = cnn_without_batchnorm()
    straight_opt = build(straight)
    train(straight, straight_opt, batches)

    first = cnn_without_batchnorm()
    first_opt = build(first)
    train(first, first_opt, batches[:3])
    saved = copy.deepcopy(first_opt.state_dict())
    copied_model, copied_opt = copy.deepcopy((first, first_opt))
    assert copied_opt.schedule.steps == 3 and copied_opt.schedule is not first_opt.schedule
    resumed = cnn_without_batchnorm()
    resumed.load_state_dict(first.state_dict())
    resumed_opt = build(resumed)
    resumed_opt.load_state_dict(saved)
    train(resumed, resumed_opt, batches[3:])
    train(copied_model, copied_opt, batches[3:])
    for p, q, r in zip(straight.parameters(), resumed.parameters(), copied_model.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)


def test_a_schedules_state_goes_only_into_the_same_schedule_before_anything_loads():
    model = cnn_without_batchnorm()
    opt = imbsam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, schedule=Periodic(2), **KW)
    x, y = data(1)[0]
    F.cross_entropy(model(x), y).backward()
    assert opt.first_step()  # Periodic sharpens step 0
    F.cross_entropy(model(x), y).backward()
    opt.second_step()
    state = opt.state_dict()
    assert state["imbsam_sharpness_schedule"] == {"kind": "Periodic", "settings": {"k": 2}, "steps": 1,
                                                  "sharpened": 1}
    for other, says in ((Periodic(3), "settings"), (Bernoulli(0.5), "'Periodic'"), (None, "has none")):
        fresh = imbsam.SAM(cnn_without_batchnorm().parameters(), torch.optim.SGD, rho=0.1, schedule=other, **KW)
        with pytest.raises(ValueError, match=says):
            fresh.load_state_dict(state)
        assert not fresh.state and (other is None or other.steps == 0)
    plain = torch.optim.SGD(cnn_without_batchnorm().parameters(), **KW).state_dict()
    fresh = imbsam.SAM(cnn_without_batchnorm().parameters(), torch.optim.SGD, rho=0.1, schedule=Periodic(2), **KW)
    fresh.load_state_dict(plain)  # a plain base optimizer's state dict: the schedule keeps its own
    assert fresh.schedule.steps == 0


@pytest.mark.parametrize("rule", ["periodic", "aesam"])
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_with_a_grad_scaler_a_scheduled_run_equals_the_unscaled_one_and_the_scaler_updates(kind, rule):
    """A power-of-two scale unscales exactly: the same decisions and weights bit for bit;
    scaler.update() after every step, plain ones included."""
    def run(scaled):
        model = cnn_without_batchnorm()
        schedule = Periodic(2) if rule == "periodic" else AESAM(total_steps=2)
        opt = (imbsam.SAM if kind == "sam" else imbsam.ImbSAM)(model.parameters(), torch.optim.SGD, rho=0.1,
                                                                backend="cpp", schedule=schedule, **KW)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
        if scaled:
            imbsam.use_grad_scaler(opt, scaler)
        scale = scaler.scale if scaled else (lambda loss: loss)
        split = imbsam.HeadTailLoss(COUNTS)
        for x, y in data():
            if kind == "sam":
                scale(F.cross_entropy(model(x), y)).backward()
                if opt.first_step():
                    scale(F.cross_entropy(model(x), y)).backward()
                    opt.second_step()
            elif rule == "periodic" and not opt.sharpens():
                head, tail = split(model(x), y)
                scale(head + tail).backward()
                opt.plain_step()
            else:
                head, tail = split(model(x), y)
                scale(head).backward(retain_graph=True)
                opt.first_step()
                scale(tail).backward()
                if opt.second_step():
                    scale(split(model(x), y)[1]).backward()
                    opt.third_step()
            if scaled:
                scaler.update()
        return model, opt, scaler

    a, b = run(False), run(True)
    for p, q in zip(a[0].parameters(), b[0].parameters()):
        assert torch.equal(p, q)
    assert b[2].get_scale() == 2.0 ** 10


def test_an_overflow_in_a_plain_step_skips_it_and_backs_the_scaler_off():
    model = cnn_without_batchnorm()
    opt = imbsam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, backend="cpp", schedule=Periodic(2), **KW)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    imbsam.use_grad_scaler(opt, scaler)
    (x, y), (x2, y2) = data(2)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    assert opt.first_step()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    opt.second_step()
    scaler.update()
    w = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    scaler.scale(F.cross_entropy(model(x2), y2)).backward()
    next(model.parameters()).grad.view(-1)[0] = float("inf")
    assert not opt.first_step()  # step 1: plain, skipped
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 9 and opt.schedule.steps == 2
    for p, w0, m0 in zip(model.parameters(), w, momentum):
        assert torch.equal(p, w0) and torch.equal(opt.state[p]["momentum_buffer"], m0)


def test_plain_steps_fire_the_step_hooks_and_count_for_lr_schedulers():
    model = cnn_without_batchnorm()
    opt = imbsam.ImbSAM(model.parameters(), torch.optim.SGD, rho=0.1, schedule=Periodic(2), **KW)
    fired, base_fired = [], []
    opt.register_step_post_hook(lambda *a: fired.append(1))
    opt.base_optimizer.register_step_post_hook(lambda *a: base_fired.append(1))
    lr_schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    step = make_step("imbsam", model, opt, imbsam.HeadTailLoss(COUNTS))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*")
        for x, y in data(4):
            step(x, y)
            lr_schedule.step()
    assert len(fired) == len(base_fired) == 4
    assert opt.param_groups[0]["lr"] == pytest.approx(KW["lr"] / 16)


def test_misuse_is_refused_before_anything_is_written():
    model = cnn_without_batchnorm()
    opt = imbsam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, schedule=AESAM(total_steps=4), **KW)
    with pytest.raises(TypeError, match="decides from the step's perturbation gradient"):
        opt.sharpens()
    x, y = data(1)[0]
    F.cross_entropy(model(x), y).backward()
    assert opt.first_step()  # AE-SAM's first step sharpens (its threshold starts below the mean)
    w = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="plain_step\\(\\) while the weights are perturbed"):
        opt.plain_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    opt.abandon_step()
    # A loop that ignores first_step()'s False and goes on to second_step() is stopped there.
    periodic = imbsam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, schedule=Periodic(2), **KW)
    periodic.schedule.steps = 1
    F.cross_entropy(model(x), y).backward()
    assert not periodic.first_step()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="second_step\\(\\) without first_step\\(\\)"):
        periodic.second_step()
    with pytest.raises(RuntimeError, match="plain_step\\(\\) with no gradients"):
        periodic.zero_grad()
        periodic.plain_step()


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"), reason="compile_step needs it")
def test_compile_step_refuses_a_schedule_by_name():
    model = cnn_without_batchnorm()
    opt = imbsam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, backend="cpp", schedule=Periodic(1), **KW)

    def step(x, y):
        F.cross_entropy(model(x), y).backward()
        opt.first_step()
        F.cross_entropy(model(x), y).backward()
        opt.second_step()

    w = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(Exception, match="sharpness schedule"):
        imbsam.compile_step(step, backend="aot_eager")(*data(1)[0])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))


# ---- DDP: two gloo ranks on half batches take the step one process takes ----------------

def _ddp_rank(rank, world, path, kind, rule):
    import torch.nn.parallel as parallel

    from imbsam.optim.data_parallel import sync_data_parallel
    model = ranks.mlp()
    schedule = Periodic(2) if rule == "periodic" else AESAM(total_steps=1)
    opt = (imbsam.SAM if kind == "sam" else imbsam.ImbSAM)(model.parameters(), torch.optim.SGD, rho=0.1,
                                                            backend="cpp", schedule=schedule, **ranks.KW)
    net = parallel.DistributedDataParallel(model)
    sync_data_parallel(opt, net)
    step = make_step(kind, net, opt, imbsam.HeadTailLoss(ranks.COUNTS))
    for x, y in ranks.batches():
        half = x.shape[0] // world
        step(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
    torch.save([p.detach() for p in model.parameters()], path)


@ranks.needs_gloo
@pytest.mark.parametrize("kind,rule", [("sam", "aesam"), ("imbsam", "periodic"), ("imbsam", "aesam")])
def test_under_ddp_the_ranks_decide_alike_and_take_the_one_process_step(tmp_path, kind, rule):
    paths = ranks.run_ranks(_ddp_rank, (kind, rule), str(tmp_path / "w"))
    per_rank = [torch.load(p) for p in paths]
    model = ranks.mlp()
    schedule = Periodic(2) if rule == "periodic" else AESAM(total_steps=1)
    opt = (imbsam.SAM if kind == "sam" else imbsam.ImbSAM)(model.parameters(), torch.optim.SGD, rho=0.1,
                                                            backend="cpp", schedule=schedule, **ranks.KW)
    step = make_step(kind, model, opt, imbsam.HeadTailLoss(ranks.COUNTS))
    for x, y in ranks.batches():
        step(x, y)
    for a, b, p in zip(*per_rank, model.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, p.detach(), rtol=1e-6, atol=1e-6)


def test_a_gradient_rule_with_a_local_perturbation_is_refused():
    class FakeDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self):  # no process group needed to reach the check
            torch.nn.Module.__init__(self)

    model = cnn_without_batchnorm()
    opt = imbsam.SAM(model.parameters(), torch.optim.SGD, schedule=AESAM(total_steps=4), lr=0.1)
    with pytest.raises(ValueError, match="would differ between the ranks"):
        imbsam.sync_data_parallel(opt, FakeDDP(), perturbation="local")
