"""Fake (meta) kernels of the compiled ops, so torch.compile and CUDA graphs can trace them.

The in-place ops return nothing; the norm is a 0-d tensor whose dtype follows the spec.
"""
from __future__ import annotations

import torch

from imbsam import _library, reference


def register() -> None:
    if not _library.LOADED:
        return

    @torch.library.register_fake("imbsam::grad_norm")
    def _grad_norm_fake(grads, adaptive_grads, adaptive_params, eta_a):
        everything = list(grads) + list(adaptive_grads)
        return everything[0].new_empty((), dtype=reference.norm_dtype(everything))

    @torch.library.register_fake("imbsam::perturb_")
    def _perturb_fake(params, grads, backups, norm, rho, eta_a, adaptive):
        return None

    @torch.library.register_fake("imbsam::restore_")
    def _restore_fake(params, backups):
        return None

    @torch.library.register_fake("imbsam::add_head_grads_")
    def _add_head_grads_fake(grads, head_grads):
        return None

    @torch.library.register_fake("imbsam::restore_sgd_step_")
    def _restore_sgd_step_fake(params, grads, backups, head_grads, momentum_buffers, lr, momentum, dampening,
                               weight_decay, nesterov, maximize, first_momentum_step, lr_tensor=None,
                               found_inf=None):
        return None


register()
