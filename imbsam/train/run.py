"""A whole training run: data, model, optimizer, epochs, checkpoints, metrics, plots."""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

import torch

import imbsam
from imbsam import backends
from imbsam.train import sharpening
from imbsam.train.checkpoint import load_checkpoint, save_checkpoint, write_json
from imbsam.train.config import as_recorded, validate
from imbsam.train.data import ACCURACY_KEYS, shot_split
from imbsam.train.data.device_loader import DeviceLoader
from imbsam.train.data.sources import load_dataset
from imbsam.train.distributed import (
    ShardedLoader,
    agree,
    barrier,
    device_of_rank,
    from_environment,
    start,
    sum_over_ranks,
)
from imbsam.train.loop import group_accuracy, per_class_accuracy, train_epoch
from imbsam.train.models import BATCH_NORMALISED, build_model
from imbsam.train.report import format_table, plotting_unavailable, save_plots
from imbsam.train.schedule import cosine_schedule
from imbsam.train.step import GraphedStep, make_step

# Options that must match between a checkpoint and the run that resumes it.
RESUME_KEYS = ("dataset", "imb_factor", "model", "opt", "rho", "eta", "tail_weight", "lr", "momentum",
               "weight_decay", "lr_schedule", "epochs", "batch_size", "seed", "amp", "cuda_graph",
               "perturbed_bn_stats", "sync_bn", "tail_passes", "sharpness_schedule")


class Log:
    """Prints and appends to OUT/train.log (on rank 0 of a data-parallel run; the others are silent)."""

    def __init__(self, path: str, silent: bool = False):
        self.path, self.silent = path, silent

    def __call__(self, msg: str) -> None:
        if self.silent:
            return
        print(msg, flush=True)
        with open(self.path, "a") as f:
            f.write(msg + "\n")


# Where the trainer runs: the CPU, or a CUDA device (its kernels, graphs and timing are CUDA's).
DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise SystemExit(f"--device {name}: allowed are auto, cpu, cuda and cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# An epoch's mean training loss above this many times ln(C), a uniform guess's cross-entropy,
# means logits hundreds apart: a diverged run (a sound one starts near ln(C) and falls;
# overshoots at a high lr stay within ~10 times it).
DIVERGED_LOSS_OVER_UNIFORM = 100


def divergence(stats: dict, model: torch.nn.Module, num_classes: int) -> str | None:
    """How an epoch shows that training diverged (its mean loss not finite or far above a
    uniform guess's, or a weight not finite), or None."""
    loss, limit = stats["train_loss"], DIVERGED_LOSS_OVER_UNIFORM * math.log(max(num_classes, 2))
    if not math.isfinite(loss) or loss > limit:
        return f"the training loss is {loss:.4g}" + ("" if not math.isfinite(loss) else
                                                     f", over {DIVERGED_LOSS_OVER_UNIFORM} x ln({num_classes})")
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    return f"weights are not finite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})" if bad else None


def build_optimizer(args, model, device, steps_per_epoch: int):
    # A device tensor lr under CUDA graphs: the captured step reads it, the scheduler updates it.
    lr = torch.tensor(args.lr, device=device) if args.cuda_graph else args.lr
    kw = dict(lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if args.opt == "sgd":
        return torch.optim.SGD(model.parameters(), fused=args.cuda_graph, **kw)
    cls = imbsam.SAM if args.opt == "sam" else imbsam.ImbSAM
    schedule = sharpening.build(args.sharpness_schedule, args.seed, args.epochs * steps_per_epoch)
    return cls(model.parameters(), torch.optim.SGD, rho=args.rho, backend=args.backend, schedule=schedule, **kw)


def normalised_over_ranks(model: torch.nn.Module, sync_bn: bool, ranks) -> torch.nn.Module:
    """With ``sync_bn`` under several ranks, the model's BatchNorm layers as SyncBatchNorm:
    the same parameters and buffers in new layers, so the state_dict keys are unchanged."""
    if not (sync_bn and ranks.distributed):
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def data_parallel(args, model, optimizer, ranks, device):
    """What the steps run: the model itself, or under torchrun the model in DDP with the
    optimizer synchronised with it (imbsam.sync_data_parallel)."""
    if not ranks.distributed:
        return model
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.opt != "sgd":
        imbsam.sync_data_parallel(optimizer, net)
    return net


def compiled(net: torch.nn.Module, backend: str | None, opt: str) -> torch.nn.Module:
    """What the steps run, compiled with ``backend`` when one is given. ImbSAM backpropagates
    twice through one forward, which inductor refuses without imbsam.retain_graph_backend.
    The model itself is what is saved and tested (its state_dict keys are unchanged)."""
    if backend is None:
        return net
    return torch.compile(net, backend=imbsam.retain_graph_backend(backend) if opt == "imbsam" else backend)


def subset_tail_passes_problem(args) -> str | None:
    """Why ``--tail-passes subset`` cannot run with ``args``, or None."""
    if args.opt != "imbsam":
        return f"ImbSAM's option (its sharpness term is the tail loss), not --opt {args.opt}'s"
    if args.cuda_graph:
        return "the tail samples are counted on the host each step, which a CUDA graph cannot replay; drop --cuda-graph"
    if args.model in BATCH_NORMALISED:
        return (f"--model {args.model} normalises with BatchNorm, through whose batch statistics ImbSAM's tail "
                "gradient reaches every sample, which the tail samples alone cannot give (imbsam/train/README.md); "
                "use --model resnet32-gn (GroupNorm), or --tail-passes full")
    return None


def current_lr(optimizer) -> float:
    lr = optimizer.param_groups[0]["lr"]
    return float(lr)


def run(args: argparse.Namespace) -> dict | None:
    """Trains as ``args`` say; returns the final metrics (None when stopped early to resume)."""
    started = time.perf_counter()  # --time-limit-s counts data loading and model building too
    validate(args)
    ranks = from_environment()
    if args.batch_size % ranks.world:  # before joining the group: a refusal should not wait for the others
        raise SystemExit(f"--batch-size {args.batch_size} is the global batch: it must be a multiple of the "
                         f"{ranks.world} ranks, each of which trains on an equal share")
    device = device_of_rank(ranks, resolve_device(args.device))
    if args.sync_bn and ranks.distributed and device.type != "cuda":  # torch's SyncBatchNorm would fail mid-step
        raise SystemExit(f"--sync-bn: torch's SyncBatchNorm runs on CUDA devices only, and this run is on {device}; "
                         "without --sync-bn each rank's BatchNorm normalises its share of the batch")
    if args.tail_passes == "subset":
        why = subset_tail_passes_problem(args)
        if why:
            raise SystemExit(f"--tail-passes subset: {why}")
    if args.sharpness_schedule != sharpening.DEFAULT and (args.opt == "sgd" or args.cuda_graph):
        raise SystemExit(f"--sharpness-schedule {args.sharpness_schedule}: "
                         + ("it chooses which steps of SAM and ImbSAM sharpen; --opt sgd never does"
                            if args.opt == "sgd" else "the host decides which passes a step runs, which a CUDA "
                            "graph cannot replay; drop --cuda-graph"))
    if args.compile and (args.cuda_graph or ranks.distributed):  # neither combination has run yet
        raise SystemExit(f"--compile {args.compile}: not together with "
                         f"{'--cuda-graph' if args.cuda_graph else f'{ranks.world} ranks'} (not tested); "
                         "use one or the other")
    started_group = start(ranks, device)
    # On an error the process exits with it and the launcher stops the other ranks: a
    # barrier here could wait for ranks that will never come.
    result = _run(args, started, ranks, device)
    if started_group:
        barrier(ranks)
        torch.distributed.destroy_process_group()
    return result


def _run(args: argparse.Namespace, started: float, ranks, device: torch.device) -> dict | None:
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit("--cuda-graph needs a CUDA device")
    if args.opt != "sgd":  # before the data load: a wrong backend should cost no time
        try:
            backends.check_backend_name(args.backend)
            backends.resolve(args.backend, device)
        except ValueError as exc:
            raise SystemExit(f"--backend {args.backend}: {exc}") from None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    if ranks.main:
        os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if os.path.exists(ckpt_path) and not args.resume:
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    log_path = os.path.join(args.out, "train.log")
    if os.path.exists(log_path) and not os.path.exists(ckpt_path):
        # Another run's log (one that stopped before its first checkpoint): appending to it
        # would mix two runs in one record.
        raise SystemExit(f"{log_path} exists but no checkpoint does: {args.out} holds another run; choose another "
                         "--out, or remove that folder to start afresh")
    barrier(ranks)  # every rank has checked the folder before rank 0 writes to it
    log = Log(log_path, silent=not ranks.main)
    no_plots = plotting_unavailable()
    if no_plots:  # said before the training, so that nobody waits for plots that will not come
        log(f"warning: {no_plots}")

    try:
        data = load_dataset(args.dataset, args.data_root, args.imb_factor, download=not args.no_download,
                            verify=not args.skip_checksum)
    except (FileNotFoundError, ValueError) as exc:  # no copy, a damaged one, or too few images per class
        raise SystemExit(f"--dataset {args.dataset}: {exc}") from None
    counts, groups = data.counts, shot_split(data.counts)
    eta = args.eta if args.eta is not None else max(counts) / 25
    args.eta = eta
    split = imbsam.HeadTailLoss(counts, threshold=eta, tail_weight=args.tail_weight).to(device)

    torch.manual_seed(args.seed)
    model = normalised_over_ranks(build_model(args.model, data.num_classes, data.channels).to(device), args.sync_bn,
                                  ranks)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    train_loader = DeviceLoader(data.train_x, data.train_y, args.batch_size, data.mean, data.std, device, train=True,
                                generator=generator, drop_last=args.cuda_graph, channels_last=args.channels_last)
    optimizer = build_optimizer(args, model, device, len(train_loader))
    net = compiled(data_parallel(args, model, optimizer, ranks, device), args.compile, args.opt)
    scheduler = cosine_schedule(optimizer, args.epochs, args.lr_schedule)
    test_loader = DeviceLoader(data.test_x, data.test_y, 500, data.mean, data.std, device, train=False,
                               channels_last=args.channels_last)
    amp = torch.bfloat16 if args.amp == "bf16" else None
    shards = ShardedLoader(train_loader, ranks) if ranks.distributed else None
    step = make_step(args.opt, net, optimizer, split, autocast_dtype=amp, perturbed_bn_stats=args.perturbed_bn_stats,
                     loss_weight=shards.loss_weight if shards else None, tail_passes=args.tail_passes)
    if args.cuda_graph:
        step = GraphedStep(step)

    start_epoch, history, wall = 0, [], 0.0
    if args.resume:
        ck = load_checkpoint(ckpt_path, device)
        saved = as_recorded(ck["args"])
        mismatched = [k for k in RESUME_KEYS if saved.get(k) != getattr(args, k)]
        if mismatched:
            raise SystemExit("--resume with options that differ from the checkpoint's: " + ", ".join(
                f"{k}={getattr(args, k)!r} (checkpoint: {saved.get(k)!r})" for k in mismatched))
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        generator.set_state(ck["data_rng"].cpu())  # generator states are CPU byte tensors
        torch.set_rng_state(ck["torch_rng"].cpu())
        start_epoch, history, wall = ck["epoch"], ck["history"], ck["wall_s"]
        log(f"resumed from {ckpt_path} after epoch {start_epoch}")

    n_params = sum(p.numel() for p in model.parameters())
    backend = "-" if args.opt == "sgd" else optimizer.backend_for(device)
    log(f"{data.name} (IF {args.imb_factor:g}): {len(data.train_y)} training images in {data.num_classes} classes "
        f"({counts[0]} ... {counts[-1]}), {len(data.test_y)} test images; tail classes (n < {eta:g}): "
        f"{int(split.tail_classes.sum())}; {args.model} ({n_params / 1e6:.2f} M parameters) on {device}; "
        f"{args.opt} (backend {backend}), {args.epochs} epochs (cosine lr, {args.lr_schedule}'s order), "
        f"batch {args.batch_size}" + (f" over {ranks.world} ranks" if ranks.distributed else "")
        + (f"; the model compiled with {args.compile} (its first steps compile)" if args.compile else "")
        + ("; ImbSAM's tail passes on the tail samples only" if args.tail_passes == "subset" else "")
        + (f"; sharpening {sharpening.describe(args.sharpness_schedule)}"
           if args.sharpness_schedule != sharpening.DEFAULT else ""))

    stop_after = None if args.max_epochs_this_run is None else start_epoch + args.max_epochs_this_run
    slowest_epoch_s = 0.0
    schedule = getattr(optimizer, "schedule", None)
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        lr = current_lr(optimizer)
        counted = (schedule.steps, schedule.sharpened) if schedule is not None else None
        stats = train_epoch(step, shards or train_loader, lambda: current_lr(optimizer),
                            progress=not args.no_progress and ranks.main, desc=f"epoch {epoch + 1}/{args.epochs}",
                            sum_over_ranks=lambda t: sum_over_ranks(ranks, t), world=ranks.world)
        scheduler.step()
        record = dict(epoch=epoch + 1, lr=lr, **stats)
        if counted is not None:  # what the epoch's passes cost: the share of its steps that sharpened
            record["sharpened"] = (schedule.sharpened - counted[1]) / max(schedule.steps - counted[0], 1)
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            per_class = per_class_accuracy(model, ShardedLoader(test_loader, ranks) if ranks.distributed
                                           else test_loader, data.num_classes, amp,
                                           sum_over_ranks=lambda t: sum_over_ranks(ranks, t))
            record.update(group_accuracy(per_class, groups), per_class=[round(float(a), 2) for a in per_class])
        record["epoch_s"] = time.perf_counter() - t0
        diverged = None if args.allow_divergence else divergence(stats, model, data.num_classes)
        if diverged:  # before this epoch's checkpoint: the last one written is of a sound epoch
            log(f"epoch {epoch + 1:3d}/{args.epochs}: {diverged}")
            raise SystemExit(f"stopped in epoch {epoch + 1}: {diverged}, so training diverged (a smaller --lr or --rho "
                             f"may help); {ckpt_path} holds the last sound epoch, if one ended; "
                             "--allow-divergence goes on instead")
        wall += record["epoch_s"]
        history.append(record)
        tested = (f" | test many {record['many']:.1f} medium {record['medium']:.1f} few {record['few']:.1f} "
                  f"all {record['all']:.1f}" if "all" in record else "")
        log(f"epoch {epoch + 1:3d}/{args.epochs} lr {lr:.2e} loss {stats['train_loss']:.4f} "
            f"acc {stats['train_acc']:5.1f} {stats['images_per_s']:7.0f} img/s {record['epoch_s']:6.1f} s"
            + (f" sharpened {100 * record['sharpened']:.0f} %" if "sharpened" in record else "") + tested)
        slowest_epoch_s = max(slowest_epoch_s, record["epoch_s"])
        last = epoch + 1 == args.epochs
        stop = None
        if not last and stop_after is not None and epoch + 1 >= stop_after:
            stop = "--max-epochs-this-run"
        elif not last and args.time_limit_s is not None and (
                time.perf_counter() - started + slowest_epoch_s > args.time_limit_s):
            stop = f"--time-limit-s {args.time_limit_s:g}: another epoch would not end in time"
        if ranks.distributed:  # rank 0's clock decides, so that every rank stops after the same epoch
            stop = (stop or "rank 0 stopped") if agree(ranks, stop is not None, device) else None
        if ranks.main and (stop or last or (epoch + 1) % args.checkpoint_every == 0):
            save_checkpoint(ckpt_path, dict(
                epoch=epoch + 1, model=model.state_dict(), optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), data_rng=generator.get_state(), torch_rng=torch.get_rng_state(),
                history=history, wall_s=wall, args=vars(args)))
        if ranks.main:
            write_json(os.path.join(args.out, "history.json"), history)
        if stop:
            log(f"stopped after epoch {epoch + 1} ({stop}); continue with the same command and --resume")
            return None
    return finish(args, data, counts, groups, history, wall, device, backend, log, ranks, optimizer)


def finish(args, data, counts, groups, history, wall, device, backend, log, ranks, optimizer) -> dict:
    final = history[-1]
    tested = [h for h in history if "all" in h]
    best = max(tested, key=lambda h: h["all"])
    metrics = dict(
        many=final["many"], medium=final["medium"], few=final["few"], all=final["all"],
        opt=args.opt, dataset=args.dataset, imb_factor=args.imb_factor, model=args.model, epochs=args.epochs,
        wall_s=round(wall, 1), device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        backend=backend, torch=torch.__version__, date=datetime.date.today().isoformat(),
        command="python -m imbsam.train " + " ".join(sys.argv[1:]),
        best_epoch_selected_on_test=dict(epoch=best["epoch"], **{k: best[k] for k in ACCURACY_KEYS}),
        per_class=final["per_class"], counts=counts, groups=groups, eta=args.eta, rho=args.rho,
        args={k: v for k, v in vars(args).items()}, world_size=ranks.world)
    schedule = getattr(optimizer, "schedule", None)
    if schedule is not None:
        metrics["sharpened"] = dict(steps=schedule.steps, sharpened=schedule.sharpened,
                                    fraction=round(schedule.sharpened / max(schedule.steps, 1), 4))
    if not ranks.main:
        return metrics
    write_json(os.path.join(args.out, "metrics.json"), metrics)
    plots = save_plots(metrics, history, args.out)
    if not plots:
        log(f"warning: {plotting_unavailable()}")
    log(format_table([(f"{args.opt}, final epoch {final['epoch']}", final),
                      (f"{args.opt}, best epoch {best['epoch']} (selected on test)", best)],
                     title=f"{data.name} (IF {args.imb_factor:g}), {args.model}, test accuracy (%)"))
    log(f"wrote {', '.join([os.path.join(args.out, 'metrics.json'), *plots])} ({wall:.0f} s of training)")
    return metrics
