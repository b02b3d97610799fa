"""Prints the Many/Medium/Few/All table of finished runs; ``--plot`` draws them side by side.
Runs of one recipe under several seeds are also summarised per optimizer (mean ± sd).

    python -m imbsam.train.table DIR... [--plot comparison.png] [--plot-seeds seeds.png]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from imbsam.train.report import format_table, plot_comparison, plot_seeds, plotting_unavailable
from imbsam.train.seeds import format_seed_table, group_by_recipe, method_of, seed_of


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders (each with metrics.json)")
    ap.add_argument("--plot", default=None, help="also write a PNG comparing the runs (needs their history.json)")
    ap.add_argument("--plot-seeds", default=None,
                    help="also write a PNG of every seed's accuracy and each optimizer's mean")
    args = ap.parse_args(argv)
    rows, first, runs, named = [], None, [], []
    for run in args.runs:
        path = os.path.join(run, "metrics.json")
        if not os.path.isfile(path):
            raise SystemExit(f"{path} is missing: that run has not finished")
        with open(path) as f:
            m = json.load(f)
        first = first or m
        named.append((run, m))
        rows.append((f"{method_of(m)} seed {seed_of(m)} ({m['epochs']} ep, {m['wall_s']:.0f} s)", m))
        if args.plot:
            with open(os.path.join(run, "history.json")) as f:
                runs.append((method_of(m), m, json.load(f)))
    opts = [method_of(m) for _, m in named]
    if len(set(opts)) < len(opts):  # an optimizer twice: the plot's labels name the seeds
        runs = [(f"{label} seed {seed_of(m)}", m, h) for label, m, h in runs]
    setting = f"{first['dataset']} (IF {first['imb_factor']:g}), {first['model']}"
    print(format_table(rows, title=f"{setting}, final epoch, test accuracy (%), on {first['device']}"))
    try:
        groups = group_by_recipe(named)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if any(len(g.runs) > 1 for g in groups):
        print()
        print(format_seed_table(groups, title=f"{setting}, per optimizer over seeds, final epoch (%)"))
    no_plots = plotting_unavailable() if (args.plot or args.plot_seeds) else None
    if no_plots:  # the tables are printed; a missing plotting library is not a failed comparison
        print(f"warning: {no_plots}", file=sys.stderr)
        return
    if args.plot:
        plot_comparison(runs, f"{setting}, {first['epochs']} epochs, on {first['device']}", args.plot)
        print(f"wrote {args.plot}")
    if args.plot_seeds:
        plot_seeds(groups, f"{setting}, {first['epochs']} epochs", args.plot_seeds)
        print(f"wrote {args.plot_seeds}")


if __name__ == "__main__":
    main()
