"""Finished runs of one recipe under several seeds, summarised per optimizer.

One seed of a long-tailed run says little: single classes with a few dozen images move by
points between seeds. So runs are grouped by optimizer and recipe (everything that
changes the result except the seed), and each group reports its mean and sample
standard deviation (``report.plot_seeds`` shows every seed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from imbsam.train.config import as_recorded
from imbsam.train.data.profile import ACCURACY_KEYS

# The arguments that make two runs different experiments rather than two seeds of one.
RECIPE_KEYS = ("dataset", "imb_factor", "model", "epochs", "batch_size", "lr", "momentum", "weight_decay",
               "lr_schedule", "rho", "eta", "tail_weight", "amp", "perturbed_bn_stats", "tail_passes",
               "sharpness_schedule")
# The keys SGD ignores (SAM's and ImbSAM's settings): they must not split its seeds.
SHARPNESS_KEYS = ("rho", "eta", "tail_weight", "perturbed_bn_stats", "tail_passes", "sharpness_schedule")


def seed_of(metrics: dict):
    return metrics.get("args", {}).get("seed")


def recipe_of(metrics: dict) -> dict:
    args = as_recorded(metrics.get("args", {}))
    recipe = {k: args.get(k, metrics.get(k)) for k in RECIPE_KEYS}
    if metrics["opt"] == "sgd":
        for k in SHARPNESS_KEYS:
            recipe[k] = None
    return recipe


def method_of(metrics: dict) -> str:
    """The optimizer with what changes its passes: ``imbsam``, ``imbsam tail passes``,
    ``imbsam periodic:8``, ``imbsam tail passes periodic:4``."""
    args = as_recorded(metrics.get("args", {}))
    parts = [metrics["opt"]]
    if args.get("tail_passes") == "subset":
        parts.append("tail passes")
    if args.get("sharpness_schedule") not in (None, "every"):
        parts.append(args["sharpness_schedule"])
    return " ".join(parts)


@dataclass
class SeedGroup:
    opt: str
    recipe: dict
    runs: list[dict] = field(default_factory=list)  # metrics.json contents
    label: str = ""

    @property
    def seeds(self) -> list:
        return [seed_of(m) for m in self.runs]

    def stats(self, key: str) -> tuple[float, float]:
        """(mean, sample standard deviation (nan for one run)) of accuracy `key`."""
        values = [m[key] for m in self.runs]
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
        return mean, sd


def group_by_recipe(named_metrics: list[tuple[str, dict]]) -> list[SeedGroup]:
    """(run folder, metrics) pairs -> groups in order of first appearance. The same seed twice
    in a group is an error: it is one run counted twice (or an identical rerun)."""
    groups: dict[tuple, SeedGroup] = {}  # insertion-ordered: first appearance
    where: dict[tuple, str] = {}  # (group key, seed) -> the run folder that gave it
    for name, m in named_metrics:
        recipe = recipe_of(m)
        key = (m["opt"], *recipe.values())
        if key not in groups:
            groups[key] = SeedGroup(m["opt"], recipe)
        group = groups[key]
        seed = seed_of(m)
        if (key, seed) in where:
            raise ValueError(f"{where[key, seed]} and {name} are the same recipe with the same seed ({seed}); "
                             "give each seed once")
        where[key, seed] = name
        group.runs.append(m)
    ordered = list(groups.values())
    for g in ordered:
        g.label = _label(g, ordered)
    return ordered


def _label(group: SeedGroup, groups: list[SeedGroup]) -> str:
    """The optimizer, plus the recipe values that tell it apart from the optimizer's other groups."""
    same_opt = [g for g in groups if g.opt == group.opt]
    differing = [k for k in RECIPE_KEYS if len({repr(g.recipe[k]) for g in same_opt}) > 1]
    return group.opt + (" (" + ", ".join(f"{k} {group.recipe[k]}" for k in differing) + ")" if differing else "")


def format_seed_table(groups: list[SeedGroup], title: str = "") -> str:
    """Mean ± sample standard deviation per group, and which seeds each group holds."""
    lines = [title] if title else []
    lines.append(f"{'':28s} {'seeds':>5s} " + " ".join(f"{k.capitalize():>11s}" for k in ACCURACY_KEYS))
    for g in groups:
        cells = []
        for k in ACCURACY_KEYS:
            mean, sd = g.stats(k)
            cells.append(f"{mean:5.1f} ± {sd:3.1f}" if not math.isnan(sd) else f"{mean:5.1f}      ")
        lines.append((f"{g.label:28s} {len(g.runs):5d} " + " ".join(f"{c:>11s}" for c in cells)).rstrip())
    lines.append("(mean ± sample standard deviation over the seeds: " +
                 "; ".join(f"{g.label} {', '.join(str(s) for s in g.seeds)}" for g in groups) + ")")
    return "\n".join(lines)
