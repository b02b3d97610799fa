"""The head/tail split of a per-sample loss for ImbSAM, with masks instead of indexing.

Masked weights keep every shape static and never read a count on the host, so the same
code runs in CUDA-graph capture and ``torch.compile``; the gradients equal those of
boolean indexing (``loss[tail].sum()``).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_threshold(threshold) -> None:
    # NaN or <= 0 made no class tail (ImbSAM became SGD in silence); inf made every class tail.
    value = _real("threshold", threshold)
    if not (0 < value < float("inf")):
        raise ValueError(f"threshold must be a finite number > 0 (a class with fewer samples is tail), got "
                         f"{threshold!r}")


def check_tail_weight(tail_weight) -> None:
    # NaN skipped every step, inf made every tail gradient infinite, a negative weight
    # ascended the tail loss, 0 dropped the tail classes from training.
    value = _real("tail_weight", tail_weight)
    if not (0 < value < float("inf")):
        raise ValueError(f"tail_weight must be a finite number > 0 (the paper's is 2), got {tail_weight!r}")


def tail_class_mask(class_counts: Union[Sequence[int], Tensor], threshold: Optional[float] = None) -> Tensor:
    """Bool mask over classes: ``n_c < threshold``; the default threshold is ``n_max / 25``
    (20 on CIFAR-100-LT with imbalance factor 100, the paper's eta). Warns when no class, or
    every class, is tail: ImbSAM is then the base optimizer's step, or SAM on every sample."""
    counts = torch.as_tensor(class_counts)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence of per-class counts, got shape "
                         f"{tuple(counts.shape)}")
    if counts.dtype == torch.bool or counts.is_complex():
        raise TypeError(f"class_counts must hold numbers of samples, got dtype {counts.dtype}")
    if counts.is_floating_point() and not bool(torch.isfinite(counts).all()):
        raise ValueError("class_counts must be finite numbers of samples >= 0, got a NaN or infinite count")
    if bool((counts < 0).any()):
        raise ValueError("class_counts must be >= 0")
    if threshold is None:
        threshold = counts.max().item() / 25
        if threshold <= 0:
            raise ValueError("class_counts are all 0: no class has samples to split into head and tail")
    check_threshold(threshold)
    mask = counts < threshold
    if not bool(mask.any()):
        warnings.warn(f"imbsam.HeadTailLoss: no class has fewer than {threshold:g} samples, so none is tail: the tail "
                      "loss is always 0 and ImbSAM takes the base optimizer's step", stacklevel=3)
    elif bool(mask.all()):
        warnings.warn(f"imbsam.HeadTailLoss: every class has fewer than {threshold:g} samples, so all are tail: the "
                      "head loss is always 0 and ImbSAM is SAM on the weighted loss", stacklevel=3)
    return mask


class HeadTailLoss(torch.nn.Module):
    """``(L_H, L_T)`` with ``L_H = (1/B) sum_{y_i not tail} l_i`` and ``L_T = (w/B) sum_{y_i tail} l_i``.

    ``l_i`` is the per-sample cross-entropy, ``B`` the batch size and ``w`` the tail
    weight (2 in the paper's loop). A batch without tail samples gives ``L_T = 0`` (with a
    graph, so ``backward()`` still works and yields zero gradients).

    Args:
        class_counts: training samples per class.
        threshold: classes with fewer samples than this are tail (default ``n_max / 25``); a
            finite number > 0.
        tail_weight: the factor on the tail loss, a finite number > 0.
    """

    def __init__(self, class_counts, threshold: Optional[float] = None, tail_weight: float = 2.0):
        super().__init__()
        check_tail_weight(tail_weight)
        self.register_buffer("tail_classes", tail_class_mask(class_counts, threshold), persistent=False)
        self.tail_weight = float(tail_weight)

    def sample_weights(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample (head, tail) weights, 0 or 1, as floats."""
        if self.tail_classes.device != targets.device:  # a module left on the CPU: move the mask once
            self.tail_classes = self.tail_classes.to(targets.device)
        is_tail = self.tail_classes[targets].to(torch.float32)
        return 1.0 - is_tail, is_tail

    def forward(self, logits: Tensor, targets: Tensor, batch_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """``batch_size``: the ``B`` the sums are divided by, when ``logits`` are those of part
        of a batch (its tail samples, say); by default their own number."""
        if logits.dim() != 2 or logits.shape[1] != self.tail_classes.numel():
            raise ValueError(f"logits must have shape (batch, {self.tail_classes.numel()}): one column per class of "
                             f"class_counts; got {tuple(logits.shape)}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < max(targets.numel(), 1)):
            raise ValueError(f"batch_size must be an int >= the {targets.numel()} samples given (the batch they are "
                             f"part of), got {batch_size!r}")
        per_sample = F.cross_entropy(logits.float(), targets, reduction="none")
        head_w, tail_w = self.sample_weights(targets)
        batch = targets.numel() if batch_size is None else batch_size
        return (per_sample * head_w).sum() / batch, self.tail_weight * (per_sample * tail_w).sum() / batch
