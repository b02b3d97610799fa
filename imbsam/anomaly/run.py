"""One Deep SAD setting: the autoencoder pre-training and the centre (once), then each
optimizer's training from them, with its test AUROC after every epoch.

Every optimizer starts from the same pre-trained network and centre and sees the same
batches in the same order, so their AUROCs differ by the optimizer alone (a paired
comparison). OUT/pretrain/ holds the pre-training, OUT/<opt>/ each optimizer's run;
each stage checkpoints after every epoch and resumes bitwise (``--resume``).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import statistics
import sys

import torch

import imbsam
from imbsam.anomaly.auroc import auroc
from imbsam.anomaly.config import OPTIMIZERS, known_anomaly_class, validate
from imbsam.anomaly.data import load_setting
from imbsam.anomaly.loss import centre_from, deep_sad_loss, head_tail_losses, squared_distance
from imbsam.anomaly.models import NETWORKS, build_autoencoder
from imbsam.train.checkpoint import load_checkpoint, save_checkpoint, write_json
from imbsam.train.data.device_loader import DeviceLoader
from imbsam.train.loop import train_epoch
from imbsam.train.run import Log, resolve_device
from imbsam.train.step import make_step

# What the pre-training depends on, and what each optimizer's run depends on besides: a
# resumed or reused stage must have been made with the same values. "data" is the
# fingerprint of the images and labels read, so that another --data-root is noticed.
SETTING_KEYS = ("dataset", "normal_class", "known_anomaly_class", "gamma_l", "gamma_p", "seed", "batch_size", "data")
PRETRAIN_KEYS = SETTING_KEYS + ("ae_lr", "ae_epochs", "ae_lr_milestone", "ae_weight_decay")
ADAM_KEYS = PRETRAIN_KEYS + ("eta", "lr", "epochs", "lr_milestone", "weight_decay")
SHARPNESS_KEYS = ADAM_KEYS + ("rho", "perturbed_bn_stats")
# What runs made before a key was recorded used.
DEFAULTS_OF_OLDER_RUNS = {"perturbed_bn_stats": "update"}


def train_keys(opt: str) -> tuple:
    return ADAM_KEYS if opt == "adam" else SHARPNESS_KEYS


def fingerprint(setting) -> str:
    """A short hash of the setting's images and labels, training and test."""
    h = hashlib.sha256()
    for t in (setting.train_x, setting.semi, setting.train_anomalous, setting.test_x, setting.test_y):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
STAGE_CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "data_rng", "history", "args")
PRETRAINED_KEYS = ("encoder", "centre", "history", "args")
TEST_BATCH = 1000


class Budget:
    """Epochs this process may still train (``--max-epochs-this-run``), over all stages."""

    def __init__(self, epochs: int | None):
        self.left = epochs

    def spend(self) -> None:
        if self.left is not None:
            self.left -= 1

    @property
    def spent(self) -> bool:
        return self.left is not None and self.left <= 0


def recorded(args: argparse.Namespace, keys: tuple) -> dict:
    return {k: getattr(args, k) for k in keys}


def mismatch(saved: dict, args: argparse.Namespace, keys: tuple) -> str | None:
    saved = {**DEFAULTS_OF_OLDER_RUNS, **saved}
    # A run recorded before the data's fingerprint was cannot be checked for it.
    keys = [k for k in keys if k != "data" or "data" in saved]
    wrong = [(f"other data (--data-root {args.data_root or 'default'}: fingerprint {args.data}, before: {saved[k]})"
              if k == "data" else f"--{k.replace('_', '-')} {getattr(args, k)!r} (before: {saved.get(k)!r})")
             for k in keys if saved.get(k) != getattr(args, k)]
    return ", ".join(wrong) or None


def loaders(setting, args, device, generator):
    """The shuffled training batches (images scaled to [0, 1], no augmentation: Deep SAD's)
    and the same images in order (for the centre)."""
    n = len(setting.semi)
    # BatchNorm cannot normalise a last batch of one sample: it is dropped.
    train = DeviceLoader(setting.train_x, setting.semi, args.batch_size, train=True, generator=generator,
                         augment=False, drop_last=n % args.batch_size == 1, mean=(0.0,), std=(1.0,), device=device)
    return train, in_order(setting.train_x, setting.semi, device)


def in_order(images, labels, device) -> DeviceLoader:
    """Every image once, in order, scaled to [0, 1] as the training batches are."""
    return DeviceLoader(images, labels, TEST_BATCH, mean=(0.0,), std=(1.0,), device=device, train=False)


def multistep(optimizer, milestone: int):
    """The lr drops tenfold after ``milestone`` epochs (0: never), the scheduler stepping after each epoch."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[milestone] if milestone else [], gamma=0.1)


def run_stage(name, folder, args, keys, model, optimizer, scheduler, step, epochs, loader, generator, device, log,
              budget, after_epoch=lambda record: None) -> list | None:
    """Trains ``epochs`` epochs (from the stage's checkpoint when resuming); returns the
    history, or None when the budget ran out first (the checkpoint holds the progress)."""
    path = os.path.join(folder, "checkpoint.pt")
    history, start = [], 0
    if os.path.exists(path):
        ck = load_checkpoint(path, device, STAGE_CHECKPOINT_KEYS)
        why = mismatch(ck["args"], args, keys)
        if why:
            raise SystemExit(f"--resume: {path} was made with other options: {why}")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        generator.set_state(ck["data_rng"].cpu())
        history, start = ck["history"], ck["epoch"]
        log(f"{name}: resumed after epoch {start}")
    for epoch in range(start, epochs):
        if budget.spent:
            return None
        lr = float(optimizer.param_groups[0]["lr"])
        stats = train_epoch(step, loader, lambda: float(optimizer.param_groups[0]["lr"]),
                            progress=not args.no_progress, desc=f"{name} {epoch + 1}/{epochs}", accuracy=False)
        scheduler.step()
        if not math.isfinite(stats["train_loss"]):
            raise SystemExit(f"{name}: the training loss of epoch {epoch + 1} is {stats['train_loss']}: training "
                             f"diverged (a smaller --lr or --rho may help); {path} holds the last sound epoch")
        record = dict(epoch=epoch + 1, lr=lr, **stats)
        after_epoch(record)
        history.append(record)
        log(f"{name} epoch {epoch + 1:3d}/{epochs} lr {lr:.1e} loss {stats['train_loss']:.5f} "
            f"{stats['train_s']:5.1f} s" + "".join(f" {k} {record[k]:.4f}" for k in ("auroc",) if k in record))
        save_checkpoint(path, dict(epoch=epoch + 1, model=model.state_dict(), optimizer=optimizer.state_dict(),
                                   scheduler=scheduler.state_dict(), data_rng=generator.get_state(), history=history,
                                   args=recorded(args, keys)))
        budget.spend()
    return history


def pretrain(args, setting, device, log, budget) -> dict | None:
    """The pre-trained encoder's weights and the centre (``OUT/pretrain/pretrained.pt``),
    made once and reused by every optimizer; None when the budget ran out first."""
    folder = os.path.join(args.out, "pretrain")
    done = os.path.join(folder, "pretrained.pt")
    if os.path.exists(done):
        pre = load_checkpoint(done, device, PRETRAINED_KEYS)
        why = mismatch(pre["args"], args, PRETRAIN_KEYS)
        if why:
            raise SystemExit(f"{done} was pre-trained with other options: {why}; choose another --out")
        return pre
    torch.manual_seed(args.seed)
    ae = build_autoencoder(args.dataset).to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    train, ordered = loaders(setting, args, device, generator)
    history = []
    if args.ae_epochs:
        optimizer = torch.optim.Adam(ae.parameters(), lr=args.ae_lr, weight_decay=args.ae_weight_decay)
        scheduler = multistep(optimizer, args.ae_lr_milestone)
        reconstruction = lambda out, x: (out - x).pow(2).mean()  # noqa: E731  (the images are their own targets)
        step = make_step("sgd", ae, optimizer, loss_fn=reconstruction)
        history = run_stage("pretrain", folder, args, PRETRAIN_KEYS, ae, optimizer, scheduler,
                            lambda x, _: step(x, x), args.ae_epochs, train, generator, device, log, budget)
        if history is None:
            return None
    pre = dict(encoder=ae.encoder.state_dict(), centre=centre(ae.encoder, ordered), history=history,
               args=recorded(args, PRETRAIN_KEYS))
    save_checkpoint(done, pre)
    log(f"pretrain: the centre has {len(pre['centre'])} coordinates, |c| = {float(pre['centre'].norm()):.3f}")
    return pre


@torch.no_grad()
def embeddings(encoder, ordered) -> list[torch.Tensor]:
    """phi(x) of each batch of ``ordered``, in order, the network in eval mode."""
    was = encoder.training
    encoder.eval()
    try:
        return [encoder(x).float() for x, _ in ordered]
    finally:
        encoder.train(was)


def centre(encoder, ordered) -> torch.Tensor:
    """The mean embedding of the training set (the network in eval mode), nudged off 0."""
    return centre_from(sum(z.sum(0) for z in embeddings(encoder, ordered)) / len(ordered.labels))


def test_aurocs(encoder, c, setting, test_images) -> dict:
    """AUROC on the test set (``test_images``: its loader, built once): normal against every
    anomaly class, against the known one alone, and against the classes no labelled
    anomaly came from. The anomaly score is ``||phi(x) - c||^2``."""
    s = torch.cat([squared_distance(z, c) for z in embeddings(encoder, test_images)]).cpu()
    y, normal = setting.test_y, setting.test_y == setting.normal_class
    known = y == setting.known_anomaly_class
    return dict(auroc=auroc(s, ~normal), auroc_known=auroc(s[normal | known], known[normal | known]),
                auroc_unknown=auroc(s[~known], ~normal[~known]))


def build_optimizer(opt: str, params, args):
    adam = dict(lr=args.lr, weight_decay=args.weight_decay)
    if opt == "adam":
        return torch.optim.Adam(params, **adam)
    if opt in ("sam", "asam"):
        return imbsam.SAM(params, torch.optim.Adam, rho=args.rho, adaptive=opt == "asam", backend=args.backend, **adam)
    return imbsam.ImbSAM(params, torch.optim.Adam, rho=args.rho, backend=args.backend, **adam)


def train_optimizer(opt, args, setting, pre, device, log, budget) -> dict | None:
    """One optimizer's Deep SAD training from the pre-trained network; its metrics, or None
    when the budget ran out first."""
    folder = os.path.join(args.out, opt)
    done = os.path.join(folder, "metrics.json")
    keys = train_keys(opt)
    if os.path.exists(done):
        with open(done) as f:
            metrics = json.load(f)
        why = mismatch(metrics["args"], args, keys)
        if why:
            raise SystemExit(f"{done} was trained with other options: {why}; choose another --out")
        return metrics
    encoder = NETWORKS[args.dataset][0]().to(device)
    encoder.load_state_dict(pre["encoder"])
    c = pre["centre"].to(device)
    optimizer = build_optimizer(opt, encoder.parameters(), args)
    scheduler = multistep(optimizer, args.lr_milestone)
    # The same seed for every optimizer: the same batches in the same order.
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    train, _ = loaders(setting, args, device, generator)
    test_images = in_order(setting.test_x, setting.test_y, device)  # on the device once, not every epoch
    loss_fn = lambda z, semi: deep_sad_loss(z, c, semi, args.eta)  # noqa: E731
    split = lambda z, semi: head_tail_losses(z, c, semi, args.eta)  # noqa: E731
    step = make_step("sgd" if opt == "adam" else "imbsam" if opt == "imbsam" else "sam", encoder, optimizer,
                     split=split, loss_fn=loss_fn, perturbed_bn_stats=args.perturbed_bn_stats)
    history = run_stage(opt, folder, args, keys, encoder, optimizer, scheduler, step, args.epochs, train,
                        generator, device, log, budget,
                        after_epoch=lambda record: record.update(test_aurocs(encoder, c, setting, test_images)))
    if history is None:
        return None
    final = history[-1]
    metrics = dict(opt=opt, **{k: final[k] for k in ("auroc", "auroc_known", "auroc_unknown")},
                   epoch_train_s=statistics.median(h["train_s"] for h in history), epochs=args.epochs,
                   ae_epochs=args.ae_epochs, counts=setting.counts(),
                   backend="-" if opt == "adam" else optimizer.backend_for(device),
                   device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   torch=torch.__version__, date=datetime.date.today().isoformat(),
                   command="python -m imbsam.anomaly " + " ".join(sys.argv[1:]), args=recorded(args, keys),
                   history=history)
    write_json(done, metrics)
    return metrics


def run(args: argparse.Namespace) -> dict | None:
    """Pre-trains, then trains each of ``args.opt``; returns {opt: metrics}, or None when
    stopped early (``--max-epochs-this-run``) to be resumed."""
    args.known_anomaly_class = known_anomaly_class(args)
    validate(args)
    device = resolve_device(args.device)
    if any(o != "adam" for o in args.opt):  # before the data load: a wrong backend should cost no time
        from imbsam import backends
        try:
            backends.check_backend_name(args.backend)
            backends.resolve(args.backend, device)
        except ValueError as exc:
            raise SystemExit(f"--backend {args.backend}: {exc}") from None
    started = [p for p in ("pretrain", *OPTIMIZERS) if os.path.isdir(os.path.join(args.out, p))]
    if started and not args.resume:
        raise SystemExit(f"{args.out} holds a run ({', '.join(started)}/): pass --resume to continue or extend it "
                         "(another --opt), or choose another --out")
    try:
        setting = load_setting(args.dataset, args.data_root, args.normal_class, args.known_anomaly_class,
                               args.gamma_l, args.gamma_p, args.seed, download=not args.no_download,
                               verify=not args.skip_checksum)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"--dataset {args.dataset}: {exc}") from None
    counts = setting.counts()
    if "imbsam" in args.opt and counts["labelled_anomalies"] == 0:  # before anything is written
        raise SystemExit(f"--opt imbsam: --gamma-l {args.gamma_l:g} of {counts['normal']} normal images gives no "
                         "labelled anomaly, so ImbSAM's tail would be empty and it would be Adam; raise --gamma-l")
    args.data = fingerprint(setting)
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "train.log"))
    log(f"{args.dataset}, normal class {args.normal_class}: {counts['normal']} normal training images, "
        f"{counts['unlabelled_anomalies']} unlabelled anomalies (gamma_p {args.gamma_p:g}), "
        f"{counts['labelled_anomalies']} labelled anomalies of class {args.known_anomaly_class} "
        f"(gamma_l {args.gamma_l:g}); {len(setting.test_y)} test images; {', '.join(args.opt)} on {device}")
    budget = Budget(args.max_epochs_this_run)
    pre = pretrain(args, setting, device, log, budget)
    results = {}
    for opt in args.opt:
        metrics = None if pre is None else train_optimizer(opt, args, setting, pre, device, log, budget)
        if metrics is None:
            log(f"stopped (--max-epochs-this-run {args.max_epochs_this_run}); continue with the same command and "
                "--resume")
            return None
        results[opt] = metrics
    log(format_results(results, args))
    return results


def format_results(results: dict, args) -> str:
    """The setting's table: AUROC per optimizer, and its training epoch's time as a ratio to Adam's."""
    base = results.get("adam", {}).get("epoch_train_s")
    lines = [f"{args.dataset}, normal class {args.normal_class}, labelled anomalies of class "
             f"{args.known_anomaly_class} (gamma_l {args.gamma_l:g}, gamma_p {args.gamma_p:g}), seed {args.seed}, "
             f"final epoch {args.epochs}: test AUROC (%)",
             f"{'optimizer':10s} {'all':>6s} {'known':>6s} {'novel':>6s} {'epoch s':>8s} {'x Adam':>7s}"]
    for opt, m in results.items():
        ratio = f"{m['epoch_train_s'] / base:7.2f}" if base else "      -"
        lines.append(f"{opt:10s} {100 * m['auroc']:6.2f} {100 * m['auroc_known']:6.2f} "
                     f"{100 * m['auroc_unknown']:6.2f} {m['epoch_train_s']:8.2f} {ratio}")
    return "\n".join(lines)
