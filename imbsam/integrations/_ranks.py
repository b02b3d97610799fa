"""ImbSAM's tail gradient at w over the ranks: the integrations take it with
``torch.autograd.grad``, which DDP's reducer does not see, so they average it themselves."""
from __future__ import annotations

import torch


def average_over_ranks(grads: list, world: int) -> None:
    """Each tensor of ``grads`` (None skipped) replaced in place by its mean over the ranks:
    one all-reduce per dtype, of the tensors flattened."""
    if world == 1:
        return
    by_dtype: dict = {}
    for g in grads:
        if g is not None:
            by_dtype.setdefault(g.dtype, []).append(g)
    for tensors in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
