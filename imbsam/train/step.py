"""One training iteration of SGD, SAM or ImbSAM, and its CUDA-graph capture.

The steps never read a value on the host: losses and logits come back as device
tensors, the head/tail split is masked, and the optimizers' fused paths do not sync,
so a whole step can be captured in a CUDA graph and replayed.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from imbsam.batch_norm import frozen_running_stats
from imbsam.losses import HeadTailLoss

METHODS = ("sgd", "sam", "imbsam")
# Whether the forward at w + e updates BatchNorm's running statistics: the paper's recipe first.
PERTURBED_BN_STATS = ("update", "keep")
# Where ImbSAM's tail backward at w and its forward and backward at w + e run: the whole
# batch (the paper's; the tail loss masks the head samples out) or its tail samples alone.
TAIL_PASSES = ("full", "subset")


def _autocast(x: Tensor, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=dtype)


Step = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def make_step(method: str, model: torch.nn.Module, optimizer, split: Optional[HeadTailLoss] = None,
              autocast_dtype: Optional[torch.dtype] = None, perturbed_bn_stats: str = "update",
              loss_weight: Optional[Callable[[int], float]] = None, tail_passes: str = "full",
              loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> Step:
    """A function ``step(x, y) -> (loss, logits)`` for one iteration; both outputs detached.

    ``sgd``: a plain optimizer step. ``sam``: the two SAM phases on the same batch.
    ``imbsam``: head and tail losses from ``split`` (required), the three ImbSAM phases;
    the reported loss is head + tail. ``logits`` are those of the first forward pass.
    ``loss_fn(outputs, y)``: SGD's and SAM's loss (cross-entropy; Deep SAD's in
    ``imbsam.anomaly``); ``sgd`` is the plain step of whatever ``optimizer`` is.
    ``perturbed_bn_stats="keep"`` keeps the forward at ``w + e`` from updating the
    running statistics of normalisation layers (``"update"``, the paper's: both do).
    ``loss_weight(n)``, when given, multiplies the losses a batch of ``n`` backpropagates
    (a data-parallel rank's share of a global batch: ``world * n / n_global``, so that the
    ranks' averaged gradient is the global batch's mean); the reported loss is unweighted.

    ``tail_passes="subset"`` (ImbSAM): the head loss's forward and backward on the whole
    batch, the tail loss's backward at ``w`` and its forward and backward at ``w + e`` on
    the batch's tail samples alone (their losses still divided by the whole batch's size).
    The same step, to rounding, for a model whose samples do not interact; a BatchNorm
    layer in training mode is refused at the step: ImbSAM's tail gradient flows through
    the batch statistics to every head sample, most of it on ResNet-32 (1.25 times the
    norm of what is left with them held constant, ``scripts/tail_gradients.py``), and
    both stand-ins measured for it, the tail samples' own statistics or the batch's held
    constant, trained badly (``results/tail_passes/``); use GroupNorm or LayerNorm
    (``resnet32-gn``), or BatchNorm in eval mode. It reads the number of tail samples on the host
    (one sync a step), so it cannot be captured in a CUDA graph. A batch without tail
    samples takes the base step on ``g_H`` (``g_T = g_T' = 0``) with no further pass.

    With a sharpness schedule on the optimizer (``imbsam.schedules``), a step it does not
    sharpen runs SGD's passes when that is known before them (``Periodic``, ``Bernoulli``:
    one forward, one backward of the whole loss, ``plain_step()``), and ends at the
    perturbation phase when it is decided there (``AESAM``: no pass at ``w + e``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if perturbed_bn_stats not in PERTURBED_BN_STATS:
        raise ValueError(f"perturbed_bn_stats={perturbed_bn_stats!r}; allowed: {', '.join(PERTURBED_BN_STATS)}")
    if method == "imbsam" and split is None:
        raise ValueError("the imbsam step needs a HeadTailLoss `split`")
    if tail_passes not in TAIL_PASSES:
        raise ValueError(f"tail_passes={tail_passes!r}; allowed: {', '.join(TAIL_PASSES)}")
    if tail_passes == "subset" and method != "imbsam":
        raise ValueError(f"tail_passes='subset' is ImbSAM's (its sharpness term is the tail loss), not {method}'s")
    # The tail samples' passes skip DDP's wrapper: their number differs between ranks, so DDP's
    # reduction would wait for ranks without any; sync_data_parallel averages their gradients.
    tail_model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model

    def forward(x):
        with _autocast(x, autocast_dtype):
            return model(x)

    def perturbed_forward(x):
        if perturbed_bn_stats == "keep":
            with frozen_running_stats(model):
                return forward(x)
        return forward(x)

    def weighted(loss, y):
        return loss if loss_weight is None else loss * loss_weight(y.numel())

    def sgd(x, y):
        logits = forward(x)
        loss = loss_fn(logits.float(), y)
        weighted(loss, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), logits.detach()

    # With a sharpness schedule the perturbation phase may take a plain step instead (it
    # returns False): then the step is done, and no pass at w + e follows.
    def sam(x, y):
        logits = forward(x)
        loss = loss_fn(logits.float(), y)
        weighted(loss, y).backward()
        if optimizer.first_step(zero_grad=True):
            weighted(loss_fn(perturbed_forward(x).float(), y), y).backward()
            optimizer.second_step(zero_grad=True)
        return loss.detach(), logits.detach()

    def imbsam(x, y):
        logits = forward(x)
        head, tail = split(logits, y)
        weighted(head, y).backward(retain_graph=True)
        optimizer.first_step()
        weighted(tail, y).backward()
        if optimizer.second_step():
            weighted(split(perturbed_forward(x), y)[1], y).backward()  # the paper's full-batch second forward
            optimizer.third_step()
        return (head + tail).detach(), logits.detach()

    def plain(x, y):
        """A step the schedule does not sharpen, known before the passes: SGD's passes."""
        logits = forward(x)
        if method == "imbsam":
            head, tail = split(logits, y)
            loss = head + tail
        else:
            loss = loss_fn(logits.float(), y)
        weighted(loss, y).backward()
        optimizer.plain_step()
        return loss.detach(), logits.detach()

    batch_norms = [m for m in tail_model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def tail_loss_of(xs, ys, n):
        with _autocast(xs, autocast_dtype):
            return split(tail_model(xs), ys, batch_size=n)[1]

    def imbsam_on_the_tail_samples(x, y):
        training = [m for m in batch_norms if m.training]
        if training:  # before any pass: the step is not taken
            raise ValueError(
                f"tail_passes='subset': the model has {len(training)} BatchNorm layer(s) in training mode, through "
                "whose batch statistics ImbSAM's tail gradient reaches every sample; the tail samples alone cannot "
                "give it (measured: scripts/tail_gradients.py, results/tail_passes/). Use a model without batch "
                "coupling (GroupNorm, LayerNorm: the trainer's resnet32-gn), BatchNorm in eval mode, or "
                "tail_passes='full'")
        logits = forward(x)
        head, tail = split(logits, y)
        weighted(head, y).backward()  # the head's graph alone: the tail's passes follow on its samples
        optimizer.first_step()
        index = split.tail_classes[y].nonzero().squeeze(1)  # the step's host sync
        def zero_tail_grads():
            for p in tail_model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)

        if index.numel() == 0:  # L_T = 0 here: g_T = g_T' = 0 and e = 0, the base step on g_H
            zero_tail_grads()
            if optimizer.second_step():
                zero_tail_grads()
                optimizer.third_step()
        else:
            xs, ys = x[index], y[index]
            weighted(tail_loss_of(xs, ys, y.numel()), y).backward()
            if optimizer.second_step():
                weighted(tail_loss_of(xs, ys, y.numel()), y).backward()
                optimizer.third_step()
        return (head + tail).detach(), logits.detach()

    steps = {"sgd": sgd, "sam": sam, "imbsam": imbsam_on_the_tail_samples if tail_passes == "subset" else imbsam}
    sharpened = steps[method]
    schedule = getattr(optimizer, "schedule", None)
    if schedule is None or schedule.needs_gradient:
        return sharpened

    def scheduled(x, y):
        return sharpened(x, y) if optimizer.sharpens() else plain(x, y)

    return scheduled


class GraphedStep:
    """A step captured once in a CUDA graph and replayed on new batches of the same shape.

    The first ``warmup`` calls run eagerly on a side stream (the CUDA-graph recipe: they
    allocate momentum buffers, backups and kernel caches); the next call captures.
    Inputs are copied into static buffers; the outputs are static tensors overwritten
    by every replay (clone them to keep them).
    """

    def __init__(self, step: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], warmup: int = 3):
        self.step = step
        self.warmup = warmup
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_x: Optional[Tensor] = None
        self.static_y: Optional[Tensor] = None
        self.outputs: Optional[tuple[Tensor, Tensor]] = None
        self._calls = 0

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.static_x is None:
            self.static_x, self.static_y = x.clone(), y.clone()
        elif x.shape != self.static_x.shape:
            raise ValueError(f"a captured step replays one batch shape {tuple(self.static_x.shape)}, got "
                             f"{tuple(x.shape)}; drop the last partial batch (drop_last=True)")
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        self._calls += 1
        if self._calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(self.static_x, self.static_y)
            torch.cuda.current_stream().wait_stream(side)
            return out
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.step(self.static_x, self.static_y)
        self.graph.replay()  # capture only records: run the step for this batch
        return self.outputs
