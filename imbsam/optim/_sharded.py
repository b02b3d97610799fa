"""The ops on sharded parameters (FSDP2's ``fully_shard``: DTensor parameters and gradients).

Every op but the norm is elementwise: it runs on each rank's local shards, which are the
parameters' own memory. The norm is global: each rank's sum of squares over its shards,
all-reduced over the mesh dimensions the tensors are sharded on (not a per-shard norm),
so every rank perturbs with the norm one process would compute over whole tensors.
"""
from __future__ import annotations

from typing import Sequence

import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch < 2.5 names them privately, and has no fully_shard to make them
    try:
        from torch.distributed._tensor import DTensor, Replicate, Shard
    except ImportError:  # a torch built without distributed
        DTensor = Replicate = Shard = None


def is_sharded(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(ts: Sequence[Tensor]) -> list[Tensor]:
    # to_local() under no_grad is the shard itself, not a copy: writes reach the parameter.
    return [t.to_local() if is_sharded(t) else t for t in ts]


def _shard_groups(ts: Sequence[Tensor]) -> list:
    """The process groups a sum over these tensors' shards is reduced over: one per mesh
    dimension they are sharded on (a replicated dimension holds copies, not parts)."""
    layouts = {(t.device_mesh, tuple(t.placements)) for t in ts if is_sharded(t)}
    if len(layouts) > 1:
        raise ValueError("imbsam: the sharded parameters of one optimizer must share one device mesh and one "
                         f"placement; found {len(layouts)}: {sorted(str(p) for _, p in layouts)}")
    if not layouts:
        return []
    mesh, placements = layouts.pop()
    for placement in placements:
        if not isinstance(placement, (Shard, Replicate)):
            raise ValueError(f"imbsam: a gradient placed as {placement} (not reduced yet?) cannot be stepped; "
                             "FSDP2 reduces gradients to Shard placements in its backward")
    return [mesh.get_group(dim) for dim, placement in enumerate(placements) if isinstance(placement, Shard)]


class LocalShardOps:
    """The backend's ops (``ops``) applied to local shards; the same signatures."""

    def __init__(self, ops):
        self.ops = ops

    def grad_norm(self, grads, adaptive_grads, adaptive_params, eta_a) -> Tensor:
        local = self.ops.grad_norm(_local(grads), _local(adaptive_grads), _local(adaptive_params), eta_a)
        squares = local.double().square()  # this rank's sum of squares, in fp64 for the sum over ranks
        for group in _shard_groups(list(grads) + list(adaptive_grads)):
            dist.all_reduce(squares, group=group)
        return squares.sqrt().to(local.dtype)

    def perturb_(self, params, grads, backups, norm, rho, eta_a, adaptive) -> None:
        self.ops.perturb_(_local(params), _local(grads), _local(backups), norm, rho, eta_a, adaptive)

    def restore_(self, params, backups) -> None:
        self.ops.restore_(_local(params), _local(backups))

    def add_head_grads_(self, grads, head_grads) -> None:
        self.ops.add_head_grads_(_local(grads), _local(head_grads))

    def restore_sgd_step_(self, params, grads, backups, head_grads, momentum_buffers, *args, **kwargs) -> None:
        self.ops.restore_sgd_step_(_local(params), _local(grads), _local(backups), _local(head_grads),
                                   _local(momentum_buffers), *args, **kwargs)

    def restore_adam_step_(self, params, grads, backups, head_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                           state_steps, *args, **kwargs) -> None:
        # Adam's step counts are plain tensors under FSDP2; its moments are DTensors like the parameters.
        self.ops.restore_adam_step_(_local(params), _local(grads), _local(backups), _local(head_grads),
                                    _local(exp_avgs), _local(exp_avg_sqs), _local(max_exp_avg_sqs), state_steps,
                                    *args, **kwargs)
