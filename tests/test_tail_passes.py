"""ImbSAM's tail passes on the tail samples alone (``make_step(..., tail_passes="subset")``):
the step the paper's full-batch passes take, to rounding, on a model whose samples do not
interact; a model with BatchNorm in training mode is refused."""
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


def test_a_batchnorm_layer_in_training_mode_is_refused_before_any_pass():
    """ImbSAM's tail gradient reaches every sample through BatchNorm's batch statistics,
    which the tail samples alone cannot give (scripts/tail_gradients.py); in eval mode the
    layer couples nothing and the step is exact again."""
    model = small_cnn()
    opt = imbsam.ImbSAM(model.parameters(), torch.optim.SGD, rho=0.1, backend="reference", **KW)
    step = make_step("imbsam", model, opt, imbsam.HeadTailLoss(COUNTS), tail_passes="subset")
    x, y = labelled_batches(models.DEVICE)[0]
    w = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"2 BatchNorm layer\(s\) in training mode.*resnet32-gn"):
        step(x, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w)) and opt._engine.phase == "idle"
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    step(x, y)  # frozen BatchNorm: no batch statistics, the subset passes run


def test_on_the_trainers_groupnorm_resnet32_the_subset_passes_take_the_full_batch_step():
    """In float64: in fp32 the two orders of summation drift apart by rounding, which 32
    layers and a tail-only batch's large step amplify to 2e-4 by the fourth step."""
    from imbsam.train.models import build_model

    def model_fn():
        torch.manual_seed(0)
        return build_model("resnet32-gn", 10, 3).double()

    def train64(passes):
        model = model_fn()
        opt = imbsam.ImbSAM(model.parameters(), torch.optim.SGD, rho=0.1, backend="reference", **KW)
        step = make_step("imbsam", model, opt, imbsam.HeadTailLoss(COUNTS), tail_passes=passes)
        for x, y in labelled_batches("cpu"):
            step(x.double(), y)
        return model
    for p, q in zip(train64("subset").parameters(), train64("full").parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


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
