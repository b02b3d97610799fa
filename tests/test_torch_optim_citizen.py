"""SAM and ImbSAM as torch.optim citizens: copied, pickled and saved whole (between
steps), and torch.optim's step hooks fire once per full step, whether the phases are
called by hand or by step(closure)."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import imbsam


def model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def make(cls, m):
    return cls(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)


def phases(opt):
    return ([opt.first_step, opt.second_step] if isinstance(opt, imbsam.SAM)
            else [opt.first_step, opt.second_step, opt.third_step])


def full_step(m, opt, x, y):
    for phase in phases(opt):
        torch.nn.functional.cross_entropy(m(x), y).backward()
        phase()


def data(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)


@pytest.mark.parametrize("cls", [imbsam.SAM, imbsam.ImbSAM])
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copy_takes_the_same_steps(cls, how):
    m = model()
    opt = make(cls, m)
    full_step(m, opt, *data(1))  # momentum buffers exist
    both = copy.deepcopy({"m": m, "opt": opt})  # params and optimizer copied together, as users do
    if how == "pickle":
        both = pickle.loads(pickle.dumps({"m": m, "opt": opt}))
    elif how == "torch.save":
        buf = io.BytesIO()
        torch.save({"m": m, "opt": opt}, buf)
        buf.seek(0)
        both = torch.load(buf, weights_only=False)  # a whole optimizer object: the caller trusts the file
    m2, opt2 = both["m"], both["opt"]
    assert opt2.backend == opt.backend and opt2.param_groups[0]["rho"] == 0.05
    for seed in (2, 3):
        full_step(m, opt, *data(seed))
        full_step(m2, opt2, *data(seed))
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))


def test_a_step_in_progress_is_not_copied():
    m = model()
    opt = make(imbsam.SAM, m)
    torch.nn.functional.cross_entropy(m(data(1)[0]), data(1)[1]).backward()
    opt.first_step()
    with pytest.raises(TypeError, match="in the middle of a step.*abandon_step"):
        copy.deepcopy(opt)


@pytest.mark.parametrize("cls", [imbsam.SAM, imbsam.ImbSAM])
def test_step_hooks_fire_once_per_full_step(cls):
    m = model()
    opt = make(cls, m)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    full_step(m, opt, *data(1))  # the phases by hand
    assert calls == ["pre", "post"]
    calls.clear()
    x, y = data(2)
    if cls is imbsam.SAM:
        def closure():
            loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            return loss
    else:
        split = imbsam.HeadTailLoss([50, 40, 1])

        def closure():
            return split(m(x), y)
    opt.step(closure)
    assert calls == ["pre", "post"]  # step(closure) runs the phases: still once


@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_a_global_step_hook_sees_the_phases_and_the_base_step(backend):
    """Once for the SAM step and once for its base optimizer's, as for any optimizer that
    steps another; the fused path (which replaces the base's step()) used to skip the second."""
    m = model()
    opt = imbsam.SAM(m.parameters(), torch.optim.SGD, rho=0.05, backend=backend, lr=0.1, momentum=0.9)
    seen = []
    handle = register_optimizer_step_post_hook(lambda o, a, k: seen.append(type(o).__name__))
    try:
        full_step(m, opt, *data(1))
    finally:
        handle.remove()
    assert seen == ["SGD", "SAM"]


@pytest.mark.parametrize("backend", imbsam.available_backends())
@pytest.mark.parametrize("which", ["SAM", "ImbSAM", "compat.SAM", "compat.ImbSAM"])
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW], ids=["sgd", "adamw"])
def test_hooks_on_the_base_optimizer_fire_once_per_step_on_every_path(which, backend, base):
    """EMA and logging libraries hook the optimizer they are given: the base one, under the
    paper's adapters. They fired on the generic path and never on the fused one."""
    m = model()
    if which.startswith("compat."):
        base_opt = base(m.parameters(), lr=0.1)
        opt = getattr(imbsam.compat, which[len("compat."):])(base_opt, m, rho=0.05, backend=backend)
    else:
        opt = getattr(imbsam, which)(m.parameters(), base, rho=0.05, backend=backend, lr=0.1)
        base_opt = opt.base_optimizer
    calls = []
    base_opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o)))
    base_opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o)))
    for seed in (1, 2):
        x, y = data(seed)
        for phase in [opt.first_step, opt.second_step] + ([opt.third_step] if "ImbSAM" in which else []):
            torch.nn.functional.cross_entropy(m(x), y).backward()
            phase()
    assert calls == [("pre", base_opt), ("post", base_opt)] * 2
