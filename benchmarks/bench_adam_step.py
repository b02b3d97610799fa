"""Optimizer-side SAM and ImbSAM step with AdamW as the base, on a model's parameter list.

Times the work between the backward passes (norm, perturb, then restore + combine + the
AdamW step) on fixed synthetic gradients, one method at a time:

* ``reference``: imbsam's spec backend, torch's AdamW with ``foreach=False``;
* ``generic-foreach`` / ``generic-fused``: imbsam's fastest ops for the perturbation,
  restore and combine, then torch's own AdamW step (``foreach=True`` / ``fused=True``):
  what SAM with AdamW costs without a fused step (the base optimizer is a subclass of
  AdamW, which the engine does not fuse);
* each compiled backend usable here with ``torch.optim.AdamW``: the fused
  restore_adam_step_.

Every method is checked against the reference on one step first. The floor is the
fused step's memory traffic (fp32: 52 B/param for ImbSAM, 48 for SAM; amsgrad adds 8)
at the copy bandwidth measured in the same run, and at the in-place update bandwidth
(see in_place_bandwidth_gbs: on a CPU a copy undercounts what it moves). Prints a table and writes JSON records.

    python benchmarks/bench_adam_step.py --model vit_b_16 --out runs/bench/adam_step_vit.json
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imbsam  # noqa: E402

from bench_common import kernel_ms, machine_info, median_ms, record_meta, write_records  # noqa: E402
from bench_optimizer_step import copy_bandwidth_gbs  # noqa: E402
from param_lists import MODELS, model_shapes  # noqa: E402

ADAMW_KW = dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
RHO = 0.05
# Parameter-sized passes of the fused step: norm (read g) 1, perturb (read w, g; write w,
# backup) 4, then read backup, g, m, v [g_H] [vmax] and write w, m, v [vmax].
FLOOR_PASSES = {"imbsam": 13, "sam": 12}
AMSGRAD_PASSES = 2


def in_place_bandwidth_gbs(n: int, dtype, device, reps: int) -> float:
    """Read+write GB/s of one big in-place update (x *= 1): the second yardstick. A copy's
    destination is written without being read, which a CPU's caches read first anyway
    (write-allocate), so a copy moves 12 bytes per 8 counted; an in-place update, like most
    of an optimizer step's streams, moves what is counted."""
    x = torch.randn(n, device=device).to(dtype)
    ms = kernel_ms(lambda: x.mul_(1.0), device, reps)
    return 2 * n * x.element_size() / ms / 1e6


class GenericAdamW(torch.optim.AdamW):
    """torch.optim.AdamW by another name: the engine's generic path (restore, combine, torch's step)."""


def methods_here(device: torch.device) -> list[tuple[str, str, dict]]:
    """(name, imbsam backend, base optimizer and its options) per method, reference first."""
    fast = imbsam.backends.backends_for(device.type, fast_only=True, emulated=False)
    out = [("reference", "reference", dict(base=torch.optim.AdamW, foreach=False))]
    if fast:
        out += [("generic-foreach", fast[0], dict(base=GenericAdamW, foreach=True)),
                ("generic-fused", fast[0], dict(base=GenericAdamW, fused=True))]
    return out + [(b, b, dict(base=torch.optim.AdamW)) for b in fast]


class Runner:
    """One method's optimizer over its own parameters; the gradients are shared (read only)."""

    def __init__(self, method, backend, options, shapes, grads, dtype, device, amsgrad):
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 1e-2).to(dtype=dtype, device=device))
                       for s in shapes]
        self.grads, self.method = grads, method
        options = dict(options)
        base = options.pop("base")
        cls = imbsam.ImbSAM if method == "imbsam" else imbsam.SAM
        self.opt = cls(self.params, base, rho=RHO, backend=backend, amsgrad=amsgrad, **ADAMW_KW, **options)

    def _set(self, name):
        for p, g in zip(self.params, self.grads[name]):
            p.grad = g

    def step(self):
        if self.method == "imbsam":
            self._set("head")
            self.opt.first_step()
            self._set("tail")
            self.opt.second_step()
            self._set("tail2")
            self.opt.third_step()
        else:
            self._set("tail")
            self.opt.first_step()
            self._set("tail2")
            self.opt.second_step()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet34", choices=MODELS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--methods", default="imbsam,sam")
    ap.add_argument("--amsgrad", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="runs/bench/adam_step.json")
    args = ap.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes = model_shapes(args.model)
    n_params = sum(torch.Size(s).numel() for s in shapes)
    info = machine_info(device)
    print(f"{args.model}: {n_params / 1e6:.1f} M parameters in {len(shapes)} tensors, AdamW"
          f"{' (amsgrad)' if args.amsgrad else ''}, {args.dtype}, device {device} "
          f"({info.get('gpu') or info.get('cpu')}), torch {info['torch']}, {info['threads']} threads")
    gen = torch.Generator(device="cpu").manual_seed(1)
    grads = {k: [(torch.randn(s, generator=gen) * 1e-2).to(dtype=dtype, device=device) for s in shapes]
             for k in ("head", "tail", "tail2")}
    copy_gbs = copy_bandwidth_gbs(n_params, dtype, device, args.reps)
    in_place_gbs = in_place_bandwidth_gbs(n_params, dtype, device, args.reps)
    print(f"  copy bandwidth ({n_params / 1e6:.1f} M elements): {copy_gbs:.1f} GB/s; in place (x *= 1): "
          f"{in_place_gbs:.1f} GB/s")
    records = []
    for method in args.methods.split(","):
        passes = FLOOR_PASSES[method] + (AMSGRAD_PASSES if args.amsgrad else 0)
        floor_bytes = passes * n_params * torch.empty((), dtype=dtype).element_size()
        floor_ms = floor_bytes / copy_gbs / 1e6
        in_place_floor_ms = floor_bytes / in_place_gbs / 1e6
        results, reference = {}, None
        for name, backend, options in methods_here(device):
            runner = Runner(method, backend, options, shapes, grads, dtype, device, args.amsgrad)
            runner.step()  # one step from the same start, checked against the reference's
            if reference is None:
                reference = [p.detach().clone() for p in runner.params]
            else:
                err = max((a.double() - b.double()).abs().max().item() for a, b in zip(runner.params, reference))
                tol = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2
                if err > tol:
                    raise SystemExit(f"{method}/{name}: differs from the reference by {err:.3g} after one step "
                                     f"(tolerance {tol}); not timing a wrong result")
            results[name] = median_ms(runner.step, device, args.reps)
            del runner
            gc.collect()
        generic = min((ms for name, ms in results.items() if name.startswith("generic")), default=None)
        for name, ms in results.items():
            gbs = floor_bytes / ms / 1e6
            vs_generic = "" if generic is None else f"   {generic / ms:5.2f}x vs the faster generic"
            print(f"  {method:7s} {name:16s} {ms:9.2f} ms   {results['reference'] / ms:5.2f}x vs reference"
                  f"{vs_generic}   {ms / floor_ms:5.2f}x the floor ({passes * 4 if dtype == torch.float32 else passes}"
                  f"{' B/param' if dtype == torch.float32 else ' passes'} at copy bandwidth)"
                  f"   {ms / in_place_floor_ms:5.2f}x at in-place bandwidth")
            records.append(dict(bench="adam_step", model=args.model, n_params=n_params, n_tensors=len(shapes),
                                dtype=args.dtype, method=method, backend=name, base="AdamW", amsgrad=args.amsgrad,
                                ms=round(ms, 3), floor_ms=round(floor_ms, 3), x_floor=round(ms / floor_ms, 3),
                                x_in_place_floor=round(ms / in_place_floor_ms, 3),
                                in_place_gbs=round(in_place_gbs, 2),
                                speedup_vs_reference=round(results["reference"] / ms, 3),
                                speedup_vs_generic=None if generic is None else round(generic / ms, 3),
                                floor_passes=passes, floor_gbs=round(gbs, 2), copy_gbs=round(copy_gbs, 2),
                                reps=args.reps, device=device.type, **info, **record_meta(argv)))
    write_records(args.out, records)


if __name__ == "__main__":
    main()
