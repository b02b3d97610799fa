"""``python -m imbsam.anomaly``'s options; the defaults are Deep SAD's Fashion-MNIST recipe
(the authors' README command: Adam, lr 1e-4 dropping to 1e-5 after 50 of 150 epochs,
batch 128, the autoencoder pre-trained for 150 epochs) and its scenario (i) setting
(5 % labelled anomalies of one class, no pollution)."""
from __future__ import annotations

import argparse
import math

from imbsam.anomaly.data import DATASETS, NUM_CLASSES
from imbsam.backends import BACKENDS
from imbsam.train.step import PERTURBED_BN_STATS

# The optimizers Deep SAD trains with here: its own (Adam) and Adam as the base of each sharpness method.
OPTIMIZERS = ("adam", "sam", "asam", "imbsam")
DEFAULT_OPTIMIZERS = ("adam", "sam", "imbsam")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m imbsam.anomaly",
        description="Deep SAD semi-supervised anomaly detection trained with Adam, SAM, ASAM or ImbSAM (the labelled "
                    "anomalies' loss as ImbSAM's tail); one autoencoder pre-training shared by every optimizer; "
                    "test AUROC per optimizer. Defaults: Deep SAD's Fashion-MNIST recipe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = ap.add_argument_group("setting")
    d.add_argument("--dataset", default="fmnist", choices=DATASETS)
    d.add_argument("--data-root", default=None, help="folder of the Fashion-MNIST .gz files (default: Debian's "
                   "/usr/share/datasets/fashion-mnist) or of cifar-10-batches-py/ (default: ./data)")
    d.add_argument("--no-download", action="store_true", help="never download a missing dataset")
    d.add_argument("--skip-checksum", action="store_true", help="use CIFAR files whose md5 is not the published one")
    d.add_argument("--normal-class", type=int, default=0, help=f"the normal class, 0 to {NUM_CLASSES - 1}")
    d.add_argument("--known-anomaly-class", type=int, default=None,
                   help="the class the labelled anomalies come from (default: the normal class + 1, mod 10)")
    d.add_argument("--gamma-l", type=float, default=0.05, help="share of labelled anomalies in the training set")
    d.add_argument("--gamma-p", type=float, default=0.0, help="share of (unlabelled) anomalies in the unlabelled data")
    m = ap.add_argument_group("method")
    m.add_argument("--opt", nargs="+", default=list(DEFAULT_OPTIMIZERS), choices=OPTIMIZERS,
                   help="the optimizers to train, one after another, from the same pre-trained network and centre")
    m.add_argument("--rho", type=float, default=0.05, help="SAM's, ASAM's and ImbSAM's neighbourhood radius")
    m.add_argument("--eta", type=float, default=1.0,
                   help="Deep SAD's weight of the labelled samples' terms (not the long-tailed trainer's --eta)")
    m.add_argument("--perturbed-bn-stats", default="update", choices=PERTURBED_BN_STATS,
                   help="whether SAM's and ImbSAM's forward at w + e updates BatchNorm's running statistics, which "
                        "score the test set: 'update' as the ImbSAM paper's loop does, 'keep' leaves them to the "
                        "forward at w (then rho 0 gives Adam's network exactly)")
    m.add_argument("--backend", default="auto", choices=BACKENDS, help="the sharpness methods' kernels")
    t = ap.add_argument_group("training (Deep SAD's network)")
    t.add_argument("--lr", type=float, default=1e-4, help="Adam's learning rate")
    t.add_argument("--epochs", type=int, default=150, help="Deep SAD's training epochs, per optimizer")
    t.add_argument("--lr-milestone", type=int, default=50, help="the epoch after which the lr drops tenfold (0: never)")
    t.add_argument("--batch-size", type=int, default=128, help="pre-training's and training's")
    t.add_argument("--weight-decay", type=float, default=5e-7, help="Adam's L2 term, as Deep SAD's")
    a = ap.add_argument_group("autoencoder pre-training (Adam)")
    a.add_argument("--ae-lr", type=float, default=1e-4, help="the autoencoder's Adam learning rate")
    a.add_argument("--ae-epochs", type=int, default=150,
                   help="0: no pre-training (the centre from the initial network)")
    a.add_argument("--ae-lr-milestone", type=int, default=50, help="the epoch after which its lr drops tenfold")
    a.add_argument("--ae-weight-decay", type=float, default=5e-4, help="the autoencoder's Adam L2 term")
    r = ap.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0, help="draws the setting's anomalies, the initial weights and batches")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--out", default="runs/anomaly", help="the run's folder: pretrain/ and one folder per optimizer")
    r.add_argument("--resume", action="store_true", help="continue the run in --out")
    r.add_argument("--max-epochs-this-run", type=int, default=None,
                   help="stop after this many epochs (pre-training's and every optimizer's counted together); "
                        "continue with --resume")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def known_anomaly_class(args) -> int:
    return (args.normal_class + 1) % NUM_CLASSES if args.known_anomaly_class is None else args.known_anomaly_class


def validate(args: argparse.Namespace) -> None:
    """Refuses, before anything is loaded or written, what the method does not admit."""
    bad = []
    for name in ("gamma_l", "gamma_p", "rho", "eta", "lr", "weight_decay", "ae_lr", "ae_weight_decay"):
        if not math.isfinite(getattr(args, name)):
            bad.append(f"--{name.replace('_', '-')} {getattr(args, name)} is not finite")
    if bad:
        raise SystemExit("; ".join(bad))
    if not 0 <= args.normal_class < NUM_CLASSES:
        bad.append(f"--normal-class {args.normal_class}: allowed 0 to {NUM_CLASSES - 1}")
    known = known_anomaly_class(args)
    if not 0 <= known < NUM_CLASSES or known == args.normal_class:
        bad.append(f"--known-anomaly-class {known}: allowed 0 to {NUM_CLASSES - 1}, other than the normal class")
    if not 0 <= args.gamma_l < 1:
        bad.append(f"--gamma-l {args.gamma_l:g}: a share, at least 0 and below 1")
    if not 0 <= args.gamma_p < 1:
        bad.append(f"--gamma-p {args.gamma_p:g}: a share, at least 0 and below 1")
    if "imbsam" in args.opt and args.gamma_l == 0:
        bad.append("--opt imbsam with --gamma-l 0: ImbSAM's sharpness term is the labelled anomalies' loss, and there "
                   "are none, so it would be Adam; set --gamma-l above 0 or drop imbsam")
    if len(set(args.opt)) != len(args.opt):
        bad.append(f"--opt {' '.join(args.opt)}: an optimizer named twice")
    if args.rho < 0:
        bad.append(f"--rho {args.rho:g}: a radius, at least 0")
    if args.eta <= 0:
        bad.append(f"--eta {args.eta:g}: Deep SAD's weight must be above 0")
    for name in ("lr", "ae_lr"):
        if getattr(args, name) <= 0:
            bad.append(f"--{name.replace('_', '-')} {getattr(args, name):g}: must be above 0")
    for name in ("weight_decay", "ae_weight_decay"):
        if getattr(args, name) < 0:
            bad.append(f"--{name.replace('_', '-')} {getattr(args, name):g}: must be at least 0")
    if args.epochs < 1:
        bad.append(f"--epochs {args.epochs}: at least 1")
    for name in ("ae_epochs", "lr_milestone", "ae_lr_milestone"):
        if getattr(args, name) < 0:
            bad.append(f"--{name.replace('_', '-')} {getattr(args, name)}: at least 0")
    if args.seed < 0:
        bad.append(f"--seed {args.seed}: at least 0")
    if args.batch_size < 2:  # BatchNorm in training mode normalises over the batch
        bad.append(f"--batch-size {args.batch_size}: at least 2 (the network's BatchNorm needs two samples)")
    if args.max_epochs_this_run is not None and args.max_epochs_this_run < 1:
        bad.append(f"--max-epochs-this-run {args.max_epochs_this_run}: at least 1")
    if bad:
        raise SystemExit("; ".join(bad))
