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
    from timm.optim._optim_factory import OptimInfo, default_registry
    from timm.utils.clip_grad import dispatch_clip_grad
except ImportError as error:
    raise ImportError(f"imbsam.integrations.timm needs timm's optimizer registry, which timm {timm.__version__} "
                      "lacks: pip install 'timm>=1.0.31'") from error

from imbsam.batch_norm import frozen_running_stats
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
    if not isinstance(optimizer, (SAM, ImbSAM)):
        raise TypeError(f"sharpness_step takes an imbsam.SAM or imbsam.ImbSAM (timm's '{NAMES[0]}', ...), got "
                        f"{type(optimizer).__name__}: for another optimizer keep timm's own step")
    if optimizer.schedule is not None or "grad_scaler" in optimizer._engine.helpers:
        raise RuntimeError("imbsam: sharpness_step takes neither a sharpness schedule nor use_grad_scaler (it scales "
                           "with loss_scaler itself): build the optimizer without schedule= and drop use_grad_scaler")
    scaler = getattr(loss_scaler, "_scaler", loss_scaler)  # NativeScaler keeps its GradScaler there
    scaled = scaler.scale if scaler is not None else (lambda loss: loss)
    imbsam_step = isinstance(optimizer, ImbSAM)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    try:
        with amp_autocast():
            first = loss_fn(model(inputs), targets)
        if imbsam_step:
            head, tail = first
            scaled(head).backward(retain_graph=True)
            optimizer.first_step()  # g_H set aside
            scaled(tail).backward()
            optimizer.second_step()  # w + e from g_T (scale-free: e is a direction times rho)
            loss = head + tail
        else:
            loss = first
            scaled(loss).backward()
            optimizer.first_step()
        with frozen_running_stats(model) if frozen_bn_stats else contextlib.nullcontext():
            with amp_autocast():
                again = loss_fn(model(inputs), targets)
        scaled(again[1] if imbsam_step else again).backward()
        if imbsam_step:
            optimizer._engine.fold_head_grads()  # .grad: g_H + g_T', each scaled alike
        if scaler is not None:
            scaler.unscale_(optimizer)  # the step's one check for infs: every pass ends in this gradient
        if clip_grad is not None:
            dispatch_clip_grad(params, clip_grad, mode=clip_mode)
        with optimizer.finishing_by_step():
            if scaler is not None:
                scaler.step(optimizer)  # skipped on an inf: the weights go back to w below
                scaler.update()
            else:
                optimizer.step()
    finally:
        if optimizer._engine.phase != "idle":
            optimizer.abandon_step()
    return loss.detach()
