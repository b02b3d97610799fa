"""A small CNN and data for optimizer tests, built on the CPU (deterministic) and moved to
``DEVICE``, which conftest sets to the device of the test's backend."""
from __future__ import annotations

import torch
from torch import nn


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
