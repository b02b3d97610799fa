"""The long-tailed profile (LDAM-DRW's recipe, used by the paper) and the class splits."""
from __future__ import annotations

from typing import Optional, Sequence

# The class groups of shot_split, and with "all" the accuracies a run reports.
SHOT_GROUPS = ("many", "medium", "few")
ACCURACY_KEYS = (*SHOT_GROUPS, "all")


def long_tail_counts(n_max: int, num_classes: int, imb_factor: float) -> list[int]:
    """Class ``c`` keeps ``int(n_max * (1 / imb_factor) ** (c / (C - 1)))`` samples.

    CIFAR-100 with ``imb_factor=100``: 500, 477, ..., 5 (10,847 in all).
    """
    if imb_factor < 1:
        raise ValueError(f"imb_factor must be >= 1 (1 is balanced), got {imb_factor}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if num_classes == 1:
        return [n_max]
    if imb_factor > n_max:  # the smallest class would have no training image
        raise ValueError(f"imb_factor must be at most {n_max} here (the largest class's {n_max} images over the "
                         f"smallest's, which needs one at least), got {imb_factor:g}")
    return [int(n_max * (1.0 / imb_factor) ** (c / (num_classes - 1))) for c in range(num_classes)]


def shot_split(counts: Sequence[int], many: Optional[float] = None, few: Optional[float] = None) -> list[str]:
    """'many' for ``n_c > many``, 'few' for ``n_c < few``, else 'medium'.

    The paper fixes Many at ``n_c > 100`` and Few at ``n_c < 20`` on CIFAR-100-LT, whose
    largest class has 500 images. The defaults are those thresholds as fractions of the
    largest class, ``many = n_max / 5`` and ``few = n_max / 25``: the paper's own numbers
    only when ``n_max`` is 500 (1200 and 240 on Fashion-MNIST-LT, whose ``n_max`` is 6000).
    """
    n_max = max(counts)
    many = n_max / 5 if many is None else many
    few = n_max / 25 if few is None else few
    return ["many" if n > many else "few" if n < few else "medium" for n in counts]
