"""How closely the fused Adam(W) step (cpp) agrees with torch.optim's single-tensor step in
fp32, per element: in ulps of the result, and as an error against float64 beside torch's own.

docs/semantics.md quotes the numbers it writes to results/adam_agreement/ (one run on this
machine's CPU). Per element, an fp32 result near zero can be many ulps away from torch's
while both are off the fp64 truth by about the same absolute amount: the update's rounding
is of the size of the operands (lr x the Adam ratio, ~lr), not of the result.

    python scripts/adam_agreement.py [--out results/adam_agreement/cpp_fp32.json]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from test_adam_step import CASES, HYPER, Inputs, torch_step  # noqa: E402

import imbsam  # noqa: E402
from imbsam.train.checkpoint import write_json  # noqa: E402

SIZES = [278011, 65537, 7]


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the last place of b (fp32)."""
    spacing = torch.nextafter(b.abs(), torch.tensor(float("inf"))) - b.abs()
    return (a.double() - b.double()).abs() / spacing.double()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/adam_agreement/cpp_fp32.json")
    args = ap.parse_args(argv)
    ops = imbsam.backends.ops_for("cpp")
    rows = []
    for case in CASES:
        x = Inputs(SIZES, torch.float32, 10, True, CASES[case][2])
        fast, same, exact = x.copy().run(ops, case), torch_step(x, case), torch_step(x.copy(torch.float64), case)
        w_fast, w_torch, w_exact = (torch.cat(r.w) for r in (fast, same, exact))
        u = ulps(w_fast, w_torch)
        row = dict(case=case, elements=w_fast.numel(),
                   max_ulps_vs_torch=float(u.max()), median_ulps_vs_torch=float(u.median()),
                   share_bitwise_equal=float((w_fast == w_torch).double().mean()),
                   max_abs_err_fused_vs_fp64=float((w_fast.double() - w_exact).abs().max()),
                   max_abs_err_torch_vs_fp64=float((w_torch.double() - w_exact).abs().max()),
                   lr=HYPER["lr"])
        rows.append(row)
        print(f"{case:24s} max {row['max_ulps_vs_torch']:8.0f} ulp, median {row['median_ulps_vs_torch']:.0f}, "
              f"bitwise {100 * row['share_bitwise_equal']:5.1f} %; |err| vs fp64: fused "
              f"{row['max_abs_err_fused_vs_fp64']:.2e}, torch {row['max_abs_err_torch_vs_fp64']:.2e}")
    result = dict(what="fused restore_adam_step_ (cpp, fp32, ImbSAM's g + g_H) against torch.optim's "
                       "single-tensor step, per element of the weights", cpu=_cpu(), torch=torch.__version__,
                  date=datetime.date.today().isoformat(), command="python scripts/adam_agreement.py", rows=rows)
    write_json(args.out, result)
    return result


def _cpu() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")


if __name__ == "__main__":
    main()
