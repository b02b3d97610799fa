"""ImbSAM's tail passes on the tail samples alone (``make_step(..., tail_passes="subset")``):
the step the paper's full-batch passes take, to rounding, on a model whose samples do not
interact; with BatchNorm a different step (the tail samples' own batch statistics) that
leaves the running statistics as the whole-batch forward left them."""
from __future__ import annotations

import pytest
import torch
from test_accumulation import COUNTS, cnn_without_batchnorm

import imbsam
from imbsam.train.step import make_step

import models
from models import small_cnn

KW = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
TAIL = (7, 8, 9)  # COUNTS' tail classes (n_c < 500 / 25)


def labelled_batches(device):
    """Batches with a few tail samples, with none, and with tail samples only."""
    gen = torch.Generator().manual_seed(3)
    head_only, tail_only = torch.arange(16) % 7, torch.tensor(TAIL).repeat(6)[:16]
    mixed = torch.randint(0, 7, (16,), generator=gen)
    mixed[[2, 11]] = torch.tensor([8, 9])
    return [(torch.randn(16, 3, 8, 8, generator=gen).to(device), y.to(device))
            for y in (mixed, head_only, tail_only, mixed.flip(0))]


def train(model_fn, backend, tail_passes):
    model = model_fn()
    opt = imbsam.ImbSAM(model.parameters(), torch.optim.SGD, rho=0.1, backend=backend, **KW)
    step = make_step("imbsam", model, opt, imbsam.HeadTailLoss(COUNTS), tail_passes=tail_passes)
    losses = [step(x, y)[0] for x, y in labelled_batches(models.DEVICE)]
    return model, opt, losses


@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_on_a_model_without_batchnorm_the_subset_passes_take_the_full_batch_step(backend):
    (full, full_opt, full_losses), (sub, sub_opt, sub_losses) = (
        train(cnn_without_batchnorm, backend, passes) for passes in ("full", "subset"))
    start = cnn_without_batchnorm()
    for p, q, p0 in zip(sub.parameters(), full.parameters(), start.parameters()):
        assert (q - p0).abs().max() > 1e-4  # the steps moved the weights
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sub_opt.state[p]["momentum_buffer"], full_opt.state[q]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(sub_losses), torch.stack(full_losses))  # the reported loss too


def test_with_batchnorm_the_tail_gradient_is_the_whole_batchs_with_its_statistics_held_constant():
    """What the subset passes compute under BatchNorm: exactly the whole batch's tail gradient
    with the batch statistics held constant (eval-mode BatchNorm with the batch's mean and
    variance). The paper's passes also differentiate through those statistics, which
    carries the tail loss to every head sample: on this model that part is most of the
    gradient (scripts/tail_gradients.py measures it on ResNet-32)."""
    from imbsam.batch_norm import BatchStatistics, frozen_running_stats

    model, split = small_cnn(), imbsam.HeadTailLoss(COUNTS)
    params = list(model.parameters())
    x, y = labelled_batches(models.DEVICE)[0]
    index = split.tail_classes[y].nonzero().squeeze(1)
    stats = BatchStatistics()
    with frozen_running_stats(model), stats.recorded(model):
        paper = torch.autograd.grad(split(model(x), y)[1], params)
    with stats.applied(model):
        constant = torch.autograd.grad(split(model(x), y)[1], params)
        subset = torch.autograd.grad(split(model(x[index]), y[index], batch_size=16)[1], params)
    for a, b in zip(subset, constant):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    far = sum(((a - b) ** 2).sum() for a, b in zip(constant, paper)).sqrt() / sum((b ** 2).sum() for b in paper).sqrt()
    assert far > 0.05  # not rounding: the statistics' part of the paper's gradient


def test_with_batchnorm_the_running_statistics_are_the_whole_batchs():
    """Updated once a step, by the whole batch's forward at w; the tail samples' forwards
    leave them (and the recorded statistics normalise them: no layer is left patched)."""
    model = small_cnn()
    opt = imbsam.ImbSAM(model.parameters(), torch.optim.SGD, rho=0.1, backend="reference", **KW)
    step = make_step("imbsam", model, opt, imbsam.HeadTailLoss(COUNTS), tail_passes="subset")
    once = small_cnn()  # one whole-batch forward per step at the weights before it
    for x, y in labelled_batches(models.DEVICE):
        once.load_state_dict(model.state_dict())
        once(x)  # training mode: the running statistics move once
        step(x, y)
        for name, buffer in model.named_buffers():
            assert torch.equal(buffer, dict(once.named_buffers())[name]), name
    assert all("forward" not in vars(m) for m in model.modules())


def test_subset_passes_are_imbsams_and_named():
    model = cnn_without_batchnorm()
    sam = imbsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="tail_passes='subset' is ImbSAM's"):
        make_step("sam", model, sam, tail_passes="subset")
    opt = imbsam.ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="tail_passes='tail'; allowed: full, subset"):
        make_step("imbsam", model, opt, imbsam.HeadTailLoss(COUNTS), tail_passes="tail")


def test_head_tail_loss_divides_a_part_of_a_batch_by_the_whole_batchs_size():
    split = imbsam.HeadTailLoss(COUNTS)
    logits, y = torch.randn(16, 10), torch.arange(16) % 10
    tail = split(logits, y)[1]
    index = split.tail_classes[y].nonzero().squeeze(1)
    torch.testing.assert_close(split(logits[index], y[index], batch_size=16)[1], tail)
    with pytest.raises(ValueError, match="batch_size must be an int >= the 16 samples"):
        split(logits, y, batch_size=8)
