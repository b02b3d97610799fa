"""Deep SAD's loss and anomaly score (Ruff et al., ICLR 2020, eq. 4), and ImbSAM's split of it.

With ``d = ||phi(x) - c||^2``: an unlabelled sample costs ``d``, a labelled normal one
``eta * (d + eps)``, a labelled anomaly ``eta / (d + eps)`` (pushed away from c); the loss
is the batch's mean, and the anomaly score of a test sample is ``d``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from imbsam.anomaly.data import LABELLED_ANOMALY, UNLABELLED

# Keeps a labelled anomaly's cost finite at d = 0 (the authors' value).
EPS = 1e-6
# The centre's coordinates are kept at least this far from 0: a coordinate near 0 can be
# matched by weights near 0, a trivial solution (the authors' value and rule).
CENTRE_MIN_ABS = 0.1


def squared_distance(z: Tensor, c: Tensor) -> Tensor:
    return (z.float() - c).pow(2).sum(1)


def sample_losses(z: Tensor, c: Tensor, semi: Tensor, eta: float, eps: float = EPS) -> Tensor:
    d = squared_distance(z, c)
    labelled = eta * (d + eps).pow(semi.to(d.dtype))  # +1: eta (d + eps); -1: eta / (d + eps)
    return torch.where(semi == UNLABELLED, d, labelled)


def deep_sad_loss(z: Tensor, c: Tensor, semi: Tensor, eta: float) -> Tensor:
    return sample_losses(z, c, semi, eta).mean()


def head_tail_losses(z: Tensor, c: Tensor, semi: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """ImbSAM's (head, tail): the labelled anomalies' terms are the tail (the term whose
    sharpness ImbSAM minimises), the others the head; both divided by the batch's size,
    so head + tail is ``deep_sad_loss``."""
    losses = sample_losses(z, c, semi, eta)
    anomalous = semi == LABELLED_ANOMALY
    zero = torch.zeros((), device=losses.device, dtype=losses.dtype)
    head = torch.where(anomalous, zero, losses).sum() / len(semi)
    return head, torch.where(anomalous, losses, zero).sum() / len(semi)


def centre_from(mean: Tensor, min_abs: float = CENTRE_MIN_ABS) -> Tensor:
    """The hypersphere's centre from the mean embedding: coordinates closer to 0 than
    ``min_abs`` are moved out to ``±min_abs`` (their sign kept; an exact 0 stays 0, as
    the authors' rule leaves it)."""
    small = mean.abs() < min_abs
    return torch.where(small & (mean < 0), -min_abs, torch.where(small & (mean > 0), min_abs, mean))
