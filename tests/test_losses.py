"""The masked head/tail split equals boolean indexing, and the tail classes follow the counts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import imbsam


def test_tail_class_mask_default_threshold_is_nmax_over_25():
    counts = [500, 100, 21, 20, 19, 5]
    assert imbsam.tail_class_mask(counts).tolist() == [False, False, False, False, True, True]
    assert imbsam.tail_class_mask(counts, threshold=101).tolist() == [False, True, True, True, True, True]


def test_masked_gradients_equal_boolean_indexing():
    torch.manual_seed(0)
    counts = [500, 300, 100, 15, 5]
    split = imbsam.HeadTailLoss(counts, tail_weight=2.0)
    logits = torch.randn(32, 5, requires_grad=True)
    y = torch.randint(0, 5, (32,))
    head, tail = split(logits, y)
    g_head, = torch.autograd.grad(head, logits, retain_graph=True)
    g_tail, = torch.autograd.grad(tail, logits)

    is_tail = torch.tensor([c < 20 for c in counts])[y]
    ref_head = F.cross_entropy(logits[~is_tail], y[~is_tail], reduction="sum") / 32
    ref_tail = 2 * F.cross_entropy(logits[is_tail], y[is_tail], reduction="sum") / 32
    r_head, = torch.autograd.grad(ref_head, logits, retain_graph=True)
    r_tail, = torch.autograd.grad(ref_tail, logits)
    assert torch.allclose(head, ref_head) and torch.allclose(tail, ref_tail)
    assert torch.allclose(g_head, r_head, atol=1e-7) and torch.allclose(g_tail, r_tail, atol=1e-7)


def test_batch_without_tail_samples_gives_zero_tail_loss_with_a_graph():
    split = imbsam.HeadTailLoss([500, 300, 5])
    logits = torch.randn(8, 3, requires_grad=True)
    _, tail = split(logits, torch.zeros(8, dtype=torch.long))
    assert tail.item() == 0.0
    tail.backward()
    assert torch.count_nonzero(logits.grad) == 0


BAD_ARGUMENTS = [  # (keyword arguments, error, what the message says); each was accepted before 2026-12-04
    (dict(tail_weight=float("nan")), ValueError, "tail_weight must be a finite number > 0"),  # every step skipped
    (dict(tail_weight=float("inf")), ValueError, "tail_weight must be a finite number > 0"),
    (dict(tail_weight=-2.0), ValueError, "tail_weight must be a finite number > 0"),  # the tail loss ascended
    (dict(tail_weight=0.0), ValueError, "tail_weight must be a finite number > 0"),
    (dict(tail_weight="2"), TypeError, "tail_weight must be a real number"),
    (dict(threshold=float("nan")), ValueError, "threshold must be a finite number > 0"),  # no tail class
    (dict(threshold=float("inf")), ValueError, "threshold must be a finite number > 0"),
    (dict(threshold=0), ValueError, "threshold must be a finite number > 0"),
    (dict(threshold=True), TypeError, "threshold must be a real number"),
    (dict(class_counts=[500.0, float("nan"), 5.0]), ValueError, "finite numbers of samples"),
    (dict(class_counts=[True, False]), TypeError, "numbers of samples"),
    (dict(class_counts=[0, 0, 0]), ValueError, "all 0"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_ARGUMENTS, ids=lambda a: repr(a) if isinstance(a, dict) else "")
def test_head_tail_loss_refuses_arguments_outside_the_method(kwargs, error, message):
    kwargs = dict(dict(class_counts=[500, 300, 5]), **kwargs)
    with pytest.raises(error, match=message):
        imbsam.HeadTailLoss(**kwargs)


@pytest.mark.parametrize("threshold,says", [(3, "none is tail"), (1000, "all are tail")])
def test_a_split_with_no_head_or_no_tail_class_warns(threshold, says):
    with pytest.warns(UserWarning, match=says):
        imbsam.HeadTailLoss([500, 300, 5], threshold=threshold)
