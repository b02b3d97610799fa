"""Area under the ROC curve, in torch: the Mann-Whitney statistic with tied scores sharing
their mean rank, which is what sklearn's ``roc_auc_score`` computes."""
from __future__ import annotations

import torch
from torch import Tensor


def auroc(scores: Tensor, positive: Tensor) -> float:
    """The probability that a random positive scores above a random negative (ties count 1/2)."""
    scores, positive = scores.detach().double().flatten().cpu(), positive.detach().bool().flatten().cpu()
    if scores.shape != positive.shape:
        raise ValueError(f"{scores.numel()} scores for {positive.numel()} labels")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{int((~torch.isfinite(scores)).sum())} scores are not finite: no ranking to measure")
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes; got {n_pos} positives and {n_neg} negatives")
    order = scores.argsort()
    _, inverse, counts = torch.unique_consecutive(scores[order], return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # 1-based rank of each run of ties' last member
    mean_rank = last - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = mean_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
