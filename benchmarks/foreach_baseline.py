"""The straightforward ``torch._foreach`` SAM / ImbSAM step: the baseline the fused ops must beat.

What a careful user writes without custom kernels: foreach norms, a copy for the backup,
foreach perturb/restore/combine, then ``torch.optim.SGD(foreach=True)``.
"""
from __future__ import annotations

import torch


class ForeachSharpness:
    """SAM (``first_step``/``second_step``) and ImbSAM (``stash``/``perturb``/``restore_and_step``) on foreach ops."""

    def __init__(self, params, rho: float, **sgd_kwargs):
        self.params = list(params)
        self.rho = rho
        self.sgd = torch.optim.SGD(self.params, foreach=True, **sgd_kwargs)
        self.backups = [torch.empty_like(p) for p in self.params]
        self.heads = None

    @torch.no_grad()
    def stash(self):
        self.heads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def perturb(self):
        grads = [p.grad for p in self.params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_copy_(self.backups, self.params)
        torch._foreach_add_(self.params, torch._foreach_mul(grads, self.rho / (norm + 1e-16)))
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def restore_and_step(self):
        torch._foreach_copy_(self.params, self.backups)
        if self.heads is not None:
            torch._foreach_add_([p.grad for p in self.params], self.heads)
            self.heads = None
        self.sgd.step()
