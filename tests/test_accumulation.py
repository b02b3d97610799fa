"""Gradient accumulation through the phase API: k micro-batches whose losses are scaled
by 1/k, accumulated into .grad before each phase, take the step one whole batch takes;
so does ImbSAM's recipe that frees each micro-batch's graph (docs/semantics.md's), and the
one it gave before (swapped .grad buffers). The recipes: accumulation_recipes.py.

The model has no BatchNorm, whose batch statistics would differ between a micro-batch
and the whole batch; the sums differ only in their order, so the match is to rounding.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import imbsam
from imbsam.train.step import make_step

import models
from accumulation_recipes import RECIPES
from models import batches

COUNTS = [500, 400, 300, 200, 150, 100, 60, 15, 10, 5]  # tail: classes 7, 8, 9
SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
MICRO = 4  # k: each batch of 16 as 4 micro-batches of 4


def cnn_without_batchnorm(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10)).to(models.DEVICE)


def run(kind, backend, accumulate):
    model = cnn_without_batchnorm()
    split = imbsam.HeadTailLoss(COUNTS)
    method, accumulated = RECIPES[kind]
    cls = imbsam.ImbSAM if method == "imbsam" else imbsam.SAM
    opt = cls(model.parameters(), torch.optim.SGD, rho=0.05, backend=backend, **SGD_KW)
    whole_batch = make_step(method, model, opt, split)  # the training loop's own step
    for x, y in batches(4):
        if accumulate:
            accumulated(model, [p for p in model.parameters() if p.requires_grad], opt, split, x, y, MICRO)
        else:
            whole_batch(x, y)
    return model


@pytest.mark.parametrize("backend", imbsam.available_backends())
@pytest.mark.parametrize("kind", list(RECIPES))
def test_accumulated_micro_batches_take_the_whole_batch_step(backend, kind):
    a = run(kind, backend, accumulate=False)
    b = run(kind, backend, accumulate=True)
    start = cnn_without_batchnorm()
    for pa, pb, p0 in zip(a.parameters(), b.parameters(), start.parameters()):
        moved = (pa - p0).abs().max().item()
        assert moved > 1e-4  # the steps did move the weights
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)
