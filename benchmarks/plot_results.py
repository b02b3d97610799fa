"""Plots of benchmark records (the JSON files the benchmark scripts write): a PNG per file.

    python benchmarks/plot_results.py benchmarks/results/*.json    # each PNG beside its file
    python benchmarks/plot_results.py FILE.json --out-dir DIR

- ``optimizer_step``: the step's time per backend, grouped by method and dtype (log
  scale), with the memory-traffic floor at the copy bandwidth of the same run as a line.
- ``op``: each op's bandwidth as a percentage of copy (of read, for the norm) per
  backend, with the 80 % target.
- ``train_iter``: ms per training iteration per method, variant and backend.
- ``tail_passes``: each method's iteration time as a ratio to SGD's in the same run, with
  the 1.3x target.

On a GPU the bars are the device time (``device_ms``: the kernels' own, host queued
ahead) where a record has it, else ``ms``. Files of other records are skipped.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"reference": "tab:grey", "paper": "tab:brown", "foreach": "tab:olive", "cpp": "tab:blue",
           "cuda": "tab:green", "triton": "tab:purple", "torch": "tab:cyan",
           "generic-foreach": "tab:olive", "generic-fused": "tab:orange"}  # bench_adam_step's baselines
LABELS = {"foreach": "torch._foreach", "paper": "paper's code"}
TARGET_PCT = 80  # the GPU target for every elementwise op and the norm (H100)


def _time(r: dict) -> float:
    return r["device_ms"] if r.get("device_ms") is not None else r["ms"]


def _where(r: dict) -> str:
    return f"{r.get('gpu') or r.get('cpu') or r['device']}, torch {r['torch']}, {r['date']}"


def _grouped_bars(ax, groups: list[str], series: dict[str, dict[str, float]]) -> dict[str, float]:
    """Bars of series[backend][group] side by side per group; returns each group's x centre."""
    width = 0.8 / max(len(series), 1)
    for k, (backend, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i, g in enumerate(groups) if g in values]
        ys = [values[g] for g in groups if g in values]
        ax.bar(xs, ys, width, label=LABELS.get(backend, backend), color=COLOURS.get(backend))
    ax.set_xticks(range(len(groups)), groups)
    ax.grid(axis="y", alpha=0.3)
    return {g: float(i) for i, g in enumerate(groups)}


def plot_optimizer_step(records: list[dict], path: str) -> None:
    groups = list(dict.fromkeys(f"{r['method']}\n{r['dtype']}" for r in records))
    series: dict[str, dict[str, float]] = defaultdict(dict)
    floors = {}
    for r in records:
        group = f"{r['method']}\n{r['dtype']}"
        series[r["backend"]][group] = _time(r)
        # floor_gbs is the floor's bytes over `ms`: the floor's time at the run's copy bandwidth.
        floors[group] = r["floor_gbs"] * r["ms"] / r["copy_gbs"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups)), 4.2))
    centres = _grouped_bars(ax, groups, series)
    for k, (group, floor) in enumerate(floors.items()):
        ax.hlines(floor, centres[group] - 0.45, centres[group] + 0.45, colors="black", linestyles="--",
                  label="floor at copy bandwidth" if k == 0 else None)
    ax.set_yscale("log")
    device_time = any(r.get("device_ms") is not None for r in records)
    ax.set_ylabel("device time per step (ms)" if device_time else "time per step (ms)")
    r0 = records[0]
    ax.set_title(f"optimizer-side step, {r0['model']} ({r0['n_params'] / 1e6:.1f} M params, {r0['n_tensors']} "
                 f"tensors)\n{_where(r0)}", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_ops(records: list[dict], path: str) -> None:
    dtypes = list(dict.fromkeys(r["dtype"] for r in records))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.2), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        rows = [r for r in records if r["dtype"] == dtype]
        groups = list(dict.fromkeys(r["op"] for r in rows))
        series: dict[str, dict[str, float]] = defaultdict(dict)
        for r in rows:
            series[r["backend"]][r["op"]] = r["pct_of_bound"]
        _grouped_bars(ax, groups, series)
        ax.axhline(TARGET_PCT, color="black", ls="--", lw=1, label=f"{TARGET_PCT} % (the GPU target)")
        ax.tick_params(axis="x", labelsize=8)
        ax.set_ylabel("% of copy bandwidth (norm: of read)")
        ax.set_title(f"{dtype}: copy {rows[0]['copy_gbs']:.0f} GB/s, read {rows[0]['read_gbs']:.0f} GB/s",
                     fontsize=10)
        ax.legend(fontsize=8)
    r0 = records[0]
    fig.suptitle(f"ops on the {r0['model']} list ({r0['n_params'] / 1e6:.1f} M params), {_where(r0)}", fontsize=10)
    _save(fig, path)


def plot_train_iter(records: list[dict], path: str) -> None:
    groups = list(dict.fromkeys(f"{r['method']}\n{r['variant']}" for r in records))
    series: dict[str, dict[str, float]] = defaultdict(dict)
    for r in records:
        series[r["backend"]][f"{r['method']}\n{r['variant']}"] = r["ms"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups)), 4.2))
    _grouped_bars(ax, groups, series)
    ax.set_ylabel("ms per iteration")
    r0 = records[0]
    ax.set_title(f"training iteration, {r0['model']}, batch {r0['batch']}\n{_where(r0)}", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)


# The iteration-time target of the cheaper ImbSAM passes and schedules (issue 28): 1.3x SGD.
TAIL_TARGET_RATIO = 1.3


def plot_tail_passes(records: list[dict], path: str) -> None:
    names = [r["method"] for r in records]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names)), 4.0))
    ax.bar(names, [r["ratio_to_sgd"] for r in records], color=[f"C{k}" for k in range(len(names))])
    for k, r in enumerate(records):
        share = r.get("sharpened_share")
        sharpened = f"\n{100 * share:.0f} % SAM" if share is not None and share < 1 else ""
        ax.text(k, r["ratio_to_sgd"], f"{r['ratio_to_sgd']:.2f}x\n{r['ms']:.0f} ms{sharpened}", ha="center",
                va="bottom", fontsize=7)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.axhline(TAIL_TARGET_RATIO, color="black", ls="--", lw=1, label=f"{TAIL_TARGET_RATIO}x SGD (the target)")
    ax.set_ylabel("iteration time / SGD's (same run)")
    ax.set_ylim(0, 1.3 * max(r["ratio_to_sgd"] for r in records))
    ax.grid(axis="y", alpha=0.3)
    r0 = records[0]
    ax.set_title(f"training iteration, {r0['model']}, batch {r0['batch']} ({100 * r0['tail_share']:.1f} % tail "
                 f"samples)\n{_where(r0)}", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)  # atomically: a killed run leaves no half image
    plt.close(fig)
    print(f"wrote {path}")


# adam_step records carry the optimizer_step fields the plot reads (method, dtype, backend, floor).
PLOTS = {"optimizer_step": plot_optimizer_step, "adam_step": plot_optimizer_step, "op": plot_ops,
         "train_iter": plot_train_iter, "tail_passes": plot_tail_passes}


def plot_file(json_path: str, out_dir: str | None = None) -> str | None:
    """Plots one file of records; returns the PNG's path, or None if it holds nothing plottable."""
    with open(json_path) as f:
        records = json.load(f)
    kinds = {r.get("bench") for r in records}
    if len(kinds) != 1 or next(iter(kinds)) not in PLOTS:
        print(f"skipped {json_path}: records of {sorted(map(str, kinds))}, plotted are {sorted(PLOTS)}")
        return None
    stem = os.path.splitext(os.path.basename(json_path))[0]
    path = os.path.join(out_dir or os.path.dirname(os.path.abspath(json_path)), stem + ".png")
    PLOTS[kinds.pop()](records, path)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="JSON files of benchmark records")
    ap.add_argument("--out-dir", default=None, help="where the PNGs go (default: beside each file)")
    args = ap.parse_args(argv)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
    for path in args.files:
        plot_file(path, args.out_dir)


if __name__ == "__main__":
    main()
