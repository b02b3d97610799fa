"""Per-op bandwidth: each imbsam op on a model's parameter list, GB/s against the copy
(and, for the norm, read) bandwidth measured in the same run.

Every backend's result is checked against the reference before it is timed. On a GPU
the GB/s come from ``device_ms`` (the kernels' time with the host ahead of the GPU);
``ms`` is the call from an idle GPU, its host cost included.

    python benchmarks/bench_ops.py --device cuda --out runs/bench/ops.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imbsam import backends  # noqa: E402
from imbsam.backends import reference

from bench_common import device_ms, host_ms, kernel_ms, machine_info, median_ms, record_meta, write_records  # noqa: E402
from param_lists import MODELS, model_shapes  # noqa: E402

# Tensor passes each op makes over memory (reads + writes), as in docs/algorithm.md.
PASSES = {"grad_norm": 1, "perturb_": 4, "restore_": 2, "add_head_grads_": 3, "restore_sgd_step_": 6}


def make_lists(shapes, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * 1e-2).to(dtype=dtype, device=device) for s in shapes]


def op_calls(ops, L):
    """Each op as a zero-argument call on the lists L (mutating ones work on copies' state)."""
    return {
        "grad_norm": lambda: ops.grad_norm(L["g"], [], [], 0.01),
        "perturb_": lambda: ops.perturb_(L["w"], L["g"], L["b"], L["norm"], 0.05, 0.01, False),
        "restore_": lambda: ops.restore_(L["w"], L["b"]),
        "add_head_grads_": lambda: ops.add_head_grads_(L["g2"], L["h"]),
        "restore_sgd_step_": lambda: ops.restore_sgd_step_(L["w"], L["g"], L["b"], L["h"], L["buf"], 1e-4, 0.9,
                                                           0.0, 1e-3, False, False, False),
    }


def fresh_lists(shapes, dtype, device):
    L = {k: make_lists(shapes, dtype, device, seed) for seed, k in enumerate(("w", "g", "b", "h", "buf", "g2"))}
    L["norm"] = reference.grad_norm(L["g"], [], [], 0.01)
    return L


def check(ops_fast, shapes, dtype, device) -> None:
    """One call of every op against the reference on identical inputs."""
    ref, fast = fresh_lists(shapes, dtype, device), fresh_lists(shapes, dtype, device)
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    for name in PASSES:
        r = op_calls(reference, ref)[name]()
        f = op_calls(ops_fast, fast)[name]()
        pairs = [(r, f)] if name == "grad_norm" else list(zip(ref["w"] + ref["g2"] + ref["buf"],
                                                                  fast["w"] + fast["g2"] + fast["buf"]))
        err = max(((a.double() - b.double()).abs().max() / (a.double().abs().max() + 1e-30)).item()
                  for a, b in pairs if a.numel())
        if err > tol:
            raise SystemExit(f"{name}: relative error {err:.3g} against the reference (tolerance {tol}); "
                             "not timing a wrong result")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet34", choices=MODELS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="runs/bench/ops.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    # The compiled backends that run natively on this device (an interpreter is no benchmark).
    names = ["reference"] + backends.backends_for(device.type, fast_only=True, emulated=False)
    shapes = model_shapes(args.model)
    n = sum(torch.Size(s).numel() for s in shapes)
    info = machine_info(device)
    print(f"{args.model}: {n / 1e6:.1f} M parameters in {len(shapes)} tensors on {info.get('gpu') or info.get('cpu')}")
    records = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        size = torch.empty((), dtype=dtype).element_size()
        src, dst = torch.randn(n, device=device).to(dtype), torch.empty(n, device=device, dtype=dtype)
        copy_gbs = 2 * n * size / kernel_ms(lambda: dst.copy_(src), device, args.reps) / 1e6
        read_gbs = n * size / kernel_ms(lambda: src.sum(), device, args.reps) / 1e6
        src = dst = None  # freed before the ops' own lists are allocated
        print(f"  {dtype_name}: copy {copy_gbs:.1f} GB/s, read (sum) {read_gbs:.1f} GB/s")
        for name in names:
            ops = backends.ops_for(name)
            if name != "reference":
                check(ops, shapes, dtype, device)
            L = fresh_lists(shapes, dtype, device)
            for op, call in op_calls(ops, L).items():
                ms = median_ms(call, device, args.reps)
                # On a GPU the bandwidth is the kernels' own: device time with the host ahead
                # (from an idle GPU, the op's host cost before its first launch would count).
                dev = device_ms(call, args.reps, host_ms(call)) if device.type == "cuda" else None
                gbs = PASSES[op] * n * size / (ms if dev is None else dev) / 1e6
                bound = read_gbs if op == "grad_norm" else copy_gbs
                dev_text = "" if dev is None else f" (device {dev:7.3f} ms)"
                print(f"  {dtype_name:9s} {name:10s} {op:18s} {ms:8.3f} ms{dev_text} {gbs:7.1f} GB/s "
                      f"{100 * gbs / bound:5.0f} % of {'read' if op == 'grad_norm' else 'copy'}")
                records.append(dict(bench="op", op=op, model=args.model, n_params=n, dtype=dtype_name,
                                    method="-", backend=name, ms=round(ms, 4),
                                    device_ms=None if dev is None else round(dev, 4), gbs=round(gbs, 2),
                                    copy_gbs=round(copy_gbs, 2), read_gbs=round(read_gbs, 2),
                                    pct_of_bound=round(100 * gbs / bound, 1), reps=args.reps, device=device.type,
                                    **info, **record_meta(argv)))
            del L
    write_records(args.out, records)


if __name__ == "__main__":
    main()
