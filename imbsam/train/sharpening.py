"""The trainer's ``--sharpness-schedule``: which steps of SAM and ImbSAM sharpen (imbsam.schedules)."""
from __future__ import annotations

from typing import Optional

from imbsam.schedules import AESAM, Bernoulli, Periodic, SharpnessSchedule

# The spellings, with what each means (the help text and the errors read this).
SPECS = {"every": "every step (the paper's)", "periodic:K": "every K-th step (steps 0, K, 2K, ...)",
         "bernoulli:P": "each step with probability P (drawn from --seed)",
         "aesam": "AE-SAM: where the perturbation gradient's squared norm is high against its running statistics"}
DEFAULT = "every"


def parse(spec: str) -> tuple[str, Optional[float]]:
    """``(kind, value)`` of a spec, or SystemExit naming what is allowed."""
    kind, _, value = spec.partition(":")
    allowed = "; ".join(f"{k}: {v}" for k, v in SPECS.items())
    if kind in ("every", "aesam") and not value:
        return kind, None
    try:
        if kind == "periodic":
            k = int(value)
            if k >= 1 and str(k) == value:
                return kind, k
        elif kind == "bernoulli":
            p = float(value)
            if 0 <= p <= 1:
                return kind, p
    except ValueError:
        pass
    raise SystemExit(f"--sharpness-schedule {spec!r}: allowed are {allowed} (K an integer >= 1, P in [0, 1])")


def describe(spec: str) -> str:
    kind, value = parse(spec)
    if kind == "periodic":
        return f"every {value}-th step"
    if kind == "bernoulli":
        return f"each step with probability {value:g}"
    return {"every": "every step", "aesam": "by AE-SAM's rule"}[kind]


def build(spec: str, seed: int, total_steps: int) -> Optional[SharpnessSchedule]:
    """The optimizer's schedule for a spec: None for ``every``."""
    kind, value = parse(spec)
    if kind == "periodic":
        return Periodic(value)
    if kind == "bernoulli":
        return Bernoulli(value, seed=seed)
    if kind == "aesam":
        return AESAM(total_steps=total_steps)
    return None
