"""The optimizers against a literal, independent transcription of the paper's code.

``benchmarks/paper_baseline.py`` follows the paper's ImbSAM repository (built on ASAM's
SAM class) op for op: per-tensor loops, a persistent ``eps`` buffer,
``optimizer.zero_grad()`` between phases; the loss below is split by boolean indexing,
as the paper's loop does. Nothing from imbsam is used in either. The benchmarks time the
same classes as the baseline a user would run instead.
"""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import imbsam

from conftest import max_err
from models import batches, small_cnn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from paper_baseline import PaperImbSAM, PaperSAM  # noqa: E402

COUNTS = [500, 400, 300, 200, 150, 100, 60, 15, 10, 5]
TAIL = torch.tensor([c < 20 for c in COUNTS])


def paper_losses(out, y):
    """L_H and L_T by boolean indexing, as in the paper's loop (tail weight 2, divided by B)."""
    tail = TAIL.to(y.device)[y]
    batch = y.numel()
    head_loss = F.cross_entropy(out[~tail], y[~tail], reduction="sum") / batch
    tail_loss = 2 * F.cross_entropy(out[tail], y[tail], reduction="sum") / batch
    return head_loss, tail_loss


def data_with_a_tail_free_batch():
    data = batches(4, seed=3)
    x, y = data[1]
    data[1] = (x, torch.where(TAIL.to(y.device)[y], torch.zeros_like(y), y))  # no tail sample in this batch
    assert not TAIL[data[1][1].cpu()].any() and TAIL[data[0][1].cpu()].any()
    return data


def run_paper_imbsam(model, data):
    opt = PaperImbSAM(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3), model, 0.05)
    for x, y in data:
        head, tail = paper_losses(model(x), y)
        head.backward(retain_graph=True)
        opt.first_step()
        tail.backward()
        opt.second_step()
        paper_losses(model(x), y)[1].backward()
        opt.third_step()
    return opt.optimizer


def run_imbsam(model, data, make_opt):
    opt = make_opt(model)
    split = imbsam.HeadTailLoss(COUNTS)
    for x, y in data:
        head, tail = split(model(x), y)
        head.backward(retain_graph=True)
        opt.first_step()
        tail.backward()
        opt.second_step()
        split(model(x), y)[1].backward()
        opt.third_step()
    return opt


OPTIMIZER_STYLES = {
    "optimizer": lambda m, b: imbsam.ImbSAM(m.parameters(), torch.optim.SGD, rho=0.05, backend=b, lr=0.05,
                                            momentum=0.9, weight_decay=1e-3),
    "compat": lambda m, b: imbsam.compat.ImbSAM(
        torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3), m, rho=0.05, backend=b),
}


@pytest.mark.parametrize("style", OPTIMIZER_STYLES)
@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_imbsam_matches_the_paper(style, backend):
    data = data_with_a_tail_free_batch()
    paper_model = small_cnn()
    run_paper_imbsam(paper_model, data)
    model = small_cnn()
    run_imbsam(model, data, lambda m: OPTIMIZER_STYLES[style](m, backend))
    tol = 0.0 if backend == "reference" else 1e-5
    assert max_err(model.parameters(), paper_model.parameters()) <= max(tol, 1e-6)
    assert max_err(model.buffers(), paper_model.buffers()) <= 1e-5


def test_tail_free_batch_is_the_head_sgd_step():
    (x, y), = batches(1, seed=4)
    y = torch.where(TAIL[y], torch.zeros_like(y), y)
    model = small_cnn()
    sgd_model = copy.deepcopy(model)
    run_imbsam(model, [(x, y)], lambda m: OPTIMIZER_STYLES["optimizer"](m, "reference"))
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    head, _ = paper_losses(sgd_model(x), y)
    head.backward()
    sgd_model(x)  # the second forward of ImbSAM also updates BatchNorm statistics
    sgd.step()
    assert max_err(model.parameters(), sgd_model.parameters()) < 1e-6
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("backend", imbsam.available_backends())
def test_sam_matches_the_paper(backend):
    data = batches(4, seed=6)
    paper_model, model = small_cnn(), small_cnn()
    paper = PaperSAM(torch.optim.SGD(paper_model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3),
                     paper_model, rho=0.05)
    ours = imbsam.compat.SAM(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3),
                             model, rho=0.05, backend=backend)
    for opt, m in ((paper, paper_model), (ours, model)):
        for x, y in data:
            F.cross_entropy(m(x), y).backward()
            opt.first_step()
            F.cross_entropy(m(x), y).backward()
            opt.second_step()
    assert max_err(model.parameters(), paper_model.parameters()) <= 1e-5
