"""The Many/Medium/Few/All table and the PNG plots of a run."""
from __future__ import annotations

import math
import os

from imbsam.train.data.profile import ACCURACY_KEYS, SHOT_GROUPS


def format_table(rows: list[tuple[str, dict]], title: str = "") -> str:
    """rows: (label, {'many', 'medium', 'few', 'all'}) -> an aligned text table."""
    lines = [title] if title else []
    lines.append(f"{'':40s} {'Many':>6s} {'Medium':>7s} {'Few':>6s} {'All':>6s}")
    for label, m in rows:
        cells = [("   -  " if m.get(k) is None or math.isnan(m[k]) else f"{m[k]:6.1f}") for k in ACCURACY_KEYS]
        lines.append(f"{label:40s} {cells[0]:>6s} {cells[1]:>7s} {cells[2]:>6s} {cells[3]:>6s}")
    return "\n".join(lines)


def plotting_unavailable() -> str | None:
    """Why no plot can be drawn here (matplotlib missing or broken), or None. Asked before a
    run trains, so that a missing matplotlib costs a warning, not the run's exit status."""
    try:
        _pyplot()
    except Exception as exc:  # ImportError, or a broken install failing anywhere in its import
        return (f"matplotlib cannot be imported ({type(exc).__name__}: {exc}); the plots are skipped "
                "(pip install matplotlib, then python -m imbsam.train.table RUN... --plot FILE draws them)")
    return None


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def plot_per_class(per_class: list[float], counts: list[int], groups: list[str], title: str, path: str) -> None:
    """Per-class test accuracy against the class's training count (log scale), by group."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
    for g in SHOT_GROUPS:
        xs = [c for c, gg in zip(counts, groups) if gg == g]
        ys = [a for a, gg in zip(per_class, groups) if gg == g]
        if xs:
            ax.scatter(xs, ys, s=22, c=colours[g], label=f"{g} ({len(xs)} classes)", alpha=0.85)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(history: list[dict], title: str, path: str) -> None:
    """Training loss, training accuracy and the test Many/Medium/Few/All accuracy per epoch."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker=".")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    ax_acc.plot(epochs, [h["train_acc"] for h in history], label="train (batch)", color="grey", ls="--",
                marker=".")
    tested = [h for h in history if "all" in h]
    for key, colour in (("many", "tab:blue"), ("medium", "tab:orange"), ("few", "tab:red"), ("all", "black")):
        ax_acc.plot([h["epoch"] for h in tested], [h[key] for h in tested], marker=".", label=f"test {key}",
                    color=colour)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_comparison(runs: list[tuple[str, dict, list[dict]]], title: str, path: str) -> None:
    """Runs side by side, each (label, metrics, history): per-class test accuracy against the
    training count (final epoch), and the test All and Few accuracy per epoch."""
    plt = _pyplot()
    fig, (ax_cls, ax_ep) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, (label, m, history) in enumerate(runs):
        colour = f"C{k}"
        order = sorted(range(len(m["counts"])), key=lambda c: -m["counts"][c])
        ax_cls.plot([m["counts"][c] for c in order], [m["per_class"][c] for c in order], marker="o", ms=4,
                    color=colour, alpha=0.85, label=f"{label}: All {m['all']:.1f}, Few {m['few']:.1f}")
        tested = [h for h in history if "all" in h]
        epochs = [h["epoch"] for h in tested]
        # Markers: a run of one epoch has one point a line alone would not draw.
        ax_ep.plot(epochs, [h["all"] for h in tested], color=colour, marker="o", ms=4, label=f"{label} All")
        ax_ep.plot(epochs, [h["few"] for h in tested], color=colour, ls="--", marker="s", ms=4,
                   label=f"{label} Few")
    ax_cls.set_xscale("log")
    ax_cls.set_xlabel("training images of the class")
    ax_cls.set_ylabel("test accuracy (%), final epoch")
    ax_cls.grid(alpha=0.3)
    ax_cls.legend(fontsize=8)
    ax_ep.set_xlabel("epoch")
    ax_ep.set_ylabel("test accuracy (%)")
    ax_ep.grid(alpha=0.3)
    ax_ep.legend(fontsize=8, ncol=2)
    from matplotlib.ticker import MaxNLocator
    ax_ep.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_seeds(groups, title: str, path: str) -> None:
    """Every seed's final Many/Medium/Few/All accuracy as a dot, each group's mean as a bar:
    the spread between seeds next to the differences between optimizers."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / max(len(groups), 1)
    for k, g in enumerate(groups):
        colour = f"C{k}"
        for j, key in enumerate(ACCURACY_KEYS):
            x = j - 0.4 + width * (k + 0.5)
            mean = g.stats(key)[0]
            ax.scatter([x] * len(g.runs), [m[key] for m in g.runs], s=18, color=colour, alpha=0.8, zorder=3)
            ax.hlines(mean, x - width * 0.4, x + width * 0.4, color=colour, lw=2.5,
                      label=f"{g.label} ({len(g.runs)} seed{'s' if len(g.runs) > 1 else ''})" if j == 0 else None)
    ax.set_xticks(range(len(ACCURACY_KEYS)), [k.capitalize() for k in ACCURACY_KEYS])
    ax.set_ylabel("test accuracy (%), final epoch")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title + "\ndots: seeds, bars: means", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_plots(metrics: dict, history: list[dict], out: str) -> list[str]:
    """The run's two plots in ``out``; none (an empty list) where matplotlib cannot be imported."""
    if plotting_unavailable():
        return []
    title = f"{metrics['dataset']} (IF {metrics['imb_factor']:g}), {metrics['model']}, {metrics['opt']}"
    paths = [os.path.join(out, "per_class_accuracy.png"), os.path.join(out, "training_curves.png")]
    plot_per_class(metrics["per_class"], metrics["counts"], metrics["groups"], title, paths[0])
    plot_curves(history, title, paths[1])
    return paths
