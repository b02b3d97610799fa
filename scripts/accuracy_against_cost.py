"""Accuracy against cost: finished training runs beside the iteration time their method
costs, as a ratio to SGD's measured in one benchmark run (``benchmarks/bench_tail_passes.py``
records), in one table (markdown) and one plot (Few and All against the cost).

A run's method is looked up in the records by its model and its benchmark name: ``sgd``,
``sam``, ``imbsam``, ``imbsam-tail`` (``--tail-passes subset``), with ``@SCHEDULE`` for a
``--sharpness-schedule`` other than ``every``. Seeds of one recipe are grouped (mean and
sample standard deviation, as ``python -m imbsam.train.table`` does); a method without a
record is reported as not measured.

    python scripts/accuracy_against_cost.py RUN... --costs BENCH.json... --table t.md --plot p.png
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from imbsam.train.config import as_recorded  # noqa: E402
from imbsam.train.data.profile import ACCURACY_KEYS  # noqa: E402
from imbsam.train.seeds import group_by_recipe, method_of  # noqa: E402


def bench_name(metrics: dict) -> str:
    args = as_recorded(metrics.get("args", {}))
    name = "imbsam-tail" if args.get("tail_passes") == "subset" else metrics["opt"]
    schedule = args.get("sharpness_schedule", "every")
    return name if schedule == "every" else f"{name}@{schedule}"


def load_costs(paths: list[str]) -> dict:
    """(model, method) -> ratio to SGD, from tail_passes records; a later file wins."""
    costs = {}
    for path in paths:
        with open(path) as f:
            for r in json.load(f):
                if r.get("bench") == "tail_passes":
                    costs[(r["model"], r["method"])] = (r["ratio_to_sgd"], os.path.basename(path))
    return costs


def median_epoch_s(run: str) -> float:
    with open(os.path.join(run, "history.json")) as f:
        return statistics.median(h["epoch_s"] for h in json.load(f))


def summarise(runs: list[str], costs: dict) -> list[dict]:
    named = []
    for run in runs:
        with open(os.path.join(run, "metrics.json")) as f:
            named.append((run, json.load(f)))
    epoch_s = {id(m): median_epoch_s(run) for run, m in named}
    rows = []
    for group in group_by_recipe(named):
        first = group.runs[0]
        cost = costs.get((first["model"], bench_name(first)))
        shares = [m["sharpened"]["fraction"] for m in group.runs if "sharpened" in m]
        rows.append(dict(
            method=method_of(first), model=first["model"], seeds=group.seeds,
            **{k: group.stats(k) for k in ACCURACY_KEYS},
            values={k: [m[k] for m in group.runs] for k in ACCURACY_KEYS},
            sharpened=statistics.mean(shares) if shares else (None if first["opt"] == "sgd" else 1.0),
            cost=cost[0] if cost else None, cost_file=cost[1] if cost else None,
            epoch_s=[round(epoch_s[id(m)], 1) for m in group.runs]))
    return rows


def _cell(stat) -> str:
    mean, sd = stat
    return f"{mean:.1f}" if math.isnan(sd) else f"{mean:.1f} ± {sd:.1f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| method | model | seeds | Many | Medium | Few | All | steps sharpened | iteration × SGD's "
             "| median epoch (s), per seed |", "| --- | --- | --- | :-: | :-: | :-: | :-: | --: | --: | --: |"]
    for r in rows:
        share = "" if r["sharpened"] is None else f"{100 * r['sharpened']:.0f} %"
        cost = "not measured" if r["cost"] is None else f"{r['cost']:.2f}"
        lines.append(f"| {r['method']} | {r['model']} | {', '.join(map(str, r['seeds']))} | "
                     + " | ".join(_cell(r[k]) for k in ACCURACY_KEYS)
                     + f" | {share} | {cost} | {', '.join(map(str, r['epoch_s']))} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for ax, key in zip(axes, ("few", "all")):
        for k, r in enumerate(r for r in rows if r["cost"] is not None):
            colour = f"C{k}"
            ax.scatter([r["cost"]] * len(r["values"][key]), r["values"][key], color=colour, alpha=0.5, s=18)
            ax.errorbar([r["cost"]], [r[key][0]], yerr=[0 if math.isnan(r[key][1]) else r[key][1]], fmt="D",
                        color=colour, ms=7, capsize=3, label=f"{r['method']} ({r['model']}, {len(r['seeds'])} seed"
                        f"{'s' if len(r['seeds']) > 1 else ''})")
        ax.set_xlabel("iteration time / SGD's (benchmark, same run)")
        ax.set_ylabel(f"{key.capitalize()} test accuracy (%), final epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders (metrics.json, history.json)")
    ap.add_argument("--costs", nargs="+", required=True, help="bench_tail_passes.py record files")
    ap.add_argument("--table", default=None, help="also write the markdown table here")
    ap.add_argument("--plot", default=None, help="also write the plot here (PNG)")
    ap.add_argument("--title", default="Fashion-MNIST-LT (IF 100), 30 epochs: accuracy against cost")
    args = ap.parse_args(argv)
    rows = summarise(args.runs, load_costs(args.costs))
    text = markdown(rows)
    print(text)
    if args.table:
        with open(args.table + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(args.table + ".tmp", args.table)
    if args.plot:
        plot(rows, args.plot, args.title)
        print(f"wrote {args.plot}")
    return rows


if __name__ == "__main__":
    main()
