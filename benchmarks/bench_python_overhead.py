"""The host-side cost of an optimizer step: Python and op dispatch, without kernel work.

Steps SAM and ImbSAM on a list of one-element tensors as long as a model's parameter
list (110 for ResNet-34), so what is timed is the per-parameter bookkeeping and the
dispatch of the ops; part "ops" times the step's op calls alone, without the optimizer.
On a GPU this is what an eager step costs the CPU (CUDA graphs remove it); it bounds the
step when it exceeds the kernels' time.

    python benchmarks/bench_python_overhead.py --out runs/bench/python_overhead.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imbsam  # noqa: E402
from bench_common import machine_info, record_meta, write_records  # noqa: E402
from param_lists import MODELS, model_shapes  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet34", choices=MODELS)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cpu", help="where the one-element tensors live (cuda: launch costs too)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="runs/bench/python_overhead.json")
    args = ap.parse_args(argv)
    n = len(model_shapes(args.model))
    device = torch.device(args.device)
    params = [torch.nn.Parameter(torch.zeros(1, device=device)) for _ in range(n)]
    grads = [torch.zeros(1, device=device) for _ in range(n)]
    info = machine_info(device)
    records = []
    for method, cls in (("sam", imbsam.SAM), ("imbsam", imbsam.ImbSAM)):
        opt = cls(params, torch.optim.SGD, rho=0.05, backend=args.backend, lr=0.1, momentum=0.9, weight_decay=1e-3)
        phases = ([opt.first_step, opt.second_step] if method == "sam"
                  else [opt.first_step, opt.second_step, opt.third_step])

        def step():
            for phase in phases:
                for p, g in zip(params, grads):
                    p.grad = g
                phase()

        backend = opt._engine.concrete_backend(device)
        ops = imbsam.backends.ops_for(backend)
        backups, bufs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        heads = grads if method == "imbsam" else []

        def ops_only():
            # The same step's op calls alone (norm, perturb, fused restore + SGD): what the
            # engine's own Python adds is the difference to the whole step.
            norm = ops.grad_norm(grads, [], [], 0.01)
            ops.perturb_(params, grads, backups, norm, 0.05, 0.01, False)
            ops.restore_sgd_step_(params, grads, backups, heads, bufs, 0.1, 0.9, 0.0, 1e-3, False, False, False,
                                  None, norm - norm)

        for part, fn in (("step", step), ("ops", ops_only)):
            us = host_us(fn, args.steps)  # host time: the GPU runs behind, asynchronously
            print(f"{method:7s} {part:4s} {n} tensors, backend {backend}: {us:6.0f} us of host time per step")
            records.append(dict(bench="python_overhead", part=part, model=args.model, n_tensors=n, dtype="float32",
                                method=method, backend=args.backend, us=round(us, 1), ms=round(us / 1e3, 4),
                                steps=args.steps, device=device.type, **info, **record_meta(argv)))
    write_records(args.out, records)


def host_us(fn, steps: int) -> float:
    for _ in range(10):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps * 1e6


if __name__ == "__main__":
    main()
