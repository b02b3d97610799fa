"""A whole training iteration (forward, backward(s), optimizer): SGD, SAM and ImbSAM.

ResNet-34 with a CIFAR stem on 32x32 batches (the paper's setting; --model resnet32 for
the light standard). Variants:
  eager  fp32, as the paper's loop runs; SAM/ImbSAM on the reference and fused backends
  fast   bf16 autocast, channels-last and the whole step captured in a CUDA graph
         (fused backends only: the reference path reads the skip flag on the host)

    python benchmarks/bench_train_iter.py --device cuda --out runs/bench/train_iter.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imbsam  # noqa: E402
from imbsam.train.data import long_tail_counts  # noqa: E402
from imbsam.train.models import resnet32, resnet34_cifar  # noqa: E402
from imbsam.train.step import GraphedStep, make_step  # noqa: E402

from bench_common import machine_info, median_ms, record_meta, write_records  # noqa: E402

MODELS = {"resnet34": ("ResNet-34 (CIFAR stem)", resnet34_cifar), "resnet32": ("ResNet-32", resnet32)}


def build(model_name, method, backend, variant, device, num_classes):
    torch.manual_seed(0)
    model = MODELS[model_name][1](num_classes).to(device)
    graphed = variant == "fast"
    if graphed:
        model = model.to(memory_format=torch.channels_last)
    # A device tensor lr: a captured graph reads it, so schedulers keep working after capture.
    lr = torch.tensor(0.01, device=device) if graphed else 0.01
    kw = dict(lr=lr, momentum=0.9, weight_decay=1e-3)
    if method == "sgd":  # torch's own fused SGD: no host sync with a tensor lr
        opt = torch.optim.SGD(model.parameters(), fused=graphed and device.type == "cuda", **kw)
    elif method == "sam":
        opt = imbsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, backend=backend, **kw)
    else:
        opt = imbsam.ImbSAM(model.parameters(), torch.optim.SGD, rho=0.05, backend=backend, **kw)
    split = imbsam.HeadTailLoss(long_tail_counts(500, num_classes, 100)).to(device)
    step = make_step(method, model, opt, split, autocast_dtype=torch.bfloat16 if graphed else None)
    return GraphedStep(step) if graphed else step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="resnet34", choices=list(MODELS),
                    help="resnet34: the paper's model (the targets); resnet32: the light standard")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--variants", default="eager,fast")
    ap.add_argument("--methods", default="sgd,sam,imbsam")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-cudnn-benchmark", action="store_true",
                    help="keep cuDNN's default algorithm choice (autotuning is on by default, as in the trainer)")
    ap.add_argument("--out", default="runs/bench/train_iter.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    # Fixed shapes: let cuDNN time its convolution algorithms once (the warmup absorbs it).
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    fused = imbsam.backends.backends_for(device.type, fast_only=True, emulated=False)
    info = machine_info(device)
    print(f"{MODELS[args.model][0]}, batch {args.batch}, on {info.get('gpu') or info.get('cpu')}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(device)
    records = []
    for variant in args.variants.split(","):
        if variant == "fast" and device.type != "cuda":
            print("  (the fast variant needs CUDA graphs: skipped)")
            continue
        xv = x.to(memory_format=torch.channels_last) if variant == "fast" else x
        for method in args.methods.split(","):
            names = ["torch"] if method == "sgd" else (fused if variant == "fast" else ["reference"] + fused)
            for backend in names:
                step = build(args.model, method, backend, variant, device, args.num_classes)
                ms = median_ms(lambda: step(xv, y), device, args.reps, warmup=5)
                print(f"  {variant:5s} {method:7s} {backend:10s} {ms:8.2f} ms/iter")
                records.append(dict(bench="train_iter", model=args.model, batch=args.batch, variant=variant,
                                    dtype="bfloat16-autocast" if variant == "fast" else "float32", method=method,
                                    backend=backend, ms=round(ms, 3), reps=args.reps, device=device.type,
                                    cudnn_benchmark=torch.backends.cudnn.benchmark, **info,
                                    **record_meta(argv)))
                step = None  # its model and optimizer freed before the next backend's
    write_records(args.out, records)


if __name__ == "__main__":
    main()
