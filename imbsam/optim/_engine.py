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
_SUPPORTED = frozenset(SUPPORTED_DTYPES)


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
        # Per parameter: (backup, the parameter's storage pointer it was made for), and
        # ImbSAM's head gradient between its first and last phase. Keyed by id(p): a
        # Tensor's __hash__ is a Python call, and the param groups keep every p alive.
        self.backups: dict[int, tuple[Tensor, int]] = {}
        self.head_grads: dict[int, Tensor] = {}
        self.norm: Optional[Tensor] = None  # the last perturbation's gradient norm, on the device
        self._step_norm: Optional[Tensor] = None  # the norm the coming step decides its skip by, used once
        self._perturbed: set[int] = set()  # ids of the parameters the last perturbation moved
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

    # These run for every parameter in every phase: each attribute read costs ~50 ns, so
    # they read as few as they can (a 110-tensor step spends ~0.1 ms here, not ~0.5).
    def _grads(self) -> tuple[list[tuple[dict, list[Tensor], list[Tensor]]], Optional[torch.device]]:
        """Per group, the parameters that have a gradient and those gradients; the first one's device."""
        out, device = [], None
        strided = torch.strided
        for group in self.base.param_groups:
            params, grads = [], []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.layout is not strided or p.dtype not in _SUPPORTED or g.stride() != p.stride():
                    g = self._checked_grad(p, g)  # raises, or fixes the layout
                params.append(p)
                grads.append(g)
            if device is None and params:
                device = params[0].device
            out.append((group, params, grads))
        return out, device

    @staticmethod
    def _checked_grad(p: Tensor, g: Tensor) -> Tensor:
        """Dense, a supported dtype, and laid out like its parameter (copied if not)."""
        if g.layout is not torch.strided:
            raise ValueError(f"imbsam: a parameter of shape {tuple(p.shape)} has a {g.layout} gradient; SAM "
                             "needs dense gradients (use dense embeddings, e.g. nn.Embedding(sparse=False))")
        if p.dtype not in _SUPPORTED:
            raise TypeError(f"imbsam: a parameter has dtype {p.dtype}; supported: float32, float64, bfloat16, "
                            "float16")
        if g.stride() != p.stride():
            # The kernels walk a parameter and its gradient as one flat array.
            g = p.grad = g.new_empty_strided(p.size(), p.stride()).copy_(g)
        return g

    @staticmethod
    def _check_one_device(groups, device: torch.device) -> None:
        # The compiled ops check this themselves (with the list index); the reference needs it here.
        for _, params, _ in groups:
            for p in params:
                if p.device != device:
                    raise ValueError(f"imbsam: parameters are on more than one device ({device} and {p.device}); "
                                     "one optimizer handles the parameters of one device")

    def _ops(self, groups, device: torch.device):
        backend = self.concrete_backend(device)
        if backend == "reference":
            self._check_one_device(groups, device)
        return backend, backends.ops_for(backend)

    def _backup(self, p: Tensor) -> Tensor:
        # Kept across steps: one allocation per parameter, and fixed addresses for CUDA graphs.
        # The storage pointer and dtype tell whether the parameter's memory was replaced
        # (model.to(), model.half(), p.data = ...): then a new backup is made.
        entry = self.backups.get(id(p))
        ptr = p.data_ptr()
        if entry is not None and entry[1] == ptr and entry[0].dtype == p.dtype:
            return entry[0]
        b = torch.empty_like(p, memory_format=torch.preserve_format)
        self.backups[id(p)] = (b, ptr)
        return b

    # ---- phases --------------------------------------------------------------------
    @torch.no_grad()
    def stash_head_grads(self) -> None:
        """ImbSAM's first phase: hand the head gradients over (no copy) and clear ``.grad``."""
        self._run_phase_hooks("head")
        groups, device = self._grads()
        if device is not None:
            self._ops(groups, device)  # validates the devices where the ops will not
        for _, params, grads in groups:
            for p, g in zip(params, grads):
                # A view may alias storage that the next backward writes (DDP buckets): copy it.
                self.head_grads[id(p)] = g.clone() if g._is_view() else g
                p.grad = None

    @torch.no_grad()
    def perturb(self) -> None:
        """w <- w + e from the current gradients (global norm), keeping a backup of w."""
        self._run_phase_hooks("perturb")
        groups, device = self._grads()
        self._perturbed = set()
        if device is None:
            self.norm = self._step_norm = None
            return
        _, ops = self._ops(groups, device)
        eta = self.defaults["adaptive_eta"]
        # Split each group into ASAM-scaled tensors (two or more dimensions) and the rest;
        # a non-adaptive group is all "rest", without looking at each tensor.
        split = []
        for group, params, grads in groups:
            if self._hyper(group, "adaptive"):
                scaled = [i for i, p in enumerate(params) if p.dim() > 1]
                chosen = set(scaled)
                plain = [i for i in range(len(params)) if i not in chosen]
            else:
                scaled, plain = [], None  # None: every tensor, in order
            split.append((group, params, grads, plain, scaled))
        plain_grads = [g for _, _, grads, plain, _ in split for g in (grads if plain is None else
                                                                          [grads[i] for i in plain])]
        scaled_grads = [grads[i] for _, _, grads, _, scaled in split for i in scaled]
        scaled_params = [params[i] for _, params, _, _, scaled in split for i in scaled]
        self.norm = self._step_norm = ops.grad_norm(plain_grads, scaled_grads, scaled_params, eta)
        backup = self._backup
        for group, params, grads, plain, scaled in split:
            rho = self._hyper(group, "rho")
            if plain is None:
                if params:
                    ops.perturb_(params, grads, [backup(p) for p in params], self.norm, rho, eta, False)
            else:
                for pick, is_scaled in ((plain, False), (scaled, True)):
                    if pick:
                        ops.perturb_([params[i] for i in pick], [grads[i] for i in pick],
                                     [backup(params[i]) for i in pick], self.norm, rho, eta, is_scaled)
            self._perturbed.update(map(id, params))

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
        heads = self.head_grads if with_head else {}
        if with_head:
            self.head_grads = {}
        device = None
        strided, backup = torch.strided, self._backup
        groups = []  # per group: params, grads, backups, head grads (None where absent)
        restore_params, restore_backups = [], []
        for group in self.base.param_groups:
            ps, gs, bs, hs = [], [], [], []
            for p in group["params"]:
                g = p.grad
                key = id(p)
                h = heads.get(key) if heads else None
                if g is None:
                    if h is None:
                        if key in perturbed:  # perturbed, but no gradient now: restore only
                            restore_params.append(p)
                            restore_backups.append(self.backups[key][0])
                        continue
                    p.grad, g, h = h, h, None  # only the head loss reached it: its gradient is g_H alone
                if g.layout is not strided or p.dtype not in _SUPPORTED or g.stride() != p.stride():
                    g = self._checked_grad(p, g)  # raises, or fixes the layout
                b = backup(p)
                if key not in perturbed:  # its gradient appeared only now: nothing to undo
                    b.copy_(p)
                ps.append(p)
                gs.append(g)
                bs.append(b)
                hs.append(h)
            if device is None and ps:
                device = ps[0].device
            groups.append((group, ps, gs, bs, hs))
        if device is None and restore_params:
            device = restore_params[0].device
        if device is None:
            return
        backend, ops = self._ops([(g, ps, None) for g, ps, *_ in groups], device)
        ops.restore_(restore_params, restore_backups)
        if backend != "reference" and self._fused_sgd_possible():
            skip = self._skip_flag(norm, found_inf, device)
            for group, ps, gs, bs, hs in groups:
                self._fused_sgd(ops, group, ps, gs, bs, hs, skip)
            return
        for group, ps, gs, bs, hs in groups:
            ops.restore_(ps, bs)
            with_h = [i for i, h in enumerate(hs) if h is not None]
            ops.add_head_grads_([gs[i] for i in with_h], [hs[i] for i in with_h])
        # A non-finite perturbation gradient skips the base step (weights stay restored).
        # Reading the flag syncs with the device; the fused SGD path above never does.
        skip = self._skip_flag(norm, found_inf, device)
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
        state = self.base.state
        bufs = [state[p].get("momentum_buffer") for p in ps] if momentum != 0 else [None] * len(ps)
        subsets: dict[tuple[bool, bool], list[int]] = defaultdict(list)
        for i, (h, buf) in enumerate(zip(hs, bufs)):
            subsets[(h is not None, buf is not None)].append(i)
        for (has_head, has_buf), idx in subsets.items():
            if momentum != 0 and not has_buf:  # SGD's first step: the op writes buf = d
                for i in idx:
                    # Zeros, not empty: a skipped first step leaves the buffer as
                    # allocated, and the next step's momentum * 0 + (1 - dampening) * d
                    # is SGD's first step exactly when dampening is 0.
                    bufs[i] = state[ps[i]]["momentum_buffer"] = torch.zeros_like(
                        ps[i], memory_format=torch.preserve_format)
            ops.restore_sgd_step_(
                [ps[i] for i in idx], [gs[i] for i in idx], [bs[i] for i in idx],
                [hs[i] for i in idx] if has_head else [], [bufs[i] for i in idx] if momentum != 0 else [], lr,
                momentum, group.get("dampening", 0.0),
                group.get("weight_decay", 0.0), group.get("nesterov", False), group.get("maximize", False),
                not has_buf, lr_tensor, found_inf)
