"""The host-side cost of an optimizer step: Python and op dispatch, without kernel work.

Steps SAM and ImbSAM, with SGD and with AdamW as the base optimizer (``--bases``), on a
list of one-element tensors as long as a model's parameter list (110 for ResNet-34), so
what is timed is the per-parameter bookkeeping and the dispatch of the ops; part "ops"
times the step's op calls alone (norm, perturb, the fused restore + base step), without
the optimizer.
On a GPU this is what an eager step costs the CPU (CUDA graphs remove it); it bounds the
step when it exceeds the kernels' time.

--stub-launches replaces the Triton backend's kernel launches with a counted no-op, so
its host time is measured without the interpreter (on a CPU) or the GPU: what is left is
the Python of the op wrappers, the checks, the tables and the dispatch. With several
backends in one run the records compare them on the same machine at the same time.

    python benchmarks/bench_python_overhead.py --out runs/bench/python_overhead.json
    python benchmarks/bench_python_overhead.py --backends cpp,triton --stub-launches
    python benchmarks/bench_python_overhead.py --bases adamw
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

# The base optimizers timed, with their options: the engine fuses exactly these two.
BASES = {"sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
         "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.05))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet34", choices=MODELS)
    ap.add_argument("--backends", default="auto", help="comma-separated, timed one after another in this run")
    ap.add_argument("--bases", default="sgd,adamw", help=f"comma-separated base optimizers, of {', '.join(BASES)}")
    ap.add_argument("--stub-launches", action="store_true",
                    help="Triton's kernel launches become a counted no-op: its host time alone")
    ap.add_argument("--device", default="cpu", help="where the one-element tensors live (cuda: launch costs too)")
    ap.add_argument("--steps", type=int, default=300, help="steps per timing")
    ap.add_argument("--rounds", type=int, default=5, help="timings per configuration, interleaved; the median counts")
    ap.add_argument("--out", default="runs/bench/python_overhead.json")
    args = ap.parse_args(argv)
    bases = args.bases.split(",")
    if not bases or any(b not in BASES for b in bases):
        ap.error(f"--bases: each of {', '.join(BASES)}, got {args.bases!r}")
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
    for backend_name, base, (method, cls) in itertools.product(args.backends.split(","), bases,
                                                               (("sam", imbsam.SAM), ("imbsam", imbsam.ImbSAM))):
        base_cls, base_kw = BASES[base]
        opt = cls(params, base_cls, rho=0.05, backend=backend_name, **base_kw)
        phases = ([opt.first_step, opt.second_step] if method == "sam"
                  else [opt.first_step, opt.second_step, opt.third_step])

        def step(phases=phases):
            for phase in phases:
                for p, g in zip(params, grads):
                    p.grad = g
                phase()

        step()  # the base optimizer's state exists from here on (the ops below take Adam's)
        backend = opt.backend_for(device)
        stubbed = args.stub_launches and backend == "triton"
        ops_only = ops_only_step(imbsam.backends.ops_for(backend), opt, base, params, grads,
                                 grads if method == "imbsam" else [])
        for part, fn in (("step", step), ("ops", ops_only)):
            configs.append((method, base, part, backend, stubbed, fn))
    # Rounds over all configurations, the median per configuration: this VM's speed drifts
    # by tens of percent over seconds, and a drift must not land on one backend alone.
    times: dict = {}
    for _ in range(args.rounds):
        for method, base, part, backend, _, fn in configs:
            launches[0] = 0
            times.setdefault((method, base, part, backend), []).append(host_us(fn, args.steps))  # the GPU runs behind
    for method, base, part, backend, stubbed, fn in configs:
        us = statistics.median(times[(method, base, part, backend)])
        launches[0] = 0
        fn()
        note = f" ({launches[0]} launches stubbed)" if stubbed else ""
        print(f"{method:7s} {base:5s} {part:4s} {n} tensors, backend {backend}: {us:6.0f} us of host time per step"
              f"{note}")
        records.append(dict(bench="python_overhead", part=part, model=args.model, n_tensors=n, dtype="float32",
                            method=method, base=base, backend=backend, us=round(us, 1), ms=round(us / 1e3, 4),
                            steps=args.steps, rounds=args.rounds, device=device.type, stub_launches=stubbed,
                            launches_per_step=launches[0] if stubbed else None, **info, **record_meta(argv)))
    print_ratios(records)
    write_records(args.out, records)


def ops_only_step(ops, opt, base: str, params, grads, heads):
    """The step's op calls alone, on the optimizer's own state and hyperparameters, as its
    engine makes them: what the engine's Python adds is the difference to the whole step."""
    group = opt.param_groups[0]
    backups = [torch.zeros_like(p) for p in params]

    def norm_and_perturb():
        norm = ops.grad_norm(grads, [], [], 0.01)
        ops.perturb_(params, grads, backups, norm, 0.05, 0.01, False)
        return norm

    if base == "sgd":
        bufs = [opt.state[p]["momentum_buffer"] for p in params]

        def sgd_ops():
            norm = norm_and_perturb()
            ops.restore_sgd_step_(params, grads, backups, heads, bufs, group["lr"], group["momentum"],
                                  group["dampening"], group["weight_decay"], group["nesterov"], group["maximize"],
                                  False, None, norm - norm)
        return torch.no_grad()(sgd_ops)  # as the engine runs them
    state = [opt.state[p] for p in params]
    ms, vs, steps = ([s[k] for s in state] for k in ("exp_avg", "exp_avg_sq", "step"))
    # Step counts on the CPU for device parameters (AdamW's default): the skip flag is read
    # on the host, not passed (imbsam.optim._fused_adam).
    on_device = steps[0].device == params[0].device

    def adamw_ops():
        norm = norm_and_perturb()
        found_inf = norm - norm
        if not on_device:
            bool(found_inf != 0)
        ops.restore_adam_step_(params, grads, backups, heads, ms, vs, [], steps, group["lr"], *group["betas"],
                               group["eps"], group["weight_decay"], True, group["amsgrad"], group["maximize"], None,
                               found_inf if on_device else None)
    return torch.no_grad()(adamw_ops)


def print_ratios(records) -> None:
    """Each backend's host time per method, base and part against the first backend's, from this run."""
    first = {}
    for r in records:
        key = (r["method"], r["base"], r["part"])
        if key not in first:
            first[key] = r
        elif r["backend"] != first[key]["backend"]:
            print(f"{r['method']:7s} {key[1]:5s} {r['part']:4s} {r['backend']} / {first[key]['backend']}: "
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
