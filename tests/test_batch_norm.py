"""``imbsam.frozen_running_stats`` and the trainer's ``--perturbed-bn-stats keep``: the forward
at the perturbed weights normalises with its batch statistics as usual and leaves every
running statistic as the first forward left it; the paper's default updates them in both."""
from __future__ import annotations

import copy

import pytest
import torch

import imbsam
from imbsam.train.step import make_step

from models import batches, small_cnn

COUNTS = [100, 90, 80, 70, 60, 50, 40, 3, 2, 1]


def running(model) -> list[torch.Tensor]:
    return [b.clone() for name, b in model.named_buffers()
            if name.rsplit(".", 1)[-1] in imbsam.batch_norm.RUNNING_BUFFERS]


def test_forwards_inside_leave_the_running_statistics_and_use_the_batch_ones():
    model = small_cnn()
    x, _ = batches(1)[0]
    twin = copy.deepcopy(model)
    before = running(model)
    objects = [(b, b._version) for b in model.buffers()]
    with imbsam.frozen_running_stats(model):
        out = model(x)
    assert all(torch.equal(a, b) for a, b in zip(running(model), before))
    # the same tensors, never written
    assert all(b is a and b._version == v for b, (a, v) in zip(model.buffers(), objects))
    assert torch.equal(out, twin(x))  # training-mode batch statistics, as without it
    assert any(not torch.equal(a, b) for a, b in zip(running(twin), before))  # which do update outside


def test_they_are_written_back_when_the_forward_raises():
    model = small_cnn()
    before = running(model)
    with pytest.raises(RuntimeError, match="channels"):
        with imbsam.frozen_running_stats(model):
            model(torch.randn(2, 3, 8, 8))
            model(torch.randn(2, 5, 8, 8))  # a bad batch after a good one
    assert all(torch.equal(a, b) for a, b in zip(running(model), before))


@pytest.mark.parametrize("method", ["sam", "imbsam"])
def test_a_step_that_keeps_them_updates_them_once_per_batch(method):
    """With "keep" the running statistics are those of the first forward alone (as SGD's
    step leaves them); with "update", the paper's, the perturbed forward moves them again."""
    x, y = batches(1)[0]
    by_one_forward = small_cnn()
    by_one_forward(x)
    ran = {}
    for mode in ("keep", "update"):
        model = small_cnn()
        opt = (imbsam.ImbSAM if method == "imbsam" else imbsam.SAM)(model.parameters(), torch.optim.SGD, rho=0.05,
                                                                     lr=0.1, momentum=0.9)
        make_step(method, model, opt, imbsam.HeadTailLoss(COUNTS), perturbed_bn_stats=mode)(x, y)
        ran[mode] = running(model)
    assert all(torch.equal(a, b) for a, b in zip(ran["keep"], running(by_one_forward)))
    assert any(not torch.equal(a, b) for a, b in zip(ran["update"], running(by_one_forward)))


def test_an_unknown_mode_is_refused():
    model = small_cnn()
    with pytest.raises(ValueError, match="perturbed_bn_stats='freeze'; allowed: update, keep"):
        make_step("sam", model, torch.optim.SGD(model.parameters(), lr=0.1), perturbed_bn_stats="freeze")


def test_something_that_is_not_a_model_is_refused_by_name():
    with pytest.raises(TypeError, match=r"takes the model \(a torch.nn.Module\).*got Tensor"):
        with imbsam.frozen_running_stats(torch.zeros(3)):
            pass
