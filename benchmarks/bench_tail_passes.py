"""What a training iteration costs with ImbSAM's tail passes on the tail samples alone and
with sharpness schedules, beside SGD, SAM and the paper's ImbSAM, as ratios to SGD measured
in the same run.

A method is ``BASE`` or ``BASE@SCHEDULE``: BASE one of sgd, sam, imbsam, imbsam-tail (the
tail-sample passes), SCHEDULE a ``--sharpness-schedule`` of the trainer (``periodic:4``,
``bernoulli:0.25``, ``aesam``). A scheduled method's steps differ in cost, so every method is
timed as the mean over a run of consecutive steps (``--reps``, a multiple of the periods
timed), and the share of steps that sharpened is recorded beside it.

ResNet-32 with GroupNorm by default (``resnet32-gn``: the subset passes are exact only without
BatchNorm's batch coupling, and refuse it; ``--model resnet32`` times the other methods on
the BatchNorm model) on Fashion-MNIST-LT-shaped batches (1x28x28, 10 classes, labels drawn
with the long-tailed profile's class frequencies: at IF 100 the three tail classes hold
about 3 % of the images), the trainer's own steps (``imbsam.train.step.make_step``). The
methods are timed in interleaved rounds on the same batches, so that a slower minute of a
shared machine falls on all of them alike; the median over rounds is reported.

    python benchmarks/bench_tail_passes.py --device cpu --out runs/bench/tail_passes.json
    python benchmarks/bench_tail_passes.py --model resnet32 --methods sgd,imbsam,imbsam@periodic:8
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imbsam  # noqa: E402
from imbsam.train import sharpening  # noqa: E402
from imbsam.train.data import long_tail_counts  # noqa: E402
from imbsam.train.models import BATCH_NORMALISED, build_model  # noqa: E402
from imbsam.train.step import make_step  # noqa: E402

from bench_common import machine_info, record_meta, write_records  # noqa: E402

# base name -> (make_step's method, its tail_passes)
BASES = {"sgd": ("sgd", "full"), "sam": ("sam", "full"), "imbsam": ("imbsam", "full"),
         "imbsam-tail": ("imbsam", "subset")}
DEFAULT_METHODS = ("sgd", "sam", "imbsam", "imbsam-tail", "sam@periodic:2", "sam@aesam", "imbsam@periodic:4",
                   "imbsam@bernoulli:0.25", "imbsam@aesam", "imbsam-tail@periodic:4", "imbsam-tail@aesam")
FMNIST_N_MAX = 6000  # training images of each Fashion-MNIST class
# GroupNorm: the tail passes refuse BatchNorm's batch coupling. resnet32 (BatchNorm) times the
# methods that run on it, as trained in the committed 30-epoch comparison.
MODELS = ("resnet32-gn", "resnet32")


def parse_method(name: str) -> tuple[str, str]:
    """``(base, schedule spec)``; SystemExit naming what is allowed."""
    base, _, spec = name.partition("@")
    if base not in BASES or (spec and base == "sgd"):
        raise SystemExit(f"--methods: {name!r}; a method is BASE or BASE@SCHEDULE, BASE one of "
                         f"{', '.join(BASES)} (sgd without a schedule)")
    spec = spec or sharpening.DEFAULT
    sharpening.parse(spec)
    return base, spec


def build(name: str, model_name: str, counts: list, device: torch.device, backend: str, total_steps: int):
    base, spec = parse_method(name)
    method, tail_passes = BASES[base]
    torch.manual_seed(0)
    model = build_model(model_name, len(counts), 1).to(device)
    kw = dict(lr=0.01, momentum=0.9, weight_decay=1e-3)
    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), **kw)
    else:
        cls = imbsam.SAM if method == "sam" else imbsam.ImbSAM
        opt = cls(model.parameters(), torch.optim.SGD, rho=0.05, backend=backend,
                  schedule=sharpening.build(spec, seed=0, total_steps=total_steps), **kw)
    split = imbsam.HeadTailLoss(counts).to(device)
    return make_step(method, model, opt, split, tail_passes=tail_passes), getattr(opt, "schedule", None)


def mean_ms_per_step(step, batches, device: torch.device, n: int) -> float:
    """The mean time of ``n`` consecutive steps: a schedule's cheap and dear steps together."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step(*next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3 / n


def long_tailed_batches(counts: list, batch: int, n: int, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weights = torch.tensor(counts, dtype=torch.float64)
    return [(torch.randn(batch, 1, 28, 28, generator=gen).to(device),
             torch.multinomial(weights, batch, replacement=True, generator=gen).to(device)) for _ in range(n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=MODELS[0], choices=MODELS)
    ap.add_argument("--backend", default="auto", help="imbsam's backend for SAM and ImbSAM")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--imb-factor", type=float, default=100.0)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help="BASE or BASE@SCHEDULE, comma-separated; sgd must be one (the ratios are to it)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=8,
                    help="consecutive iterations per method in each round, timed together (a multiple of every "
                         "periodic schedule's period)")
    ap.add_argument("--out", default="runs/bench/tail_passes.json")
    args = ap.parse_args(argv)
    names = args.methods.split(",")
    for name in names:
        parse_method(name)
    if "sgd" not in names:
        raise SystemExit("--methods: sgd is missing (the ratios are to it)")
    tail = [n for n in names if parse_method(n)[0] == "imbsam-tail"]
    if tail and args.model in BATCH_NORMALISED:
        raise SystemExit(f"--methods {','.join(tail)}: the tail passes refuse --model {args.model}'s BatchNorm; "
                         "time them on resnet32-gn")
    device = torch.device(args.device)
    counts = long_tail_counts(FMNIST_N_MAX, 10, args.imb_factor)
    data = long_tailed_batches(counts, args.batch, args.reps, device)
    tail = imbsam.HeadTailLoss(counts).tail_classes
    tail_share = float(sum(tail[y].float().mean() for _, y in data) / len(data))
    info = machine_info(device)
    print(f"{args.model}, Fashion-MNIST-LT batches of {args.batch} (IF {args.imb_factor:g}: tail samples "
          f"{100 * tail_share:.1f} % of them), on {info.get('gpu') or info.get('cpu')}, {info['threads']} threads")
    warmup = max(4, args.reps)  # whole periods: the timed steps start where a period does
    built = {name: build(name, args.model, counts, device, args.backend, warmup + args.rounds * args.reps)
             for name in names}
    rounds = {name: [] for name in names}
    batches = {name: itertools.cycle(data) for name in names}  # every method steps on the same batches
    for name, (step, _) in built.items():
        mean_ms_per_step(step, batches[name], device, warmup)
    counted = {name: (s.steps, s.sharpened) if s is not None else None for name, (_, s) in built.items()}
    for _ in range(args.rounds):
        for name, (step, _) in built.items():
            rounds[name].append(mean_ms_per_step(step, batches[name], device, args.reps))
    ms = {name: statistics.median(r) for name, r in rounds.items()}
    records = []
    for name in names:
        ratio = ms[name] / ms["sgd"]
        schedule = built[name][1]
        sharpened = None if schedule is None else round(
            (schedule.sharpened - counted[name][1]) / (schedule.steps - counted[name][0]), 4)
        share = "" if sharpened is None else f", {100 * sharpened:.0f} % of steps sharpened"
        print(f"  {name:22s} {ms[name]:8.1f} ms/iter  {ratio:5.2f}x SGD   (rounds: "
              f"{', '.join(f'{t:.1f}' for t in rounds[name])}{share})")
        base, spec = parse_method(name)
        records.append(dict(bench="tail_passes", model=args.model, data="fmnist-lt-shaped", dtype="float32",
                            batch=args.batch,
                            imb_factor=args.imb_factor, tail_share=round(tail_share, 4), method=name,
                            schedule=spec, sharpened_share=1.0 if sharpened is None and base != "sgd" else sharpened,
                            backend="torch" if name == "sgd" else args.backend, ms=round(ms[name], 3),
                            ratio_to_sgd=round(ratio, 3), rounds_ms=[round(t, 3) for t in rounds[name]],
                            reps=args.reps, device=device.type, **info, **record_meta(argv)))
    write_records(args.out, records)
    return records


if __name__ == "__main__":
    main()
