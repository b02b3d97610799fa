"""``finishing_by_step()``: a trainer's own ``optimizer.step()`` ends a step begun by the
phases (what imbsam.integrations build on), as the last phase called by hand does."""
from __future__ import annotations

import pytest
import torch

import imbsam


def task():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    x, y = torch.randn(16, 5), torch.tensor([0] * 10 + [1] * 4 + [2] * 2)
    return model, x, y


def sam_by_hand(closure_style: bool):
    model, x, y = task()
    opt = imbsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    fired = []
    opt.register_step_post_hook(lambda *_: fired.append(1))
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step()
        loss_fn = lambda: torch.nn.functional.cross_entropy(model(x), y).backward()  # noqa: E731
        if closure_style:
            with opt.finishing_by_step():
                opt.step(loss_fn)
        elif closure_style is None:
            loss_fn()
            opt.second_step()
        else:
            loss_fn()
            with opt.finishing_by_step():
                opt.step()
        opt.zero_grad()
    return model, fired


@pytest.mark.parametrize("closure_style", [True, False], ids=["step(closure)", "step()"])
def test_a_trainers_step_ends_the_step_as_the_last_phase_does(closure_style):
    got, fired = sam_by_hand(closure_style)
    want, fired_by_hand = sam_by_hand(None)
    for a, b in zip(got.parameters(), want.parameters()):
        assert torch.equal(a, b)
    assert len(fired) == len(fired_by_hand) == 3  # the step hooks fire once a step


def test_imbsam_after_its_head_folded_steps_on_grad_alone():
    """g_H added into .grad before a trainer's step: the step ImbSAM's third phase takes."""
    results = []
    for fold in (False, True):
        model, x, y = task()
        split = imbsam.HeadTailLoss(torch.tensor([10, 4, 2]), threshold=5)
        opt = imbsam.ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        for _ in range(3):
            head, tail = split(model(x), y)
            head.backward(retain_graph=True)
            opt.first_step()
            tail.backward()
            opt.second_step()
            split(model(x), y)[1].backward()
            if fold:
                opt._engine.fold_head_grads()
                with opt.finishing_by_step():
                    opt.step()
            else:
                opt.third_step()
            opt.zero_grad()
        results.append(model)
    for a, b in zip(results[0].parameters(), results[1].parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-7)


def test_outside_the_block_step_without_a_closure_is_still_refused():
    model, x, y = task()
    opt = imbsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="SAM.step\\(\\) needs a closure"):
        opt.step()


def test_folding_before_the_pass_at_w_plus_e_is_refused():
    model, x, y = task()
    opt = imbsam.ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="fold_head_grads\\(\\) belongs between the pass at w \\+ e"):
        opt._engine.fold_head_grads()
