"""Prints the Many/Medium/Few/All table of finished runs; ``--plot`` draws them side by side.

    python -m imbsam.train.table DIR... [--plot comparison.png]
"""
from __future__ import annotations

import argparse
import json
import os

from imbsam.train.report import format_table, plot_comparison


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders (each with metrics.json)")
    ap.add_argument("--plot", default=None, help="also write a PNG comparing the runs (needs their history.json)")
    args = ap.parse_args(argv)
    rows, first, runs = [], None, []
    for run in args.runs:
        path = os.path.join(run, "metrics.json")
        if not os.path.isfile(path):
            raise SystemExit(f"{path} is missing: that run has not finished")
        with open(path) as f:
            m = json.load(f)
        first = first or m
        rows.append((f"{m['opt']} ({m['epochs']} ep, {m['wall_s']:.0f} s)", m))
        if args.plot:
            with open(os.path.join(run, "history.json")) as f:
                runs.append((m["opt"], m, json.load(f)))
    title = (f"{first['dataset']} (IF {first['imb_factor']:g}), {first['model']}, final epoch, test accuracy (%), "
             f"on {first['device']}")
    print(format_table(rows, title=title))
    if args.plot:
        plot_comparison(runs, f"{first['dataset']} (IF {first['imb_factor']:g}), {first['model']}, "
                              f"{first['epochs']} epochs, on {first['device']}", args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
