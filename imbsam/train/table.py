"""Prints the Many/Medium/Few/All table of finished runs: ``python -m imbsam.train.table DIR...``."""
from __future__ import annotations

import argparse
import json
import os

from imbsam.train.report import format_table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", nargs="+", help="run folders (each with metrics.json)")
    args = ap.parse_args(argv)
    rows, first = [], None
    for run in args.runs:
        path = os.path.join(run, "metrics.json")
        if not os.path.isfile(path):
            raise SystemExit(f"{path} is missing: that run has not finished")
        with open(path) as f:
            m = json.load(f)
        first = first or m
        rows.append((f"{m['opt']} ({m['epochs']} ep, {m['wall_s']:.0f} s)", m))
    print(format_table(rows, title=f"{first['dataset']} (IF {first['imb_factor']:g}), {first['model']}, final "
                                   f"epoch, test accuracy (%), on {first['device']}"))


if __name__ == "__main__":
    main()
