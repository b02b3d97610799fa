"""Why ImbSAM's tail passes on the tail samples alone refuse BatchNorm: how far their
tail-loss gradient is from the whole batch's, with the tail samples normalised by their own
batch statistics or by the whole batch's held constant (the two stand-ins tried; both also
trained badly: results/tail_passes/*.log).

ResNet-32 (trainer's), Fashion-MNIST-LT-shaped batches of 64 (labels drawn with the IF-100
profile's frequencies), at initialisation and after 50 SGD steps on such batches; per
batch with tail samples, ||g - g_full|| / ||g_full|| of the tail loss's gradient at w.

    python scripts/tail_gradients.py [--out results/tail_passes/tail_gradient_error_resnet32.json]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

from bench_tail_passes import FMNIST_N_MAX, long_tailed_batches  # noqa: E402

import imbsam  # noqa: E402
from imbsam.batch_norm import frozen_running_stats  # noqa: E402
from imbsam.train.checkpoint import write_json  # noqa: E402
from imbsam.train.data import long_tail_counts  # noqa: E402
from imbsam.train.models import build_model  # noqa: E402


class BatchStatistics:
    """Each BatchNorm layer's batch mean and (biased) variance in one forward (``recorded``),
    used as constants to normalise later forwards (``applied``): eval mode with them
    standing in for the running statistics."""

    def __init__(self):
        self.stats = {}

    @staticmethod
    def layers(model):
        return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    @contextlib.contextmanager
    def recorded(self, model):
        def record(layer, args):
            x = args[0].detach().float()
            var, mean = torch.var_mean(x, dim=[d for d in range(x.dim()) if d != 1], correction=0)
            self.stats[layer] = (mean, var)
        handles = [layer.register_forward_pre_hook(record) for layer in self.layers(model)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def applied(self, model):
        def normalise(layer, x):
            mean, var = self.stats[layer]
            return F.batch_norm(x, mean, var, layer.weight, layer.bias, False, 0.0, layer.eps)
        for layer in self.layers(model):
            layer.forward = functools.partial(normalise, layer)
        try:
            yield
        finally:
            for layer in self.layers(model):
                del layer.forward


def tail_gradients(model, split, x, y):
    """The tail loss's gradient: whole batch; tail samples by their own statistics; by the batch's."""
    params = [p for p in model.parameters() if p.requires_grad]
    index = split.tail_classes[y].nonzero().squeeze(1)
    stats = BatchStatistics()
    with frozen_running_stats(model), stats.recorded(model):
        full = torch.autograd.grad(split(model(x), y)[1], params)
    with frozen_running_stats(model):
        own = torch.autograd.grad(split(model(x[index]), y[index], batch_size=y.numel())[1], params)
    with stats.applied(model):
        batch = torch.autograd.grad(split(model(x[index]), y[index], batch_size=y.numel())[1], params)
    return full, own, batch


def relative_error(g, want) -> float:
    num = sum(((a - b).double() ** 2).sum() for a, b in zip(g, want)).sqrt()
    return float(num / sum((b.double() ** 2).sum() for b in want).sqrt())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--out", default="results/tail_passes/tail_gradient_error_resnet32.json")
    args = ap.parse_args(argv)
    counts = long_tail_counts(FMNIST_N_MAX, 10, 100)
    split = imbsam.HeadTailLoss(counts)
    torch.manual_seed(0)
    model = build_model("resnet32", 10, 1)
    data = long_tailed_batches(counts, 64, args.batches + 50, torch.device("cpu"), seed=1)
    rows = {}
    for when in ("initialisation", "after 50 SGD steps"):
        if when != "initialisation":
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            for x, y in data[args.batches:]:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        own, batch = [], []
        for x, y in data[:args.batches]:
            if not bool(split.tail_classes[y].any()):
                continue
            full, g_own, g_batch = tail_gradients(model, split, x, y)
            own.append(relative_error(g_own, full))
            batch.append(relative_error(g_batch, full))
        rows[when] = dict(batches_with_tail=len(own), own_statistics_median=statistics.median(own),
                          own_statistics_max=max(own), batch_statistics_median=statistics.median(batch),
                          batch_statistics_max=max(batch))
        r = rows[when]
        print(f"{when:20s} {len(own)} batches with tail samples: ||g - g_full|| / ||g_full|| of the tail gradient: "
              f"own statistics median {r['own_statistics_median']:.3f} (max {r['own_statistics_max']:.3f}), "
              f"the batch's median {r['batch_statistics_median']:.3f} (max {r['batch_statistics_max']:.3f})")
    result = dict(what="relative error of ImbSAM's tail-loss gradient from the tail samples alone, against the whole "
                       "batch's, ResNet-32 with BatchNorm, Fashion-MNIST-LT-shaped batches of 64", rows=rows,
                  torch=torch.__version__, date=datetime.date.today().isoformat(),
                  command="python scripts/tail_gradients.py")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
