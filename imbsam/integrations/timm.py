"""SAM, ASAM and ImbSAM in timm: ``import imbsam.integrations.timm`` registers them with timm's
optimizer factory, and ``sharpness_step`` is the train step timm's loop calls in place of
its forward, ``loss_scaler(...)`` / ``optimizer.step()``.

    import imbsam.integrations.timm as imbsam_timm                       # registers the names
    optimizer = timm.optim.create_optimizer_v2(model, "imbsamsgd", lr=0.1, weight_decay=5e-4, rho=0.05)
    ...
    loss = imbsam_timm.sharpness_step(model, optimizer, loss_fn, input, target,
                                      loss_scaler=loss_scaler, amp_autocast=amp_autocast,
                                      clip_grad=args.clip_grad, clip_mode=args.clip_mode)

The names have no underscore (timm reads ``a_b`` as base optimizer ``b`` with the prefix
``a``, e.g. ``lookahead_sgd``): ``samsgd``, ``sammomentum``, ``samadamw``, ``samadam``, the
same with ``asam`` and ``imbsam``. Each builds ``imbsam.SAM`` / ``ImbSAM`` around the torch
optimizer timm's own name builds (``sgd``: SGD with Nesterov momentum, ``momentum``: without),
with timm's parameter groups (no weight decay on biases and norms) and its momentum default.

``sharpness_step`` runs a step's passes (SAM: 2 forwards, 2 backwards; ImbSAM: 2 and 3),
with timm's ``NativeScaler`` (its GradScaler) or none, and clips the gradient the base step
uses (SAM: g at w + e; ImbSAM: g_H + g_T at w + e). timm's ``--grad-accum-steps`` is not
supported by it: the step is the batch's.
"""
from __future__ import annotations

import contextlib
import functools

import torch

try:
    import timm  # noqa: F401
except ImportError as error:  # the core never needs timm
    raise ImportError("imbsam.integrations.timm needs timm: pip install 'imbsam[timm]' (or pip install timm)") \
        from error
try:  # the factory's registry (the version tested: 1.0.31)
    from timm.models import model_parameters
    from timm.optim._optim_factory import OptimInfo, default_registry
    from timm.utils.clip_grad import dispatch_clip_grad
except ImportError as error:
    raise ImportError(f"imbsam.integrations.timm needs timm's optimizer registry, which timm {timm.__version__} "
                      "lacks: pip install 'timm>=1.0.31'") from error

from imbsam.integrations._whole_batch_step import check_optimizer, whole_batch_step
from imbsam.optim import SAM, ImbSAM

# timm's base optimizer names, each with what timm's own registration of it says.
_BASES = {
    "sgd": dict(opt=torch.optim.SGD, has_eps=False, has_momentum=True, defaults={"nesterov": True}),
    "momentum": dict(opt=torch.optim.SGD, has_eps=False, has_momentum=True, defaults={"nesterov": False}),
    "adamw": dict(opt=torch.optim.AdamW, has_betas=True),
    "adam": dict(opt=torch.optim.Adam, has_betas=True),
}
_SHARPNESS = {"sam": (SAM, {}), "asam": (SAM, {"adaptive": True}), "imbsam": (ImbSAM, {})}
NAMES = [prefix + base for prefix in _SHARPNESS for base in _BASES]


def _register() -> None:
    for prefix, (cls, extra) in _SHARPNESS.items():
        for base, info in _BASES.items():
            settings = {k: v for k, v in info.items() if k != "opt"}
            defaults = {**settings.pop("defaults", {}), **extra}
            default_registry.register(OptimInfo(
                name=prefix + base, opt_class=functools.partial(cls, base_optimizer=info["opt"]),
                description=f"imbsam.{cls.__name__} around torch.optim.{info['opt'].__name__}"
                            + (" (ASAM)" if extra else ""),
                defaults=defaults, **settings))


_register()


def sharpness_step(model: torch.nn.Module, optimizer, loss_fn, inputs, targets, *, loss_scaler=None,
                   amp_autocast=contextlib.nullcontext, clip_grad=None, clip_mode: str = "norm",
                   frozen_bn_stats: bool = False) -> torch.Tensor:
    """One SAM / ASAM / ImbSAM step on a batch; returns the loss at w (detached).

    ``loss_fn(output, target)``: the loss (SAM, ASAM), or ``(head, tail)`` (ImbSAM, e.g.
    ``imbsam.HeadTailLoss``). ``loss_scaler``: timm's ``NativeScaler`` (or a
    ``torch.amp.GradScaler``), whose scale every backward uses; a non-finite gradient in any
    pass skips the step (weights left at w) and backs the scale off. ``clip_grad`` /
    ``clip_mode``: timm's ``dispatch_clip_grad`` on the unscaled gradient the base step
    uses. ``frozen_bn_stats``: keep the BatchNorm running statistics out of the forward at
    w + e (the paper's loop updates them in both). The gradients are left in ``.grad``.
    """
    check_optimizer(optimizer, "sharpness_step", f"timm's '{NAMES[0]}', ...")
    scaler = getattr(loss_scaler, "_scaler", loss_scaler)  # NativeScaler keeps its GradScaler there
    # timm's train loop clips all parameters, but the classifier head's out of AGC (its
    # model_parameters(exclude_head=...)): the same parameters here.
    params = list(model_parameters(model, exclude_head="agc" in clip_mode))

    def before_step():
        if scaler is not None:
            scaler.unscale_(optimizer)  # the step's one check for infs: every pass ends in this gradient
        if clip_grad is None:
            return
        if "agc" not in clip_mode:
            return dispatch_clip_grad(params, clip_grad, mode=clip_mode)
        # AGC scales each gradient by its weight's norm: w's, as without SAM, not w + e's (the
        # weights are restored only at the step). Stand-ins at w carry the same .grad tensors.
        at_w = optimizer._engine.weights_at_w()
        stand_ins = [at_w.get(id(p), p.detach()) for p in params]
        for stand_in, p in zip(stand_ins, params):
            stand_in.grad = p.grad
        try:
            dispatch_clip_grad(stand_ins, clip_grad, mode=clip_mode)
        finally:
            for stand_in in stand_ins:
                stand_in.grad = None

    def step():
        if scaler is None:
            return optimizer.step()
        scaler.step(optimizer)  # skipped on an inf: the weights go back to w
        scaler.update()

    return whole_batch_step(model, optimizer, loss_fn, inputs, targets,
                            scale=scaler.scale if scaler is not None else (lambda loss: loss),
                            backward=lambda loss, **kwargs: loss.backward(**kwargs), before_step=before_step,
                            step=step, autocast=amp_autocast, frozen_bn_stats=frozen_bn_stats)
