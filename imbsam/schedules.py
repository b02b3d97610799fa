"""Sharpness schedules: which steps of SAM or ImbSAM sharpen, and which are plain base steps.

A step that sharpens costs SAM's passes (ImbSAM's, or its tail-sample passes); one that does
not is the base optimizer's step on the step's gradient at ``w`` (SAM's ``g``, ImbSAM's
``g_H + g_T``), with the passes of a plain training step when the decision is known before
them. Three rules from the literature, each an object given to ``SAM(..., schedule=)`` or
``ImbSAM(..., schedule=)``:

- ``Periodic(k)``: the steps ``0, k, 2k, ...`` (LookSAM's period, without its reuse of the
  sharpness direction in between).
- ``Bernoulli(p, seed)``: each step with probability ``p`` (SS-SAM; RST for the same draw).
- ``AESAM(total_steps)``: where the squared norm of the step's perturbation gradient is high
  against its running mean and standard deviation (AE-SAM, Jiang et al., ICLR 2023).

The first two decide on the host from the number of steps taken (and a seed), before any
pass, with no device sync. AE-SAM decides from the gradient, on the device, and the host
reads that one flag: the host launches the passes, and whether a second forward and
backward runs is the decision itself.
"""
from __future__ import annotations

import math
import random
from typing import Optional

import torch
from torch import Tensor


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {low}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")


def _check_real(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (low < value if low_open else low <= value) or not value <= high:  # also rejects NaN
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")


class SharpnessSchedule:
    """What the optimizers ask of a schedule. ``steps``: steps taken so far (sharpened or not,
    skipped ones included; an abandoned step is not one); ``sharpened``: how many of them
    sharpened."""

    # Whether the decision needs the step's perturbation gradient (made at the perturbation
    # phase) rather than being known before the step's passes.
    needs_gradient = False

    def __init__(self):
        self.steps = 0
        self.sharpened = 0  # of those, the steps that sharpened (the cost: SAM's passes)
        self.attached = False  # to an optimizer: each counts its own steps, so one schedule serves one

    def attach(self) -> None:
        if self.attached:
            raise ValueError(f"imbsam: this {type(self).__name__} schedule already belongs to an optimizer, which "
                             "counts its steps; give each optimizer a schedule of its own")
        self.attached = True

    def sharpens(self) -> bool:
        """This step's decision, for a schedule that does not need the gradient."""
        raise NotImplementedError

    def decide(self, norm: Tensor, reported_inf: Optional[Tensor]) -> bool:
        """This step's decision from its perturbation gradient's global norm (a device tensor)."""
        return self.sharpens()

    def step_taken(self, sharpened: bool) -> None:
        self.steps += 1
        self.sharpened += int(sharpened)

    def settings(self) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"kind": type(self).__name__, "settings": self.settings(), "steps": self.steps,
                "sharpened": self.sharpened}

    def load_state_dict(self, state: dict) -> None:
        """Refuses, before anything is loaded, a state of another kind or other settings."""
        if not isinstance(state, dict) or state.get("kind") != type(self).__name__:
            kind = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"imbsam: the state dict's sharpness schedule is {kind!r}, this optimizer's is "
                             f"{type(self).__name__!r}")
        if state.get("settings") != self.settings():
            raise ValueError(f"imbsam: the state dict's {type(self).__name__} schedule has settings "
                             f"{state.get('settings')}, this optimizer's {self.settings()}")
        steps, sharpened = state.get("steps"), state.get("sharpened", 0)
        _check_int("the schedule state's steps", steps, 0)
        _check_int("the schedule state's sharpened steps", sharpened, 0)
        self._load_extra(state)
        self.steps, self.sharpened = steps, sharpened

    def _load_extra(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


class Periodic(SharpnessSchedule):
    """Sharpens the steps ``0, k, 2k, ...``; ``k = 1`` is every step."""

    def __init__(self, k: int):
        _check_int("Periodic's k", k, 1)
        super().__init__()
        self.k = k

    def sharpens(self) -> bool:
        return self.steps % self.k == 0

    def settings(self) -> dict:
        return {"k": self.k}


class Bernoulli(SharpnessSchedule):
    """Sharpens each step with probability ``p``, independently.

    The draw of step ``n`` is a function of ``(seed, n)`` alone (Python's ``random`` seeded
    with a string, which it hashes with SHA-512): the same on every rank and after a resume,
    and it touches no global random state.
    """

    def __init__(self, p: float, seed: int = 0):
        _check_real("Bernoulli's p", p, 0.0, 1.0)
        _check_int("Bernoulli's seed", seed, 0)
        super().__init__()
        self.p, self.seed = float(p), seed

    def sharpens(self) -> bool:
        return random.Random(f"imbsam.Bernoulli:{self.seed}:{self.steps}").random() < self.p

    def settings(self) -> dict:
        return {"p": self.p, "seed": self.seed}


class AESAM(SharpnessSchedule):
    r"""AE-SAM's rule: sharpen when ``s = ||g||^2 >= mu + c sigma``.

    With ``g`` the step's perturbation gradient (SAM's ``g``, ImbSAM's ``g_T``; global over
    the parameters, averaged over ranks under ``sync_data_parallel``), each step first updates
    the running statistics, then compares::

        mu    <- delta mu    + (1 - delta) s
        var   <- delta var   + (1 - delta) (s - mu)^2
        c     =  c_start + (c_end - c_start) min(n / total_steps, 1)

    ``mu`` and ``var`` start at 0 and live on the gradients' device in float64; a step whose
    ``s`` is not finite (or for which a hook reported an inf) leaves them as they were and
    sharpens, so that its perturbation phase skips the step as every non-finite gradient does.
    Under a normal ``s``, ``c`` from -1 to 1 sharpens about 84 % of the steps at the start
    and 16 % at the end, half over the run; these defaults are this library's, chosen for that
    half.
    """

    needs_gradient = True

    def __init__(self, total_steps: int, delta: float = 0.9, c_start: float = -1.0, c_end: float = 1.0):
        _check_int("AESAM's total_steps", total_steps, 1)
        _check_real("AESAM's delta", delta, 0.0, 1.0, low_open=True)
        if delta == 1.0:
            raise ValueError("AESAM's delta must be < 1 (with 1 the statistics never move), got 1.0")
        for name, value in (("c_start", c_start), ("c_end", c_end)):
            _check_real(f"AESAM's {name}", value, -math.inf, math.inf)
            if not math.isfinite(value):
                raise ValueError(f"AESAM's {name} must be finite, got {value!r}")
        super().__init__()
        self.total_steps, self.delta = total_steps, float(delta)
        self.c_start, self.c_end = float(c_start), float(c_end)
        self.mean: Optional[Tensor] = None
        self.var: Optional[Tensor] = None

    def sharpens(self) -> bool:
        raise TypeError("imbsam: an AESAM schedule decides from the step's perturbation gradient, which no pass has "
                        "computed yet: call the phases (SAM's first_step(), ImbSAM's second_step() return whether "
                        "they sharpened) instead of asking sharpens() before the step")

    def threshold_scale(self) -> float:
        return self.c_start + (self.c_end - self.c_start) * min(self.steps / self.total_steps, 1.0)

    def decide(self, norm: Tensor, reported_inf: Optional[Tensor]) -> bool:
        s = norm.detach().double().reshape(()) ** 2
        if self.mean is None or self.mean.device != s.device:
            zero = torch.zeros((), dtype=torch.float64, device=s.device)
            self.mean = zero if self.mean is None else self.mean.to(s.device)
            self.var = zero.clone() if self.var is None else self.var.to(s.device)
        ok = torch.isfinite(s)
        if reported_inf is not None:
            ok &= reported_inf.reshape(()).to(s.device) == 0
        mean = torch.where(ok, self.delta * self.mean + (1 - self.delta) * s, self.mean)
        var = torch.where(ok, self.delta * self.var + (1 - self.delta) * (s - mean) ** 2, self.var)
        self.mean, self.var = mean, var
        sharpen = ~ok | (s >= mean + self.threshold_scale() * var.sqrt())
        return bool(sharpen)  # the host launches the passes: the one sync of this rule

    def settings(self) -> dict:
        return {"total_steps": self.total_steps, "delta": self.delta, "c_start": self.c_start, "c_end": self.c_end}

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["mean"] = None if self.mean is None else self.mean.detach().cpu().clone()
        state["var"] = None if self.var is None else self.var.detach().cpu().clone()
        return state

    def _load_extra(self, state: dict) -> None:
        mean, var = state.get("mean"), state.get("var")
        if (mean is None) != (var is None):
            raise ValueError("imbsam: the AESAM state holds one of its running mean and variance without the other")
        for name, value in (("mean", mean), ("var", var)):
            if value is not None and not (isinstance(value, Tensor) and value.numel() == 1
                                          and value.dtype == torch.float64):
                raise ValueError(f"imbsam: the AESAM state's {name} must be a one-value float64 tensor, got "
                                 f"{type(value).__name__}")
        device = self.mean.device if self.mean is not None else None
        self.mean = None if mean is None else mean.reshape(()).clone().to(device or "cpu")
        self.var = None if var is None else var.reshape(()).clone().to(device or "cpu")


SCHEDULES = (Periodic, Bernoulli, AESAM)


def check_schedule(schedule) -> None:
    if schedule is not None and not isinstance(schedule, SharpnessSchedule):
        raise TypeError(f"schedule must be None (sharpen every step) or one of "
                        f"{', '.join('imbsam.schedules.' + s.__name__ for s in SCHEDULES)}, got "
                        f"{type(schedule).__name__}")
