"""The paper's SAM and ImbSAM optimizers, op for op: the code a user of the paper runs.

Written here from the paper's published algorithm and loop structure (ASAM's ``SAM``
class, which the ImbSAM repository builds on), not copied: per-tensor loops over
``model.named_parameters()``, per-tensor norms stacked into the global one, a persistent
``eps`` tensor per parameter (``clone`` once, then ``mul_``), ``p.add_(eps)`` /
``p.sub_(eps)``, ImbSAM's head gradients cloned and added back with ``add_``, and the
wrapped optimizer's own ``step()`` and ``zero_grad()``. Nothing from imbsam is used:
``tests/test_paper_semantics.py`` checks imbsam against it, and the benchmarks time it as
the baseline a user would run instead.
"""
from __future__ import annotations

import torch


def _perturb(model, rho, eps_of):
    grads = [torch.norm(p.grad, p=2) for _, p in model.named_parameters() if p.grad is not None]
    grad_norm = torch.norm(torch.stack(grads), p=2) + 1.0e-16
    for _, p in model.named_parameters():
        if p.grad is None:
            continue
        eps = eps_of.setdefault(p, torch.clone(p).detach())
        eps[...] = p.grad[...]
        eps.mul_(rho / grad_norm)
        p.add_(eps)


class PaperSAM:
    """``first_step()`` after the first backward, ``second_step()`` after the one at w + e."""

    def __init__(self, optimizer, model, rho=0.5):
        self.optimizer, self.model, self.rho = optimizer, model, rho
        self.state = {}

    @torch.no_grad()
    def first_step(self):
        _perturb(self.model, self.rho, self.state)
        self.optimizer.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for _, p in self.model.named_parameters():
            if p.grad is None:
                continue
            p.sub_(self.state[p])
        self.optimizer.step()
        self.optimizer.zero_grad()


class PaperImbSAM:
    """``first_step()`` after the head backward, ``second_step()`` after the tail backward,
    ``third_step()`` after the tail backward at w + e."""

    def __init__(self, optimizer, model, rho=0.05):
        self.optimizer, self.model, self.rho = optimizer, model, rho
        self.state = {}
        self.head_grads = {}

    @torch.no_grad()
    def first_step(self):
        for _, p in self.model.named_parameters():
            if p.grad is None:
                continue
            self.head_grads[p] = p.grad.clone()
        self.optimizer.zero_grad()

    @torch.no_grad()
    def second_step(self):
        _perturb(self.model, self.rho, self.state)
        self.optimizer.zero_grad()

    @torch.no_grad()
    def third_step(self):
        for _, p in self.model.named_parameters():
            if p.grad is None:
                continue
            p.sub_(self.state[p])
            p.grad.add_(self.head_grads[p])
        self.optimizer.step()
        self.optimizer.zero_grad()


class ParamModule(torch.nn.Module):
    """A bare parameter list as a module, for the paper's ``(optimizer, model, rho)``."""

    def __init__(self, params):
        super().__init__()
        self.params = torch.nn.ParameterList(params)
