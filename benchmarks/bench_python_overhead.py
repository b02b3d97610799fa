"""The host-side cost of an optimizer step: Python and op dispatch, without kernel work.

Steps SAM and ImbSAM on a list of one-element tensors as long as a model's parameter
list (110 for ResNet-34), so what is timed is the per-parameter bookkeeping and the
dispatch of the ops; part "ops" times the step's op calls alone, without the optimizer.
On a GPU this is what an eager step costs the CPU (CUDA graphs remove it); it bounds the
step when it exceeds the kernels' time.

--stub-launches replaces the Triton backend's kernel launches with a counted no-op, so
its host time is measured without the interpreter (on a CPU) or the GPU: what is left is
the Python of the op wrappers, the checks, the tables and the dispatch. With several
backends in one run the records compare them on the same machine at the same time.

    python benchmarks/bench_python_overhead.py --out runs/bench/python_overhead.json
    python benchmarks/bench_python_overhead.py --backends cpp,triton --stub-launches
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

import torch

# Without a GPU the Triton backend runs its kernels in Triton's interpreter (stubbed here
# with --stub-launches); the flag must be set before the kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imbsam  # noqa: E402
from imbsam.backends.triton import tables as triton_tables  # noqa: E402

from bench_common import machine_info, record_meta, write_records  # noqa: E402
from param_lists import MODELS, model_shapes  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet34", choices=MODELS)
    ap.add_argument("--backends", default="auto", help="comma-separated, timed one after another in this run")
    ap.add_argument("--stub-launches", action="store_true",
                    help="Triton's kernel launches become a counted no-op: its host time alone")
    ap.add_argument("--device", default="cpu", help="where the one-element tensors live (cuda: launch costs too)")
    ap.add_argument("--steps", type=int, default=300, help="steps per timing")
    ap.add_argument("--rounds", type=int, default=5, help="timings per configuration, interleaved; the median counts")
    ap.add_argument("--out", default="runs/bench/python_overhead.json")
    args = ap.parse_args(argv)
    n = len(model_shapes(args.model))
    device = torch.device(args.device)
    params = [torch.nn.Parameter(torch.zeros(1, device=device)) for _ in range(n)]
    grads = [torch.zeros(1, device=device) for _ in range(n)]
    info = machine_info(device)
    launches = [0]
    imbsam.available_backends()  # probe Triton with its real launcher before stubbing it
    if args.stub_launches:
        def count_launch(kernel, tables, *a, **meta):
            launches[0] += 1
        triton_tables.launch = count_launch
    records, configs = [], []
    for backend_name, (method, cls) in itertools.product(args.backends.split(","),
                                                         (("sam", imbsam.SAM), ("imbsam", imbsam.ImbSAM))):
        opt = cls(params, torch.optim.SGD, rho=0.05, backend=backend_name, lr=0.1, momentum=0.9, weight_decay=1e-3)
        phases = ([opt.first_step, opt.second_step] if method == "sam"
                  else [opt.first_step, opt.second_step, opt.third_step])

        def step():
            for phase in phases:
                for p, g in zip(params, grads):
                    p.grad = g
                phase()

        backend = opt.backend_for(device)
        stubbed = args.stub_launches and backend == "triton"
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
            configs.append((method, part, backend, stubbed, fn))
    # Rounds over all configurations, the median per configuration: this VM's speed drifts
    # by tens of percent over seconds, and a drift must not land on one backend alone.
    times: dict = {}
    for _ in range(args.rounds):
        for method, part, backend, _, fn in configs:
            launches[0] = 0
            times.setdefault((method, part, backend), []).append(host_us(fn, args.steps))  # the GPU runs behind
    for method, part, backend, stubbed, fn in configs:
        us = statistics.median(times[(method, part, backend)])
        launches[0] = 0
        fn()
        note = f" ({launches[0]} launches stubbed)" if stubbed else ""
        print(f"{method:7s} {part:4s} {n} tensors, backend {backend}: {us:6.0f} us of host time per step{note}")
        records.append(dict(bench="python_overhead", part=part, model=args.model, n_tensors=n, dtype="float32",
                            method=method, backend=backend, us=round(us, 1), ms=round(us / 1e3, 4),
                            steps=args.steps, rounds=args.rounds, device=device.type, stub_launches=stubbed,
                            launches_per_step=launches[0] if stubbed else None, **info, **record_meta(argv)))
    print_ratios(records)
    write_records(args.out, records)


def print_ratios(records) -> None:
    """Each backend's host time per part against the first backend's, from this run."""
    first = {}
    for r in records:
        key = (r["method"], r["part"])
        if key not in first:
            first[key] = r
        elif r["backend"] != first[key]["backend"]:
            print(f"{r['method']:7s} {r['part']:4s} {r['backend']} / {first[key]['backend']}: "
                  f"{r['us'] / first[key]['us']:.2f}x")


def host_us(fn, steps: int) -> float:
    for _ in range(10):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps * 1e6


if __name__ == "__main__":
    main()
