"""A property-based test (hypothesis, stateful) of the optimizers together with their
helpers, driven as a user's loop drives them: random sequences of whole steps, steps with
an overflow in one phase, steps begun and abandoned, misuse (phases out of order or
without their backward, a second ``use_grad_scaler``, ``scaler.step(optimizer)``,
``scaler.unscale_`` of the user's own before a phase) and ``zero_grad``, under
``use_grad_scaler`` or not, with gradient accumulation over k = 1 or 2 micro-batches (for
ImbSAM by docs/semantics.md's graph-by-graph recipe) and, in a two-rank gloo run, under
DDP with ``sync_data_parallel``. After every action:

* between steps the weights and the momentum equal those of an oracle that took the same
  good steps by hand, in one process, unscaled, on whole batches (to rounding);
* a refused call changed nothing, and leaves no weight perturbed once the user gives the
  step up (``abandon_step()``, as the messages say);
* under DDP the ranks are bitwise equal (compared after the run).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import imbsam

from accumulation_recipes import RECIPES
from ranks import needs_gloo, run_ranks

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,  # noqa: E402
)

COUNTS = [400, 300, 4]  # class 2 is the tail (4 < 400 / 25)
KW = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
SCALE = 2.0 ** 10  # a power of two: scaling is exact, so a scaled step is the unscaled one to rounding
PHASES = {"sam": ("perturb", "step"), "imbsam": ("head", "perturb", "step")}


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def swap(params, other) -> None:
    for i, p in enumerate(params):
        p.grad, other[i] = other[i], p.grad


def phase_methods(opt, kind: str) -> list:
    return [opt.first_step, opt.second_step] + ([opt.third_step] if kind == "imbsam" else [])


class HelperMachine(RuleBasedStateMachine):
    kind = "sam"
    backend = "cpp"
    rank, world = 0, 1  # under DDP: this process's rank, each rank training on its share of a batch

    @initialize(seed=st.integers(0, 2 ** 16), scaled=st.booleans(), micro=st.sampled_from([1, 2]),
                scaler_first=st.booleans(), swapping=st.booleans())
    def build(self, seed, scaled, micro, scaler_first, swapping):
        self.model, self.oracle_model = mlp(seed), mlp(seed)
        cls = imbsam.ImbSAM if self.kind == "imbsam" else imbsam.SAM
        self.opt = cls(self.model.parameters(), torch.optim.SGD, rho=0.1, backend=self.backend, **KW)
        self.oracle = cls(self.oracle_model.parameters(), torch.optim.SGD, rho=0.1, backend=self.backend, **KW)
        self.net = DDP(self.model) if self.world > 1 else self.model
        self.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=10 ** 6) if scaled else None
        if self.scaler is not None and scaler_first:
            imbsam.use_grad_scaler(self.opt, self.scaler)
        if self.world > 1:  # registered after the scaler or before it: either order must work
            imbsam.sync_data_parallel(self.opt, self.net)
        if self.scaler is not None and not scaler_first:
            imbsam.use_grad_scaler(self.opt, self.scaler)
        self.micro, self.split = micro, imbsam.HeadTailLoss(COUNTS)
        # ImbSAM's head phase by the recipe that swaps .grad buffers, or by autograd.grad.
        self.swapping = swapping
        self.gen = torch.Generator().manual_seed(seed)
        self.scale = SCALE
        self.log: list = []  # what each action left, for comparing ranks

    # ---- helpers ----------------------------------------------------------------------
    def batch(self):
        x = torch.randn(8, 5, generator=self.gen)
        y = torch.randint(0, 3, (8,), generator=self.gen)
        return x, y

    def scaled(self, loss):
        return loss if self.scaler is None else self.scaler.scale(loss)

    def mine(self, x, y):
        return x[self.rank::self.world], y[self.rank::self.world]  # DDP averages the ranks' mean losses

    def weights(self, model=None):
        return [p.detach().clone() for p in (model or self.model).parameters()]

    def backward_for(self, phase: str, x, y, overflow: bool = False):
        """The backward a phase reads, over ``self.micro`` micro-batches, scaled if a scaler is in use."""
        params, k = list(self.model.parameters()), self.micro
        bad = float("inf") if overflow else 1.0
        chunks = list(zip(x.chunk(k), y.chunk(k)))
        if self.kind == "sam":
            for xs, ys in chunks:
                self.scaled(F.cross_entropy(self.net(xs), ys) * bad / k).backward()
        elif phase == "head":  # a graph-by-graph recipe: g_T summed aside, g_H into .grad
            self.tail_sums = None if not self.swapping else [None] * len(params)
            for xs, ys in chunks:
                head, tail = self.split(self.net(xs), ys)
                if self.swapping:  # the tail's backward into buffers swapped in as .grad
                    swap(params, self.tail_sums)
                    self.scaled(tail / k).backward(retain_graph=True)
                    swap(params, self.tail_sums)
                else:
                    grads = torch.autograd.grad(self.scaled(tail / k), params, retain_graph=True)
                    self.tail_sums = list(grads) if self.tail_sums is None else [
                        t.add_(g) for t, g in zip(self.tail_sums, grads)]
                self.scaled(head * bad / k).backward()
        elif phase == "perturb":
            for p, g in zip(params, self.tail_sums):
                p.grad = g * bad
        else:
            for xs, ys in chunks:
                self.scaled(self.split(self.net(xs), ys)[1] * bad / k).backward()

    def oracle_step(self, x, y):
        step = RECIPES[self.kind][1]  # k = 1: the whole batch, unscaled, one process
        step(self.oracle_model, list(self.oracle_model.parameters()), self.oracle, self.split, x, y, 1)

    def user_step(self, x, y, overflow_in=None, unscale_before=None):
        for phase, method in zip(PHASES[self.kind], phase_methods(self.opt, self.kind)):
            self.backward_for(phase, x, y, overflow=phase == overflow_in)
            if phase == unscale_before:
                self.scaler.unscale_(self.opt)
            method()
        if self.scaler is not None:
            self.scaler.update()

    def refused(self, call, w: list) -> None:
        """``call`` must raise; once the user gives the step up, the weights are ``w`` exactly."""
        with pytest.raises((RuntimeError, ValueError, TypeError)):
            call()
        self.opt.abandon_step()
        assert all(torch.equal(a, b) for a, b in zip(self.weights(), w))
        self.opt.zero_grad()

    # ---- rules ------------------------------------------------------------------------
    @rule()
    def a_step(self):
        x, y = self.batch()
        self.user_step(*self.mine(x, y))
        self.oracle_step(x, y)

    @precondition(lambda self: self.scaler is not None)
    @rule(data=st.data())
    def a_step_with_the_users_own_unscale(self, data):
        x, y = self.batch()
        self.user_step(*self.mine(x, y), unscale_before=data.draw(st.sampled_from(PHASES[self.kind])))
        self.oracle_step(x, y)

    @precondition(lambda self: self.scaler is not None)
    @rule(data=st.data())
    def a_step_that_overflows(self, data):
        """The scaler skips it (the oracle takes none) and halves the scale."""
        x, y = self.batch()
        w = self.weights()
        self.user_step(*self.mine(x, y), overflow_in=data.draw(st.sampled_from(PHASES[self.kind])))
        assert all(torch.equal(a, b) for a, b in zip(self.weights(), w))
        self.scale /= 2
        assert self.scaler.get_scale() == self.scale

    @rule(data=st.data())
    def a_step_begun_and_abandoned(self, data):
        """With an overflow in one of its phases, or none: nothing of it may reach the next step."""
        x, y = self.mine(*self.batch())
        phases = list(zip(PHASES[self.kind], phase_methods(self.opt, self.kind)))
        begun = phases[:data.draw(st.integers(1, len(phases) - 1))]
        overflow = data.draw(st.sampled_from([None, *(phase for phase, _ in begun)])) if self.scaler else None
        for phase, method in begun:
            self.backward_for(phase, x, y, overflow=phase == overflow)
            method()
        self.opt.abandon_step()
        self.opt.zero_grad()

    @rule(misuse=st.sampled_from(["last phase first", "no backward", "step without a closure",
                                  "second use_grad_scaler"]))
    def a_misuse(self, misuse):
        x, y = self.mine(*self.batch())
        methods, w = phase_methods(self.opt, self.kind), self.weights()
        if misuse == "last phase first":
            self.backward_for(PHASES[self.kind][0], x, y)
            self.refused(methods[-1], w)
        elif misuse == "no backward":
            self.refused(methods[0], w)
        elif misuse == "step without a closure":  # what scaler.step(optimizer) calls
            for phase, method in list(zip(PHASES[self.kind], methods))[:-1]:
                self.backward_for(phase, x, y)
                method()
            self.backward_for("step", x, y)
            self.refused(lambda: self.scaler.step(self.opt) if self.scaler is not None else self.opt.step(), w)
            if self.scaler is not None:
                self.scaler.update()  # once an iteration, as AMP asks
        elif self.scaler is not None:
            self.refused(lambda: imbsam.use_grad_scaler(self.opt, self.scaler), w)

    @rule()
    def zero_grad(self):
        self.opt.zero_grad()

    # ---- invariants -------------------------------------------------------------------
    @invariant()
    def the_weights_are_the_oracles(self):
        if not hasattr(self, "opt"):
            return
        assert self.opt._engine.phase == "idle"  # every rule ends a step, or gives it up
        now, want = self.weights(), self.weights(self.oracle_model)
        self.log.append(now)
        for a, b in zip(now, want):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max().item()
        for p, q in zip(self.model.parameters(), self.oracle_model.parameters()):
            mine = self.opt.state.get(p, {}).get("momentum_buffer")
            theirs = self.oracle.state.get(q, {}).get("momentum_buffer")
            if theirs is None:  # no good step yet; a first step skipped on the device leaves zeros
                assert mine is None or not mine.any()
            else:
                assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-6)


# derandomize: the same sequences on every run and on every rank (the ranks must make the
# same calls in the same order); database=None: no .hypothesis/ folder.
SINGLE = settings(max_examples=15, stateful_step_count=12, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
RANKED = settings(SINGLE, max_examples=5, stateful_step_count=8)


def machine(kind: str, backend: str, rank: int = 0, world: int = 1):
    return type(f"HelperMachine_{kind}_{backend}", (HelperMachine,),
                {"kind": kind, "backend": backend, "rank": rank, "world": world})


BACKENDS = [b for b in ("cpp", "reference") if b in imbsam.available_backends()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_the_optimizer_with_its_helpers_equals_the_oracle(kind, backend):
    run_state_machine_as_test(machine(kind, backend), settings=SINGLE)


def _ranked(rank: int, world: int, path: str, kind: str) -> None:
    cls = machine(kind, BACKENDS[0], rank, world)
    logs = []

    class Logged(cls):
        def teardown(self):
            logs.append(getattr(self, "log", []))
    run_state_machine_as_test(Logged, settings=RANKED)
    torch.save(logs, path)


@needs_gloo
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_under_ddp_the_ranks_take_the_oracles_steps_bitwise_alike(tmp_path, kind):
    logs = [torch.load(p) for p in run_ranks(_ranked, (kind,), str(tmp_path / "machine"))]
    assert len(logs[0]) == len(logs[1]) >= RANKED.max_examples
    for example0, example1 in zip(*logs):
        assert len(example0) == len(example1)
        for w0, w1 in zip(example0, example1):
            assert all(torch.equal(a, b) for a, b in zip(w0, w1))
