"""Per param group, what every step reuses: its parameters with a gradient, their weight
backups and ASAM's split, rebuilt only when that set of parameters or a storage changes."""
from __future__ import annotations

import torch
from torch import Tensor


class GroupPlan:
    """A param group's parameters that have gradients, and what every step reuses for them.

    Rebuilt only when that set of parameters or one's storage changes, so that a step's
    per-parameter Python work is reading ``.grad``, not dictionary lookups.
    """

    __slots__ = ("params", "ids", "ptrs", "backups", "plain", "scaled")

    def __init__(self, params: list[Tensor], ids: list[int], ptrs: list[int], backups: list[Tensor]):
        self.params, self.ids, self.ptrs, self.backups = params, ids, ptrs, backups
        # ASAM's split: tensors of two or more dimensions are scaled, the others not.
        self.scaled = [j for j, p in enumerate(params) if p.dim() > 1]
        self.plain = [j for j, p in enumerate(params) if p.dim() <= 1]


class PlanCache:
    """The plans of one engine's param groups and the weight backups they share."""

    def __init__(self):
        # Per parameter: (backup, the parameter's storage pointer it was made for). Keyed by
        # id(p): a Tensor's __hash__ is a Python call, and the param groups keep every p alive.
        self.backups: dict[int, tuple[Tensor, int]] = {}
        self.plans: dict[int, GroupPlan] = {}  # per param group index

    def plan(self, index: int, params: list[Tensor]) -> GroupPlan:
        """The plan of group ``index`` whose parameters with a gradient are ``params``."""
        ids = list(map(id, params))
        plan = self.plans.get(index)
        if torch.compiler.is_compiling():
            # Dynamo cannot compare storage pointers; it guards on the metadata a backup must share.
            if plan is None or plan.ids != ids or not all(map(_fits, plan.backups, params)):
                plan = self.plans[index] = GroupPlan(params, ids, [-1] * len(params), [self.backup(p) for p in params])
            return plan
        # The storage pointers tell whether a parameter's memory was replaced (model.to(),
        # model.half(), p.data = ...): then it needs a backup of its new dtype and size.
        ptrs = [p.data_ptr() for p in params]
        if plan is None or plan.ids != ids or plan.ptrs != ptrs:
            plan = self.plans[index] = GroupPlan(params, ids, ptrs, [self.backup(p) for p in params])
        return plan

    def backup(self, p: Tensor) -> Tensor:
        # Kept across steps: one allocation per parameter, and fixed addresses for CUDA graphs.
        entry = self.backups.get(id(p))
        if torch.compiler.is_compiling():
            if entry is not None and _fits(entry[0], p):
                return entry[0]
            ptr = -1  # not known while tracing: the next eager step checks this backup again
        else:
            ptr = p.data_ptr()
            if entry is not None and entry[1] == ptr and entry[0].dtype == p.dtype:
                return entry[0]
        b = torch.empty_like(p, memory_format=torch.preserve_format)
        self.backups[id(p)] = (b, ptr)
        return b


def _fits(backup: Tensor, p: Tensor) -> bool:
    """Whether ``backup`` can hold ``p``'s values for the ops (which refuse any mismatch)."""
    return (backup.dtype == p.dtype and backup.device == p.device and backup.shape == p.shape
            and backup.stride() == p.stride())
