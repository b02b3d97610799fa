"""The table and plot of several Deep SAD runs (``python -m imbsam.anomaly`` folders):
AUROC per normal class and optimizer, mean ± sd over seeds, and the training epoch's
time as a ratio to Adam's.

    python -m imbsam.anomaly.table RUN... [--plot auroc.png] [--plot-curves curves.png] [--json table.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import textwrap
from collections import defaultdict

from imbsam.anomaly.config import OPTIMIZERS
from imbsam.anomaly.data import NUM_CLASSES
from imbsam.anomaly.run import DEFAULTS_OF_OLDER_RUNS
from imbsam.train.checkpoint import write_json
from imbsam.train.report import _pyplot, plotting_unavailable

# The published anchor: Deep SAD with Adam on Fashion-MNIST, scenario (i) (gamma_l 0.05, no
# pollution, one known anomaly class), mean ± sd AUROC (%) over 90 settings (10 normal x 9
# known anomaly classes), 150 + 150 epochs; Ruff et al., ICLR 2020, as quoted in AGAD's
# Table 2 (docs/anomaly.md says which copy was read).
PUBLISHED = {("fmnist", 0.05): (90.5, 6.5)}
# What may differ between the runs of one table: the setting's normal class and seed (and
# what follows from them: its known anomaly class, its data).
PER_RUN = ("normal_class", "seed", "known_anomaly_class", "data")


def read_runs(folders: list[str]) -> list[dict]:
    """Every finished optimizer's metrics under the run folders."""
    found = []
    for folder in folders:
        here = [os.path.join(folder, o, "metrics.json") for o in OPTIMIZERS]
        here = [p for p in here if os.path.isfile(p)]
        if not here:
            raise SystemExit(f"{folder}: no finished optimizer (no <opt>/metrics.json): not a finished run of "
                             "python -m imbsam.anomaly")
        for path in here:
            with open(path) as f:
                m = json.load(f)
            m["args"] = {**DEFAULTS_OF_OLDER_RUNS, **m["args"]} if m["opt"] != "adam" else m["args"]
            found.append(m)
    check_comparable(found)
    return found


def check_comparable(runs: list[dict]) -> None:
    """Refuses runs that one table must not mix: other options than the setting's class and
    seed, the same run twice, or an optimizer missing from some setting."""
    values = defaultdict(set)
    for m in runs:
        a = m["args"]
        for k, v in a.items():
            if k not in PER_RUN:
                values[k].add(v)
        values["known class offset"].add((a["known_anomaly_class"] - a["normal_class"]) % NUM_CLASSES)
    mixed = {k: sorted(v, key=str) for k, v in values.items() if len(v) > 1}
    if mixed:
        raise SystemExit("the runs mix settings (" + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in
                                                             sorted(mixed.items())) + "); tabulate each separately")
    seen, per_opt = set(), defaultdict(set)
    for m in runs:
        key = (m["opt"], m["args"]["normal_class"], m["args"]["seed"])
        if key in seen:
            raise SystemExit(f"{m['opt']}, normal class {key[1]}, seed {key[2]} is given twice; name each run once")
        seen.add(key)
        per_opt[m["opt"]].add(key[1:])
    every = set.union(*per_opt.values())
    missing = [f"class {c} seed {s} lacks {', '.join(o for o in per_opt if (c, s) not in per_opt[o])}"
               for c, s in sorted(every) if any((c, s) not in per_opt[o] for o in per_opt)]
    if missing:  # a mean over other runs would not compare the optimizers
        raise SystemExit("not every optimizer finished every setting: " + "; ".join(missing)
                         + "; finish them (--resume) or leave those runs out")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def summarise(runs: list[dict]) -> dict:
    """{opt: {normal_class: [AUROC % per seed]}}, the per-class and overall mean ± sd, and
    the epoch time ratio to Adam's (median over the runs that trained both)."""
    per = defaultdict(lambda: defaultdict(list))
    time = defaultdict(dict)  # (class, seed) -> {opt: epoch s}
    paired = defaultdict(dict)  # (class, seed) -> {opt: AUROC %}
    for m in runs:
        a = m["args"]
        per[m["opt"]][a["normal_class"]].append(100 * m["auroc"])
        paired[(a["normal_class"], a["seed"])][m["opt"]] = 100 * m["auroc"]
        for key in ("auroc_known", "auroc_unknown"):
            per[f"{m['opt']}:{key}"][a["normal_class"]].append(100 * m[key])
        time[(a["normal_class"], a["seed"])][m["opt"]] = m["epoch_train_s"]
    opts = [o for o in OPTIMIZERS if o in per]
    out = dict(optimizers=opts, classes=sorted({c for o in opts for c in per[o]}), auroc={}, overall={},
               seeds=sorted({m["args"]["seed"] for m in runs}))
    for o in opts:
        out["auroc"][o] = {c: _mean_sd(v) + (len(v),) for c, v in sorted(per[o].items())}
        # Over classes: the mean of the class means, and the sd of every (class, seed) run, as Deep SAD reports.
        every = [x for v in per[o].values() for x in v]
        out["overall"][o] = dict(all=_mean_sd(every), runs=len(every),
                                 known=_mean_sd([x for v in per[f"{o}:auroc_known"].values() for x in v]),
                                 novel=_mean_sd([x for v in per[f"{o}:auroc_unknown"].values() for x in v]))
        ratios = [t[o] / t["adam"] for t in time.values() if o in t and "adam" in t]
        out["overall"][o]["epoch_x_adam"] = statistics.median(ratios) if ratios else float("nan")
        # The runs are paired (one pre-training, one batch order): the per-run difference to
        # Adam's AUROC varies far less than the AUROCs do across classes.
        diffs = [p[o] - p["adam"] for p in paired.values() if "adam" in p]
        if o != "adam" and diffs:
            out["overall"][o]["minus_adam"] = _mean_sd(diffs) + (sum(d > 0 for d in diffs), len(diffs))
    return out


def format_summary(s: dict, setting: dict) -> str:
    cell = lambda ms: "    -     " if ms is None else f"{ms[0]:5.1f} ± {ms[1]:4.1f}".replace("nan", " - ")  # noqa: E731
    opts = s["optimizers"]
    lines = [f"Deep SAD on {setting['dataset']}, gamma_l {setting['gamma_l']:g}, gamma_p {setting['gamma_p']:g}, "
             f"{setting['ae_epochs']} pre-training + {setting['epochs']} training epochs, seeds "
             f"{', '.join(map(str, s['seeds']))}: test AUROC (%) at the final epoch, mean ± sd over seeds",
             f"{'normal class':14s}" + "".join(f"{o:>22s}" for o in opts)]
    for c in s["classes"]:
        lines.append(f"{c:<14d}" + "".join(f"{cell(s['auroc'][o][c][:2] if c in s['auroc'][o] else None):>22s}"
                                           for o in opts))
    for key, label in (("all", "all classes"), ("known", "known class"), ("novel", "novel classes")):
        lines.append(f"{label:14s}" + "".join(f"{cell(s['overall'][o][key]):>22s}" for o in opts))
    lines.append(f"{'runs':14s}" + "".join(f"{s['overall'][o]['runs']:22d}" for o in opts))
    if any("minus_adam" in s["overall"][o] for o in opts):
        def paired(o):
            d = s["overall"][o].get("minus_adam")
            return "-" if d is None else f"{d[0]:+.2f} ± {d[1]:.2f} ({d[2]}/{d[3]})"
        lines.append(f"{'vs Adam, paired':14s}" + "".join(f"{paired(o):>22s}" for o in opts))
    lines.append(f"{'epoch x Adam':14s}" + "".join(f"{s['overall'][o]['epoch_x_adam']:22.2f}" for o in opts))
    published = PUBLISHED.get((setting["dataset"], setting["gamma_l"]))
    if published and setting["gamma_p"] == 0:
        lines.append(f"published Deep SAD (Adam, 150 + 150 epochs, 90 settings): "
                     f"{published[0]:.1f} ± {published[1]:.1f}")
    lines.append("'all classes': over every (normal class, seed) run; 'known': normal against the labelled anomalies' "
                 "class; 'novel': against the other eight; 'vs Adam, paired': the run's AUROC minus Adam's on the same "
                 "setting, mean ± sd (runs above Adam's / runs)")
    return "\n".join(lines)


def plot_summary(s: dict, title: str, path: str) -> None:
    """AUROC per normal class, one bar per optimizer (mean over seeds, sd as the error bar)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.2))
    opts, classes = s["optimizers"], s["classes"]
    width = 0.8 / len(opts)
    for k, o in enumerate(opts):
        xs = [c + (k - (len(opts) - 1) / 2) * width for c in classes]
        means = [s["auroc"][o][c][0] for c in classes]
        sds = [0 if math.isnan(s["auroc"][o][c][1]) else s["auroc"][o][c][1] for c in classes]
        overall = s["overall"][o]["all"][0]
        ax.bar(xs, means, width, yerr=sds, capsize=2, color=f"C{k}", label=f"{o} (mean {overall:.1f})")
    ax.set_xticks(classes)
    ax.set_xlabel("normal class")
    ax.set_ylabel("test AUROC (%), final epoch")
    low = min(s["auroc"][o][c][0] for o in opts for c in classes)
    ax.set_ylim(max(0, low - 10), 100)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(textwrap.fill(title, 100), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(runs: list[dict], title: str, path: str) -> None:
    """Test AUROC after each epoch, per optimizer: the mean over the runs, and each run faintly
    (whether the epochs afforded were enough to level off)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k, o in enumerate(o for o in OPTIMIZERS if any(m["opt"] == o for m in runs)):
        curves = [[100 * h["auroc"] for h in m["history"]] for m in runs if m["opt"] == o]
        epochs = range(1, len(curves[0]) + 1)
        for c in curves:
            ax.plot(epochs, c, color=f"C{k}", alpha=0.12, lw=0.8)
        ax.plot(epochs, [statistics.fmean(v) for v in zip(*curves)], color=f"C{k}", lw=2, marker=".",
                label=f"{o} (mean of {len(curves)} runs)")
    ax.set_xlabel("epoch (after the pre-training)")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test AUROC (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(textwrap.fill(title, 100), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m imbsam.anomaly.table", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders of python -m imbsam.anomaly")
    ap.add_argument("--plot", default=None, help="also write a PNG: AUROC per normal class and optimizer")
    ap.add_argument("--plot-curves", default=None, help="also write a PNG: test AUROC per epoch and optimizer")
    ap.add_argument("--json", default=None, help="also write the summary as JSON")
    args = ap.parse_args(argv)
    if (args.plot or args.plot_curves) and plotting_unavailable():  # before any work: a plot was asked for
        raise SystemExit(f"--plot: {plotting_unavailable()}")
    runs = read_runs(args.runs)
    first = runs[0]
    setting = dict(dataset=first["args"]["dataset"], gamma_l=first["args"]["gamma_l"],
                   gamma_p=first["args"]["gamma_p"], epochs=first["epochs"], ae_epochs=first["ae_epochs"])
    s = summarise(runs)
    text = format_summary(s, setting)
    print(text)
    if args.json:
        write_json(args.json, dict(setting=setting, **s, text=text))
    if args.plot:
        plot_summary(s, text.splitlines()[0], args.plot)
        print(f"wrote {args.plot}")
    if args.plot_curves:
        plot_curves(runs, text.splitlines()[0].split(": test AUROC")[0] + ": test AUROC (%) after each epoch",
                    args.plot_curves)
        print(f"wrote {args.plot_curves}")
    return s


if __name__ == "__main__":
    main()
