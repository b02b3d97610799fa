"""Gradient accumulation over k micro-batches through the phase API, as users write it:
shared by the single-process tests (test_accumulation.py) and the DDP ones
(test_data_parallel.py). Each takes one batch's step; the losses are scaled by 1/k.

``net`` is what the forward runs (a DDP wrapper or the model), ``params`` the parameters
the optimizer holds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def micro_batches(x, y, k: int):
    return list(zip(x.chunk(k), y.chunk(k)))


def sam(net, params, opt, split, x, y, k: int) -> None:
    for xs, ys in micro_batches(x, y, k):
        (F.cross_entropy(net(xs), ys) / k).backward()
    opt.first_step()
    for xs, ys in micro_batches(x, y, k):
        (F.cross_entropy(net(xs), ys) / k).backward()
    opt.second_step()


def imbsam_keeping_graphs(net, params, opt, split, x, y, k: int) -> None:
    """Every micro-batch's head gradient is in .grad before first_step sets them aside, so
    each forward's graph is kept until its tail backward."""
    tails = []
    for xs, ys in micro_batches(x, y, k):
        head, tail = split(net(xs), ys)
        (head / k).backward(retain_graph=True)
        tails.append(tail / k)
    opt.first_step()
    for tail in tails:
        tail.backward()
    opt.second_step()
    for xs, ys in micro_batches(x, y, k):
        (split(net(xs), ys)[1] / k).backward()
    opt.third_step()


def imbsam_graph_by_graph(net, params, opt, split, x, y, k: int) -> None:
    """docs/semantics.md's recipe: each micro-batch's graph freed at once. Its tail gradient
    comes from torch.autograd.grad, summed in a list of its own; its head gradient goes to
    .grad. After first_step has set .grad aside, the tail sums become .grad."""
    tail_grads = None
    for xs, ys in micro_batches(x, y, k):
        head, tail = split(net(xs), ys)
        grads = torch.autograd.grad(tail / k, params, retain_graph=True)
        tail_grads = list(grads) if tail_grads is None else [t.add_(g) for t, g in zip(tail_grads, grads)]
        (head / k).backward()
    opt.first_step()
    for p, g in zip(params, tail_grads):
        p.grad = g
    opt.second_step()
    for xs, ys in micro_batches(x, y, k):
        (split(net(xs), ys)[1] / k).backward()
    opt.third_step()


def _swap(params, other) -> None:
    for i, p in enumerate(params):
        p.grad, other[i] = other[i], p.grad


def imbsam_swapping_grads(net, params, opt, split, x, y, k: int) -> None:
    """The recipe docs/semantics.md gave before 2026-12-04: the tail gradient accumulates in
    buffers swapped in as .grad for its backward. DDP averages that backward (the first
    after each forward) and leaves the head's local; correct without DDP and under DDP with
    sync_data_parallel, not with gradient_as_bucket_view=True (DDP copies into its buckets
    whatever tensor .grad holds)."""
    tail_grads = [None] * len(params)
    for xs, ys in micro_batches(x, y, k):
        head, tail = split(net(xs), ys)
        _swap(params, tail_grads)
        (tail / k).backward(retain_graph=True)
        _swap(params, tail_grads)
        (head / k).backward()
    opt.first_step()
    _swap(params, tail_grads)
    opt.second_step()
    for xs, ys in micro_batches(x, y, k):
        (split(net(xs), ys)[1] / k).backward()
    opt.third_step()


# name -> (the optimizer it steps, the recipe)
RECIPES = {"sam": ("sam", sam), "imbsam": ("imbsam", imbsam_keeping_graphs),
           "imbsam-graph-by-graph": ("imbsam", imbsam_graph_by_graph),
           "imbsam-swapping-grads": ("imbsam", imbsam_swapping_grads)}
