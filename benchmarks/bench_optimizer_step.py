"""Optimizer-side SAM and ImbSAM step on a model's parameter list, backend by backend.

Times the work between the backward passes (norm, perturb, restore, combine, SGD) on
fixed synthetic gradients: ``paper`` (the paper's own per-tensor code, op for op:
``paper_baseline.py``) and ``foreach`` (``torch._foreach``: ``foreach_baseline.py``),
which are what a user would run instead and so lead the ratios; ``reference`` (imbsam's
fp64-accumulating spec, written for clarity, not speed); and each compiled backend usable
here. Every method is first checked against the reference on one step. Prints a table
and writes JSON records. ``ms`` is
the step from an idle GPU (its host launch cost included, as an isolated eager step
costs); on a GPU ``device_ms`` is the GPU's own time with the host ahead of it.

    python benchmarks/bench_optimizer_step.py --out runs/bench/optimizer_step_cpu.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imbsam  # noqa: E402

from bench_common import device_ms, host_ms, kernel_ms, machine_info, median_ms, record_meta, write_records  # noqa: E402
from foreach_baseline import ForeachSharpness  # noqa: E402
from paper_baseline import PaperImbSAM, PaperSAM, ParamModule  # noqa: E402
from param_lists import MODELS, model_shapes  # noqa: E402

SGD_KW = dict(lr=1e-4, momentum=0.9, weight_decay=1e-3)
RHO = 0.05
# The memory-traffic floor of a fused step in parameter-sized tensor passes (docs/algorithm.md:
# 44 B/param for ImbSAM and 40 for SAM in fp32, i.e. 11 and 10 element reads/writes).
FLOOR_PASSES = {"imbsam": 11, "sam": 10}
# What a user would run instead of imbsam: the ratios against these lead the table.
BASELINES = ("paper", "foreach")


def copy_bandwidth_gbs(n: int, dtype, device, reps: int) -> float:
    """Read+write GB/s of one big tensor copy: what a memory-bound pass can reach."""
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    ms = kernel_ms(lambda: dst.copy_(src), device, reps)
    return 2 * n * src.element_size() / ms / 1e6


class Runner:
    """One method's optimizer over its own copy of the parameters, driven phase by phase."""

    def __init__(self, method: str, backend: str, shapes, dtype, device, seed=0):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        make = lambda: [(torch.randn(s, generator=gen) * 1e-2).to(dtype=dtype, device=device) for s in shapes]  # noqa: E731
        self.params = [torch.nn.Parameter(t) for t in make()]
        self.grads = {"head": make(), "tail": make(), "tail2": make(), "g": make(), "g2": make()}
        self.method, self.backend = method, backend
        if backend == "foreach":
            self.opt = ForeachSharpness(self.params, RHO, **SGD_KW)
        elif backend == "paper":  # torch.optim.SGD with its defaults, as the paper's loop builds it
            cls = PaperImbSAM if method == "imbsam" else PaperSAM
            self.opt = cls(torch.optim.SGD(self.params, **SGD_KW), ParamModule(self.params), RHO)
        else:
            # The reference is the per-tensor loop throughout, its SGD step included.
            sgd_kw = dict(SGD_KW, foreach=False) if backend == "reference" else SGD_KW
            cls = imbsam.ImbSAM if method == "imbsam" else imbsam.SAM
            self.opt = cls(self.params, torch.optim.SGD, rho=RHO, backend=backend, **sgd_kw)

    def _set(self, name):
        for p, g in zip(self.params, self.grads[name]):
            p.grad = g

    def step(self):
        # The paper's phases have imbsam's names; the foreach baseline names its own.
        foreach = self.backend == "foreach"
        if self.method == "imbsam":
            self._set("head")
            self.opt.stash() if foreach else self.opt.first_step()
            self._set("tail")
            self.opt.perturb() if foreach else self.opt.second_step()
            self._set("tail2")
            self.opt.restore_and_step() if foreach else self.opt.third_step()
        else:
            self._set("g")
            self.opt.perturb() if foreach else self.opt.first_step()
            self._set("g2")
            self.opt.restore_and_step() if foreach else self.opt.second_step()


def check_against_reference(runner: Runner, reference: Runner, dtype) -> float:
    err = max((a.double() - b.double()).abs().max().item() for a, b in zip(runner.params, reference.params))
    tol = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2
    if err > tol:
        raise SystemExit(f"{runner.method}/{runner.backend}: differs from the reference by {err:.3g} after one "
                         f"step (tolerance {tol}); not timing a wrong result")
    return err


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet34", choices=MODELS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16,float16,float64")
    ap.add_argument("--methods", default="imbsam,sam")
    ap.add_argument("--backends", default=None,
                    help="default: reference, paper, foreach and every compiled one here")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="runs/bench/optimizer_step.json")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    # The compiled backends that run natively on this device (an interpreter is no benchmark).
    compiled = imbsam.backends.backends_for(device.type, fast_only=True, emulated=False)
    backends = args.backends.split(",") if args.backends else ["reference", *BASELINES] + compiled
    if backends[0] != "reference":
        backends.insert(0, "reference")  # every method is checked and compared against it
    shapes = model_shapes(args.model)
    info = machine_info(device)
    n_params = sum(torch.Size(s).numel() for s in shapes)
    print(f"{args.model}: {n_params / 1e6:.1f} M parameters in {len(shapes)} tensors, device {device} "
          f"({info.get('gpu') or info.get('cpu')}), torch {info['torch']}, {info['threads']} threads")
    records = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        copy_gbs = copy_bandwidth_gbs(n_params, dtype, device, args.reps)
        print(f"  copy bandwidth ({dtype_name}, {n_params / 1e6:.1f} M elements): {copy_gbs:.1f} GB/s")
        for method in args.methods.split(","):
            runners = {b: Runner(method, b, shapes, dtype, device) for b in backends}
            for runner in runners.values():  # one step each from the same start, checked first
                runner.step()
            for backend in backends[1:]:
                check_against_reference(runners[backend], runners["reference"], dtype)
            results = {b: median_ms(runners[b].step, device, args.reps) for b in backends}
            # On a GPU also the device time with the host ahead (the step inside a training
            # loop, or replayed from a CUDA graph): it separates kernel speed from launch cost.
            gpu_only = {}
            if device.type == "cuda":
                for b in backends:
                    gpu_only[b] = device_ms(runners[b].step, args.reps, host_ms(runners[b].step))
            del runners
            base = results["reference"]
            baselines = {b: results[b] for b in BASELINES if b in results}
            floor_bytes = FLOOR_PASSES[method] * n_params * torch.empty((), dtype=dtype).element_size()
            for backend, ms in results.items():
                gbs = floor_bytes / ms / 1e6  # floor bytes over time: 100 % of copy = at the floor
                dev = gpu_only.get(backend)
                dev_text = ("" if dev is None else
                            f"   device {dev:7.3f} ms ({floor_bytes / dev / 1e6 / copy_gbs:4.0%} of copy)")
                ratios = "".join(f"   {b_ms / ms:5.2f}x vs {b}" for b, b_ms in baselines.items())
                print(f"  {method:7s} {dtype_name:9s} {backend:10s} {ms:9.3f} ms{ratios}   {base / ms:5.2f}x vs "
                      f"reference   {gbs:6.1f} GB/s at the floor's bytes ({100 * gbs / copy_gbs:4.0f} % of copy)"
                      f"{dev_text}")
                records.append(dict(bench="optimizer_step", model=args.model, n_params=n_params,
                                    n_tensors=len(shapes), dtype=dtype_name, method=method, backend=backend,
                                    ms=round(ms, 4), speedup_vs_reference=round(base / ms, 3),
                                    **{f"speedup_vs_{b}": round(b_ms / ms, 3) for b, b_ms in baselines.items()},
                                    reps=args.reps,
                                    floor_gbs=round(gbs, 2), copy_gbs=round(copy_gbs, 2),
                                    device_ms=None if dev is None else round(dev, 4),
                                    device=device.type, **info,
                                    **record_meta(argv)))
    write_records(args.out, records)


if __name__ == "__main__":
    main()
