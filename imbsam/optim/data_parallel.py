"""SAM and ImbSAM under ``DistributedDataParallel``: every phase reads gradients averaged
over the ranks, each averaged once.

DDP averages the gradients of the first backward after each forward (bucketed, overlapped
with the backward) and leaves any further backward through the same forward local.
SAM's two backward passes each follow a forward, so DDP averages both. ImbSAM's tail
backward goes through the forward its head backward used: DDP leaves ``g_T`` local, and
each rank would perturb with its own ``g_T``. ``sync_data_parallel`` watches the model's
forwards and backward passes and averages, before a phase reads them, exactly the
gradients DDP did not: one all-reduce per dtype (the tensors flattened into one buffer),
none where DDP already did.

Which gradients DDP averaged is decided per gradient tensor, not per phase: gradient
accumulation may run several backward passes between two phases, and ImbSAM's recipe that
frees each micro-batch's graph (``docs/semantics.md``) backpropagates the tail first, into
buffers of its own, so DDP averages the tail's backward and leaves the head's local. A
post-accumulate-grad hook on one parameter (every backward through the model reaches it)
records, for the gradient tensor that backward wrote, whether it was the first backward
after a forward with DDP's sync on, which is the one DDP averages, together with
everything accumulated before it. A phase whose gradients were last written by any other
backward, or by one the hook did not see, is averaged by imbsam.

``perturbation="local"`` is the original SAM paper's m-sharpness instead: each rank
perturbs with its own gradient (``g`` for SAM, ``g_T`` for ImbSAM) and the gradients of
the step (``g'``, and ``g_H``) are averaged.
"""
from __future__ import annotations

import weakref
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor

PERTURBATIONS = ("global", "local")


class DataParallelSync:
    """What ``sync_data_parallel`` returns: ``remove()`` detaches it from the model and optimizer."""

    def __init__(self, optimizer, ddp_model: torch.nn.Module, perturbation: str, watched: Tensor):
        self._engine = optimizer._engine
        self._ddp = ddp_model
        self._local = perturbation == "local"
        self._group = ddp_model.process_group
        self._world = dist.get_world_size(self._group)
        self._watched = watched  # the parameter whose gradient tells which backward wrote the gradients
        # Whether the next backward is the one DDP averages: the first after a forward with sync on.
        self._armed = False
        # Per gradient tensor of the watched parameter (by id, dropped with the tensor): whether
        # the last backward that wrote it was one DDP averaged.
        self._written: dict[int, tuple[weakref.ref, bool]] = {}
        self._suppressed = False  # this forward runs without DDP's sync (local perturbation)
        self._handles: list = [
            ddp_model.register_forward_pre_hook(self._before_forward),
            ddp_model.register_forward_hook(self._after_forward),
            watched.register_post_accumulate_grad_hook(self._after_backward),
            # First, whenever it is registered: a GradScaler's check must read averaged gradients.
            optimizer.register_phase_hook(self._before_phase, prepend=True),
        ]

    def _first_forward_of_a_sam_step(self) -> bool:
        return self._engine.phase == "idle" and "head" not in self._engine.phase_names

    def _before_forward(self, module, args) -> None:
        if not torch.is_grad_enabled():
            return  # an evaluation forward: DDP prepares no reduction, nothing changes
        if self._local and self._first_forward_of_a_sam_step() and self._ddp.require_backward_grad_sync:
            # SAM's perturbation gradient stays local: this forward's backward is not averaged.
            self._ddp.require_backward_grad_sync = False
            self._suppressed = True
        self._armed = self._ddp.require_backward_grad_sync

    def _after_forward(self, module, args, output) -> None:
        if self._suppressed:
            self._ddp.require_backward_grad_sync = True
            self._suppressed = False

    def _after_backward(self, param: Tensor) -> None:
        grad = param.grad
        key = id(grad)
        self._written[key] = (weakref.ref(grad, lambda _, key=key: self._written.pop(key, None)), self._armed)
        self._armed = False  # DDP averages one backward per forward

    def _averaged_by_ddp(self) -> bool:
        grad = self._watched.grad
        record = self._written.get(id(grad)) if grad is not None else None
        return record is not None and record[0]() is grad and record[1]

    def _before_phase(self, phase: str, params: list, grads: list) -> None:
        if self._averaged_by_ddp() or (self._local and phase == "perturb"):
            return
        average_gradients(grads, self._world, self._group)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def sync_data_parallel(optimizer, ddp_model: torch.nn.Module, perturbation: str = "global") -> DataParallelSync:
    """Makes ``optimizer`` (``imbsam.SAM``, ``imbsam.ImbSAM`` or their ``compat`` adapters)
    take, under ``ddp_model`` (a ``DistributedDataParallel``), the step one process takes on
    the global batch: call it once, after building both.

    ``perturbation="global"`` (default) perturbs with the gradient averaged over the ranks;
    ``"local"`` with each rank's own (m-sharpness, the original SAM paper's).
    """
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation={perturbation!r}; allowed: {', '.join(map(repr, PERTURBATIONS))}")
    if not hasattr(optimizer, "_engine") or not hasattr(optimizer, "register_phase_hook"):
        raise TypeError(f"sync_data_parallel() takes an imbsam optimizer (SAM, ImbSAM or a compat adapter), got "
                        f"{type(optimizer).__name__}")
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"sync_data_parallel() takes the DistributedDataParallel model the optimizer trains, got "
                        f"{type(ddp_model).__name__}")
    schedule = getattr(optimizer._engine, "schedule", None)
    if perturbation == "local" and schedule is not None and schedule.needs_gradient:
        raise ValueError(f"sync_data_parallel(perturbation='local') with a {type(schedule).__name__} schedule: it "
                         "decides from the perturbation gradient, which would differ between the ranks, and so "
                         "would their passes; use perturbation='global', or a Periodic or Bernoulli schedule")
    watched = next((p for p in ddp_model.module.parameters() if p.requires_grad), None)
    if watched is None:
        raise ValueError("sync_data_parallel(): the model has no parameter that requires a gradient")
    return DataParallelSync(optimizer, ddp_model, perturbation, watched)


def average_gradients(grads: list[Tensor], world: int, group=None) -> None:
    """Averages ``grads`` in place over the ranks: one all-reduce per (dtype, device), over
    the tensors flattened into one buffer. Divided before the sum, as DDP's own hook does."""
    by_kind: dict = defaultdict(list)
    for g in grads:
        by_kind[(g.dtype, g.device)].append(g)
    for same in by_kind.values():
        flat = torch.cat([g.reshape(-1) for g in same]).div_(world)
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in same:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
