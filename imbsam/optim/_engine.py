"""The phase machinery shared by ``imbsam.SAM``, ``imbsam.ImbSAM`` and the paper-style adapters.

It owns the per-parameter buffers that live between phases (the weight backup and,
for ImbSAM, the head gradient) and drives the ops of the chosen backend. The base
optimizer keeps its own state (momentum buffers) exactly as it would without SAM.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from imbsam import backends

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_rho(rho) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)):
        raise TypeError(f"rho must be a float >= 0, got {type(rho).__name__} {rho!r}")
    if not rho >= 0 or rho == float("inf"):  # also rejects NaN
        raise ValueError(f"rho must be a finite float >= 0, got {rho!r}")


def check_base_optimizer(base_optimizer) -> None:
    if isinstance(base_optimizer, torch.optim.Optimizer):
        raise TypeError("base_optimizer must be an optimizer class such as torch.optim.SGD (its keyword "
                        f"arguments go to the SAM constructor), not an instance of {type(base_optimizer).__name__}; "
                        "to wrap an existing optimizer use imbsam.compat.SAM / imbsam.compat.ImbSAM")
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
        raise TypeError(f"base_optimizer must be a subclass of torch.optim.Optimizer, got {base_optimizer!r}")


class SharpnessEngine:
    """Runs the SAM phases over ``base_optimizer.param_groups``.

    Per-group ``rho`` / ``adaptive`` override the engine's defaults. ASAM's scaling
    ``T = |w| + adaptive_eta`` applies to tensors with two or more dimensions (conv and
    linear weights); biases and normalisation parameters use ``T = 1``.
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, backend: str, rho: float, adaptive: bool = False,
                 adaptive_eta: float = 0.01):
        backends.check_backend_name(backend)
        check_rho(rho)
        self.base = base_optimizer
        self.backend = backend
        self.defaults = dict(rho=rho, adaptive=bool(adaptive), adaptive_eta=float(adaptive_eta))
        self.buffers: defaultdict[Tensor, dict] = defaultdict(dict)
        self.norm: Optional[Tensor] = None  # the last perturbation's gradient norm, on the device
        self._step_norm: Optional[Tensor] = None  # the norm the coming step decides its skip by, used once
        self._perturbed: set[Tensor] = set()
        self.phase_hooks: OrderedDict[int, Callable] = OrderedDict()

    def register_phase_hook(self, hook: Callable[[str, list, list], None]) -> RemovableHandle:
        """``hook(phase, params, grads)`` runs before a phase reads the gradients.

        ``phase`` is ``"head"`` (ImbSAM's first step), ``"perturb"`` or ``"step"`` (the last
        one); ``params`` are the parameters that have a ``.grad`` and ``grads`` those
        gradients. A hook may change them in place (an all-reduce, an unscale) or assign
        a new ``p.grad``; it should not synchronise with the host if CUDA graphs are used.
        """
        handle = RemovableHandle(self.phase_hooks)
        self.phase_hooks[handle.id] = hook
        return handle

    def _run_phase_hooks(self, phase: str) -> None:
        if not self.phase_hooks:
            return
        params = [p for g in self.base.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        for hook in self.phase_hooks.values():
            hook(phase, params, grads)

    # ---- helpers -------------------------------------------------------------------
    def _hyper(self, group: dict, key: str):
        return group.get(key, self.defaults[key])

    def concrete_backend(self, device: torch.device) -> str:
        return backends.resolve(self.backend, device)

    def _grads(self, check_device: list) -> list[tuple[dict, list[Tensor], list[Tensor]]]:
        """Per group, the parameters that have a gradient and those gradients, validated."""
        out = []
        for group in self.base.param_groups:
            params, grads = [], []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                params.append(p)
                grads.append(self._checked_grad(p, g, check_device))
            out.append((group, params, grads))
        return out

    @staticmethod
    def _checked_grad(p: Tensor, g: Tensor, device: list) -> Tensor:
        if g.layout != torch.strided:
            raise ValueError(f"imbsam: a parameter of shape {tuple(p.shape)} has a {g.layout} gradient; SAM "
                             "needs dense gradients (use dense embeddings, e.g. nn.Embedding(sparse=False))")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"imbsam: a parameter has dtype {p.dtype}; supported: float32, float64, bfloat16, "
                            "float16")
        if not device:
            device.append(p.device)
        elif p.device != device[0]:
            raise ValueError(f"imbsam: parameters are on more than one device ({device[0]} and {p.device}); "
                             "one optimizer handles the parameters of one device")
        if p.numel() and g.stride() != p.stride():
            # The kernels walk a parameter and its gradient as one flat array.
            g = g.new_empty_strided(p.size(), p.stride()).copy_(g)
            p.grad = g
        return g

    def _backup(self, p: Tensor) -> Tensor:
        # Kept across steps: one allocation per parameter, and fixed addresses for CUDA graphs.
        b = self.buffers[p].get("backup")
        if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device or b.stride() != p.stride():
            b = torch.empty_like(p, memory_format=torch.preserve_format)
            self.buffers[p]["backup"] = b
        return b

    # ---- phases --------------------------------------------------------------------
    @torch.no_grad()
    def stash_head_grads(self) -> None:
        """ImbSAM's first phase: hand the head gradients over (no copy) and clear ``.grad``."""
        self._run_phase_hooks("head")
        device: list = []
        for _, params, grads in self._grads(device):
            for p, g in zip(params, grads):
                # A view may alias storage that the next backward writes (DDP buckets): copy it.
                self.buffers[p]["head_grad"] = g.clone() if g._is_view() else g
                p.grad = None

    @torch.no_grad()
    def perturb(self) -> None:
        """w <- w + e from the current gradients (global norm), keeping a backup of w."""
        self._run_phase_hooks("perturb")
        device: list = []
        groups = self._grads(device)
        self._perturbed = set()
        if not device:
            self.norm = self._step_norm = None
            return
        ops = backends.ops_for(self.concrete_backend(device[0]))
        eta = self.defaults["adaptive_eta"]
        plain_grads, scaled_grads, scaled_params = [], [], []
        for group, params, grads in groups:
            adaptive = self._hyper(group, "adaptive")
            for p, g in zip(params, grads):
                if adaptive and p.dim() > 1:
                    scaled_grads.append(g)
                    scaled_params.append(p)
                else:
                    plain_grads.append(g)
        self.norm = self._step_norm = ops.grad_norm(plain_grads, scaled_grads, scaled_params, eta)
        for group, params, grads in groups:
            rho, adaptive = self._hyper(group, "rho"), self._hyper(group, "adaptive")
            for scaled in (False, True):
                pick = [i for i, p in enumerate(params) if (adaptive and p.dim() > 1) == scaled]
                if pick:
                    ops.perturb_([params[i] for i in pick], [grads[i] for i in pick],
                                 [self._backup(params[i]) for i in pick], self.norm, rho, eta, scaled)
            self._perturbed.update(params)

    @torch.no_grad()
    def restore_and_step(self, with_head: bool, found_inf: Optional[Tensor] = None) -> None:
        """Back to the original w, g <- g' (+ g_H), and the base optimizer's step.

        The step is skipped (weights restored, base state untouched) when the perturbation
        gradient was not finite or the caller's 0-d ``found_inf`` (a GradScaler's, say) is
        nonzero; on the fused SGD path both are combined and read on the device.
        """
        if found_inf is not None and found_inf.numel() != 1:
            raise ValueError(f"found_inf must hold one value (a 0-d flag), got shape {tuple(found_inf.shape)}")
        self._run_phase_hooks("step")
        perturbed, self._perturbed = self._perturbed, set()
        norm, self._step_norm = self._step_norm, None
        device: list = []
        groups = []  # per group: params, grads, backups, head grads (None where absent)
        restore_params, restore_backups = [], []
        for group in self.base.param_groups:
            ps, gs, bs, hs = [], [], [], []
            for p in group["params"]:
                h = self.buffers[p].pop("head_grad", None) if with_head else None
                g = p.grad
                if g is None and h is None:
                    if p in perturbed:  # perturbed, but no gradient now: restore only
                        restore_params.append(p)
                        restore_backups.append(self.buffers[p]["backup"])
                    continue
                if g is None:  # only the head loss reached it: its gradient is g_H alone
                    p.grad, g, h = h, h, None
                g = self._checked_grad(p, g, device)
                b = self._backup(p)
                if p not in perturbed:  # its gradient appeared only now: nothing to undo
                    b.copy_(p)
                ps.append(p), gs.append(g), bs.append(b), hs.append(h)
            groups.append((group, ps, gs, bs, hs))
        if restore_params:
            device = device or [restore_params[0].device]
        if not device:
            return
        backend = self.concrete_backend(device[0])
        ops = backends.ops_for(backend)
        ops.restore_(restore_params, restore_backups)
        if backend != "reference" and self._fused_sgd_possible():
            skip = self._skip_flag(norm, found_inf, device[0])
            for group, ps, gs, bs, hs in groups:
                self._fused_sgd(ops, group, ps, gs, bs, hs, skip)
            return
        for group, ps, gs, bs, hs in groups:
            ops.restore_(ps, bs)
            with_h = [i for i, h in enumerate(hs) if h is not None]
            ops.add_head_grads_([gs[i] for i in with_h], [hs[i] for i in with_h])
        # A non-finite perturbation gradient skips the base step (weights stay restored).
        # Reading the flag syncs with the device; the fused SGD path above never does.
        skip = self._skip_flag(norm, found_inf, device[0])
        if skip is not None and bool(skip != 0):
            return
        self.base.step()

    @staticmethod
    def _skip_flag(norm: Optional[Tensor], found_inf: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
        """A 0-d float32 on the device, nonzero when the step must be skipped; None if nothing can say so."""
        own = None if norm is None else torch.isfinite(norm).logical_not().to(torch.float32)
        if found_inf is None:
            return own
        theirs = found_inf.reshape(()).to(device=device, dtype=torch.float32)
        return theirs if own is None else torch.maximum(own, theirs)

    # ---- the fused SGD path ----------------------------------------------------------
    def _fused_sgd_possible(self) -> bool:
        # Exactly torch.optim.SGD: a subclass may change the update. `differentiable`
        # needs autograd through the step, which the compiled ops do not provide.
        return type(self.base) is torch.optim.SGD and not any(
            g.get("differentiable", False) for g in self.base.param_groups)

    def _fused_sgd(self, ops, group, ps, gs, bs, hs, found_inf) -> None:
        if not ps:
            return
        momentum = group["momentum"]
        lr = group["lr"]
        lr_tensor = None
        if isinstance(lr, Tensor):
            lr_tensor, lr = lr.to(device=ps[0].device, dtype=torch.float32), 0.0
        # One call per (has head gradient, has momentum buffer) subset: the op takes
        # whole lists of either.
        subsets: dict[tuple[bool, bool], list[int]] = defaultdict(list)
        for i, p in enumerate(ps):
            has_buf = momentum != 0 and self.base.state[p].get("momentum_buffer") is not None
            subsets[(hs[i] is not None, has_buf)].append(i)
        for (has_head, has_buf), idx in subsets.items():
            bufs = []
            if momentum != 0:
                for i in idx:
                    state = self.base.state[ps[i]]
                    if not has_buf:  # SGD's first step: the op writes buf = d
                        # Zeros, not empty: a skipped first step leaves the buffer as
                        # allocated, and the next step's momentum * 0 + (1 - dampening) * d
                        # is SGD's first step exactly when dampening is 0.
                        state["momentum_buffer"] = torch.zeros_like(ps[i], memory_format=torch.preserve_format)
                    bufs.append(state["momentum_buffer"])
            ops.restore_sgd_step_(
                [ps[i] for i in idx], [gs[i] for i in idx], [bs[i] for i in idx],
                [hs[i] for i in idx] if has_head else [], bufs, lr, momentum, group.get("dampening", 0.0),
                group.get("weight_decay", 0.0), group.get("nesterov", False), group.get("maximize", False),
                not has_buf, lr_tensor, found_inf)
