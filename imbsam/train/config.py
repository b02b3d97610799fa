"""The training CLI's options; the defaults are the paper's CIFAR-100-LT recipe (docs/algorithm.md)."""
from __future__ import annotations

import argparse
import math

from imbsam.backends import BACKENDS
from imbsam.train import sharpening
from imbsam.train.data.sources import DATASETS
from imbsam.train.models import MODELS
from imbsam.train.schedule import DEFAULT_LR_SCHEDULE, LR_SCHEDULE_OF_OLDER_RUNS, LR_SCHEDULES
from imbsam.train.step import METHODS, PERTURBED_BN_STATS, TAIL_PASSES

PAPER_SEED = 9826
# --compile's backends: torch's default compiler, and its debugging one (no code generated).
COMPILE_BACKENDS = ("inductor", "aot_eager")

# What runs recorded before an option existed used (their saved args lack it): the one
# place a checkpoint's or a metrics file's arguments are completed (resume, seed tables).
DEFAULTS_OF_OLDER_RUNS = {"lr_schedule": LR_SCHEDULE_OF_OLDER_RUNS, "perturbed_bn_stats": "update", "sync_bn": False,
                          "tail_passes": "full", "sharpness_schedule": sharpening.DEFAULT}


def as_recorded(args: dict) -> dict:
    """A run's recorded arguments, with what older runs used for the options they lack."""
    return {**DEFAULTS_OF_OLDER_RUNS, **args}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m imbsam.train",
        description="Train a long-tailed classifier with SGD, SAM or ImbSAM and report Many/Medium/Few/All "
                    "accuracy. Defaults are the paper's CIFAR-100-LT recipe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = ap.add_argument_group("data")
    d.add_argument("--dataset", default="cifar100-lt", choices=DATASETS)
    d.add_argument("--data-root", default=None,
                   help="folder holding cifar-*-python/ or the Fashion-MNIST .gz files (default: ./data for CIFAR, "
                        "/usr/share/datasets/fashion-mnist for Fashion-MNIST)")
    d.add_argument("--imb-factor", type=float, default=100.0, help="largest / smallest class size")
    d.add_argument("--no-download", action="store_true", help="never download; fail if no copy is found")
    d.add_argument("--skip-checksum", action="store_true", help="accept CIFAR files whose md5 differs")
    m = ap.add_argument_group("model and optimizer")
    m.add_argument("--model", default="resnet34", choices=MODELS)
    m.add_argument("--opt", default="imbsam", choices=METHODS)
    m.add_argument("--rho", type=float, default=0.05)
    m.add_argument("--eta", type=float, default=None,
                   help="ImbSAM's tail threshold: classes with fewer training images are tail (default n_max/25)")
    m.add_argument("--tail-weight", type=float, default=2.0, help="factor on the tail loss (the paper's loop: 2)")
    m.add_argument("--backend", default="auto", choices=BACKENDS, help="imbsam backend (auto: the fastest usable)")
    m.add_argument("--lr", type=float, default=0.01)
    m.add_argument("--momentum", type=float, default=0.9)
    m.add_argument("--weight-decay", type=float, default=1e-3)
    m.add_argument("--lr-schedule", default=DEFAULT_LR_SCHEDULE, choices=LR_SCHEDULES,
                   help="cosine to 0 over the epochs, stepped as the paper's loop does (before each epoch: epochs "
                        "at lr(1)..lr(T), the last at 0) or as torch documents (after each epoch: lr(0)..lr(T-1))")
    m.add_argument("--perturbed-bn-stats", default=PERTURBED_BN_STATS[0], choices=PERTURBED_BN_STATS,
                   help="whether SAM's and ImbSAM's forward at the perturbed weights updates BatchNorm's running "
                        "statistics (update: the paper's recipe) or leaves them as the first forward left them")
    m.add_argument("--tail-passes", default=TAIL_PASSES[0], choices=TAIL_PASSES,
                   help="ImbSAM's tail backward and its forward and backward at the perturbed weights on the whole "
                        "batch (full: the paper's) or on the batch's tail samples alone (subset: about one SGD "
                        "iteration's cost plus the tail's share; the same step without BatchNorm, an approximation "
                        "with it; one host sync a step, so not with --cuda-graph)")
    m.add_argument("--sharpness-schedule", default=sharpening.DEFAULT, metavar="SPEC",
                   help="which steps of SAM and ImbSAM sharpen; the others are plain SGD steps with one forward "
                        "and one backward (aesam: ImbSAM's tail backward too). "
                        + "; ".join(f"{k}: {v}" for k, v in sharpening.SPECS.items())
                        + ". Not with --cuda-graph (the host decides which passes run)")
    m.add_argument("--sync-bn", action="store_true",
                   help="under torchrun, normalise BatchNorm over the global batch (torch's SyncBatchNorm, CUDA "
                        "only), as one process does; without it each rank normalises its own share")
    t = ap.add_argument_group("run")
    t.add_argument("--epochs", type=int, default=200)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--seed", type=int, default=PAPER_SEED)
    t.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    t.add_argument("--amp", default="none", choices=["none", "bf16"], help="bf16 autocast for the forward passes")
    t.add_argument("--channels-last", action="store_true")
    t.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="on CUDA, keep cuDNN's default convolution algorithms instead of timing them once (the "
                        "batch shapes are fixed, so timing them usually pays)")
    t.add_argument("--cuda-graph", action="store_true",
                   help="capture the whole step in a CUDA graph (drops the last partial batch of each epoch)")
    t.add_argument("--compile", nargs="?", const="inductor", default=None, choices=COMPILE_BACKENDS,
                   help="torch.compile the model with this backend (--compile alone: inductor; ImbSAM's through "
                        "imbsam.retain_graph_backend, for its two backward passes through one forward); the first "
                        "steps take longer. Not with --cuda-graph, nor under torchrun")
    t.add_argument("--eval-every", type=int, default=1, help="test every N epochs (and always after the last)")
    t.add_argument("--out", default="runs/train", help="output folder: checkpoint, metrics, plots, log")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--max-epochs-this-run", type=int, default=None,
                   help="stop after this many epochs (resume later): splits a long run into sessions")
    t.add_argument("--time-limit-s", type=float, default=None,
                   help="stop (with a checkpoint, to resume later) before an epoch that would end later than this "
                        "many seconds after the run started (data loading included), judged by the slowest epoch "
                        "so far")
    t.add_argument("--checkpoint-every", type=int, default=1,
                   help="write OUT/checkpoint.pt every N epochs (and always after the last one and when stopping "
                        "early); a ResNet-34 checkpoint is ~170 MB")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch)")
    t.add_argument("--allow-divergence", action="store_true",
                   help="go on when an epoch's training loss is not finite or over 100 x ln(classes), or a weight "
                        "is not finite (by default the run stops there with an error, keeping the last checkpoint, "
                        "of a sound epoch)")
    return ap


# The numeric options and what each must be: (option, attribute, lowest allowed, whether the
# lowest itself is allowed). Checked before anything is loaded or written; NaN and
# infinities are refused for every float.
BOUNDS = (
    ("--epochs", "epochs", 1, True), ("--batch-size", "batch_size", 1, True),
    ("--eval-every", "eval_every", 1, True), ("--checkpoint-every", "checkpoint_every", 1, True),
    ("--max-epochs-this-run", "max_epochs_this_run", 1, True), ("--time-limit-s", "time_limit_s", 0, False),
    ("--imb-factor", "imb_factor", 1, True), ("--rho", "rho", 0, True), ("--eta", "eta", 0, False),
    ("--tail-weight", "tail_weight", 0, True), ("--lr", "lr", 0, True), ("--momentum", "momentum", 0, True),
    ("--weight-decay", "weight_decay", 0, True),
)


def validate(args: argparse.Namespace) -> None:
    for option, attr, low, inclusive in BOUNDS:
        value = getattr(args, attr)
        if value is None:  # an optional one left unset
            continue
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            relation = ">=" if inclusive else ">"
            raise SystemExit(f"{option} must be a finite number {relation} {low:g}, got {value!r}")
    sharpening.parse(args.sharpness_schedule)
    # Heavy-ball momentum sums past gradients with weights momentum^k: from 1 on they never fade.
    if args.momentum >= 1:
        raise SystemExit(f"--momentum must be in [0, 1) (the paper's is 0.9), got {args.momentum!r}")
    # Each step multiplies the weights by 1 - lr * weight_decay: from 1 on it flips their sign.
    if args.lr * args.weight_decay >= 1:
        raise SystemExit(f"--lr x --weight-decay must be < 1 (each step scales the weights by 1 - lr x weight "
                         f"decay), got {args.lr:g} x {args.weight_decay:g} = {args.lr * args.weight_decay:g}")
