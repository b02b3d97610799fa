"""A small CNN and data for optimizer tests, built on the CPU (deterministic) and moved to
``DEVICE``, which conftest sets to the device of the test's backend."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import imbsam

DEVICE = "cpu"


def small_cnn(seed: int = 0, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return _small_cnn(num_classes).to(DEVICE)


def _small_cnn(num_classes: int) -> nn.Module:
    return nn.Sequential(
        # No bias before BatchNorm: its gradient is rounding noise, which Adam would amplify.
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes),
    )


def batches(n: int, seed: int = 1, batch: int = 16, num_classes: int = 10):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 8, 8, generator=gen).to(DEVICE),
             torch.randint(0, num_classes, (batch,), generator=gen).to(DEVICE)) for _ in range(n)]


def step_by_hand(kind, model, opt, x, y, counts, poison_head=None, before_last=None, last_kw=None):
    """One SAM or ImbSAM step through the phase methods, as a user's loop calls them.
    ``poison_head`` is written into the first head gradient before ImbSAM's first_step;
    ``before_last()`` runs just before the last phase, which gets ``last_kw``."""
    if kind == "imbsam":
        split = imbsam.HeadTailLoss(counts)
        head, tail = split(model(x), y)
        head.backward(retain_graph=True)
        if poison_head is not None:
            next(model.parameters()).grad.view(-1)[3] = poison_head
        opt.first_step()
        tail.backward()
        opt.second_step()
        split(model(x), y)[1].backward()
    else:
        F.cross_entropy(model(x), y).backward()
        opt.first_step()
        F.cross_entropy(model(x), y).backward()
    if before_last is not None:
        before_last()
    (opt.third_step if kind == "imbsam" else opt.second_step)(**(last_kw or {}))
