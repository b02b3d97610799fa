"""The hyper-parameter checks of SAM, ASAM and ImbSAM: the same clear errors in the
constructors, in each param group, before each perturbation and in load_state_dict."""
from __future__ import annotations

import torch


def _check_finite_nonnegative(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float >= 0, got {type(value).__name__} {value!r}")
    if not value >= 0 or value == float("inf"):  # also rejects NaN
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")


def check_rho(rho) -> None:
    _check_finite_nonnegative("rho", rho)


def check_adaptive_eta(adaptive_eta) -> None:
    # A NaN eta would make every norm NaN, and every step would be skipped in silence.
    _check_finite_nonnegative("adaptive_eta", adaptive_eta)


def check_adaptive(adaptive) -> None:
    if not (isinstance(adaptive, bool) or (type(adaptive) is int and adaptive in (0, 1))):
        raise TypeError(f"adaptive must be True or False, got {type(adaptive).__name__} {adaptive!r}")


def check_group_hypers(group: dict, defaults: dict) -> None:
    """A param group's own rho / adaptive (or the defaults it inherits)."""
    check_rho(group.get("rho", defaults["rho"]))
    check_adaptive(group.get("adaptive", defaults["adaptive"]))


def check_base_optimizer(base_optimizer) -> None:
    if isinstance(base_optimizer, torch.optim.Optimizer):
        raise TypeError("base_optimizer must be an optimizer class such as torch.optim.SGD (its keyword "
                        f"arguments go to the SAM constructor), not an instance of {type(base_optimizer).__name__}; "
                        "to wrap an existing optimizer use imbsam.compat.SAM / imbsam.compat.ImbSAM")
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
        raise TypeError(f"base_optimizer must be a subclass of torch.optim.Optimizer, got {base_optimizer!r}")
