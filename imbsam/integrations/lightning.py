"""SAM, ASAM and ImbSAM in Lightning's automatic optimization: derive from ``SharpnessModule``
instead of ``LightningModule``, return ``imbsam.SAM`` or ``imbsam.ImbSAM`` from
``configure_optimizers``, and the Trainer runs the step's passes.

    class Model(SharpnessModule):                      # the one line
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)         # SAM / ASAM: the loss, as usual
            # ImbSAM: head, tail = self.split(self(x), y)
            #         return {"loss": head + tail, "head_loss": head, "tail_loss": tail}

Why a module and not a callback or a plugin: the step is the module's ``optimizer_step``
hook, the one place Lightning lets user code decide how a step runs, for every precision;
a precision plugin would replace the user's ``precision=`` choice, and a callback sees no
step. The Trainer keeps everything else: precision (32, ``bf16-mixed``, ``16-mixed`` with
its GradScaler), ``accumulate_grad_batches``, ``gradient_clip_val``, LR schedulers,
checkpoints and ``ckpt_path=`` resume, the ``ddp`` strategies.

How a step runs (``docs/integrations.md`` says more):
- Lightning's closure runs ``training_step`` at w and its backward (scaled, divided by the
  accumulation count) for each micro-batch, as in any run; for ImbSAM this module's
  ``backward`` takes the tail's gradient apart (``torch.autograd.grad``) and the head's
  into ``.grad``.
- At the last micro-batch the perturbation phase moves to w + e, and ``training_step``
  runs again on each micro-batch of the step (recorded as they came), its ``self.log``
  calls ignored, then the backward of its loss (ImbSAM: of its tail loss).
- ImbSAM's set-aside head gradient is added into ``.grad``, so that what Lightning unscales
  and clips between the last backward and the step is the gradient the base step uses
  (SAM: g at w + e; ImbSAM: g_H + g_T at w + e), then Lightning calls the optimizer's step,
  which restores w and steps. A step the GradScaler skips (an inf anywhere: every pass
  ends up in that gradient) leaves the weights at w and the scaler backs off.
- Under DDP the pass at w + e goes through the strategy (DDP's forward), so DDP averages it;
  ImbSAM's tail gradient at w (``torch.autograd.grad``, unseen by DDP) is averaged here.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils._pytree import tree_map

try:
    import lightning.pytorch as pl
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from lightning.pytorch.strategies import DDPStrategy
except ImportError as error:  # the core never needs Lightning
    raise ImportError("imbsam.integrations.lightning needs Lightning: pip install 'imbsam[lightning]' "
                      "(or pip install lightning)") from error

from imbsam.batch_norm import frozen_running_stats
from imbsam.integrations._ranks import average_over_ranks
from imbsam.integrations._refusals import refuse_schedule_and_grad_scaler
from imbsam.optim import ImbSAM
from imbsam.optim._wrapper import SharpnessOptimizer

HEAD_KEY, TAIL_KEY = "head_loss", "tail_loss"  # what an ImbSAM training_step returns beside "loss"


class _StepRecord:
    """What one optimizer step keeps of its micro-batches: their inputs, for the pass at
    w + e, and (ImbSAM) the sum of their tail gradients at w."""

    def __init__(self):
        self.inputs: list[tuple[tuple, dict]] = []
        self.output = None  # the last training_step's output
        self.tail_grads: list | None = None
        self.params: list | None = None
        self.depth = 0  # training_step calling a parent's: record the outermost call only
        self.at_perturbed = False

    def add_tail(self, params: list, grads) -> None:
        if self.tail_grads is None:
            self.params, self.tail_grads = params, list(grads)
            return
        self.tail_grads = [t if g is None else g if t is None else t.add_(g) for t, g in zip(self.tail_grads, grads)]

    def tail_into_grad(self) -> None:
        for p, g in zip(self.params or [], self.tail_grads or []):
            p.grad = g

    def clear(self) -> None:
        self.__init__()


def _copy_of(inputs):
    """The batch's tensors copied, its containers rebuilt: what training_step does to the batch
    (``x.div_(255)``, ``batch.pop("labels")``) must not reach the pass at w + e."""
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, inputs)


def _recording(training_step):
    """``training_step`` that also records its inputs and output for the step's later passes:
    the fit loop's calls only (not validation's, not the sanity check's), with a SAM optimizer."""

    @functools.wraps(training_step)
    def recorded(self, *args, **kwargs):
        record = self._sharpness_record()
        outermost = record.depth == 0 and not record.at_perturbed and self._records_steps()
        if outermost:
            k = self.trainer.accumulate_grad_batches
            if len(record.inputs) >= k:  # our optimizer_step did not run after the last window
                raise RuntimeError("imbsam: SharpnessModule's optimizer_step did not run after the last step's "
                                   f"{k} micro-batch(es): an optimizer_step override must call "
                                   "super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure), "
                                   "which runs the step's passes")
            copy = _copy_of((args, kwargs))
        record.depth += 1
        try:
            output = training_step(self, *args, **kwargs)
        finally:
            record.depth -= 1
        if outermost:
            record.inputs.append(copy)
            record.output = output
        return output

    recorded._imbsam_recording = True
    return recorded


def _sharpness_optimizer(optimizer):
    inner = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
    return inner if isinstance(inner, SharpnessOptimizer) else None


class SharpnessModule(pl.LightningModule):
    """A ``LightningModule`` whose automatic optimization takes SAM's and ImbSAM's steps
    when ``configure_optimizers`` returns ``imbsam.SAM`` / ``imbsam.ImbSAM`` (any other
    optimizer steps as in a plain ``LightningModule``).

    ``training_step`` returns the loss (SAM, ASAM), or for ImbSAM a dict with ``"loss"``
    (what Lightning logs and shows), ``"head_loss"`` and ``"tail_loss"`` (whose gradients
    the step uses), e.g. from ``imbsam.HeadTailLoss``.

    ``sharpness_frozen_running_stats``: True keeps the BatchNorm running statistics out of
    the pass at w + e (``imbsam.frozen_running_stats``); False, the default, updates them in
    both forwards, as the paper's loop does.
    """

    sharpness_frozen_running_stats = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # The training_step the class resolves: its own, or one inherited from another base
        # (class Model(SharpnessModule, ExistingModule)).
        step = getattr(cls, "training_step", None)
        if step is not None and step is not pl.LightningModule.training_step \
                and not getattr(step, "_imbsam_recording", False):
            cls.training_step = _recording(step)

    @property
    def sharpness_second_pass(self) -> bool:
        """True while ``training_step`` runs again at w + e: what it does besides returning the
        loss (a metric's ``update``, a memory bank, online statistics) happens twice a step
        unless it checks this (``self.log`` is ignored there already)."""
        return self._sharpness_record().at_perturbed

    def _records_steps(self) -> bool:
        """Whether a training_step call now belongs to a step this module runs: the fit loop's
        training, with one SAM / ImbSAM optimizer."""
        trainer = self._trainer
        if trainer is None or not trainer.training or trainer.sanity_checking:
            return False
        optimizers = trainer.optimizers
        return len(optimizers) == 1 and _sharpness_optimizer(optimizers[0]) is not None

    def _sharpness_record(self) -> _StepRecord:
        record = self.__dict__.get("_imbsam_record")
        if record is None:
            record = self.__dict__["_imbsam_record"] = _StepRecord()
        return record

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` as the Trainer's precision backpropagates it (16-mixed: times the scale)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return scaler.scale(loss) if scaler is not None else loss

    def _head_and_tail(self, output):
        if not (isinstance(output, dict) and HEAD_KEY in output and TAIL_KEY in output):
            got = f"a dict with keys {sorted(output)}" if isinstance(output, dict) else type(output).__name__
            raise TypeError(f"imbsam: with ImbSAM, training_step returns {{'loss': head + tail, '{HEAD_KEY}': head, "
                            f"'{TAIL_KEY}': tail}} (imbsam.HeadTailLoss gives head and tail); it returned {got}")
        return output[HEAD_KEY], output[TAIL_KEY]

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """SAM: the loss's backward. ImbSAM at w: the tail's gradient set aside, the head's
        into ``.grad`` (each scaled and divided as Lightning does the loss)."""
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        if len(optimizers) != 1 or not isinstance(_sharpness_optimizer(optimizers[0]), ImbSAM):
            return super().backward(loss, *args, **kwargs)
        record = self._sharpness_record()
        head, tail = self._head_and_tail(record.output)
        if not self.__dict__.get("_imbsam_loss_checked"):  # once a fit: one host sync
            self._check_loss_is_head_plus_tail(record.output["loss"], head, tail)
        k = self.trainer.accumulate_grad_batches
        params = [p for group in optimizers[0].param_groups for p in group["params"] if p.requires_grad]
        # torch.autograd.grad leaves .grad alone, so the head's sum accumulates there alone.
        record.add_tail(params, torch.autograd.grad(self._scaled(tail / k), params, retain_graph=True,
                                                    allow_unused=True))
        self._scaled(head / k).backward(*args, **kwargs)

    def _check_loss_is_head_plus_tail(self, loss, head, tail) -> None:
        """ImbSAM's step uses the gradients of head_loss and tail_loss alone: a term of "loss"
        beyond them (a regulariser) would be dropped without a word."""
        expected = (head + tail).detach().float()
        if not torch.allclose(loss.detach().float(), expected, rtol=1e-3, atol=1e-6, equal_nan=True):
            raise ValueError(f"imbsam: with ImbSAM, training_step's 'loss' ({loss.item():.6g}) is not "
                             f"'{HEAD_KEY}' + '{TAIL_KEY}' ({expected.item():.6g}): the step uses the gradients of "
                             "those two only, so the rest of 'loss' would be dropped. Add any other term (a "
                             f"regulariser) into '{HEAD_KEY}', or into '{TAIL_KEY}' to sharpen it too")
        self.__dict__["_imbsam_loss_checked"] = True

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        opt = _sharpness_optimizer(optimizer)
        if opt is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._refuse_what_is_not_supported(opt)
        record = self._sharpness_record()

        def passes():
            loss = optimizer_closure()  # the last micro-batch at w (the others ran before)
            if loss is None:
                raise RuntimeError("imbsam: training_step returned None, which Lightning takes as a skipped step; "
                                   "a SAM step needs the loss: return it (to skip a batch, return a zero loss)")
            if isinstance(opt, ImbSAM):
                opt.first_step()  # g_H (in .grad, averaged by DDP's backward) set aside
                record.tail_into_grad()
                average_over_ranks(record.tail_grads, self.trainer.world_size)  # autograd.grad bypasses DDP
                opt.second_step()  # w + e from g_T
            else:
                opt.first_step()
            self._pass_at_perturbed(opt, record)
            if isinstance(opt, ImbSAM):
                opt._engine.fold_head_grads()  # .grad: g_H + g_T', what Lightning clips and unscales
            return loss

        try:
            with opt.finishing_by_step():
                optimizer.step(closure=passes)
        finally:
            if opt._engine.phase != "idle":  # an error, or a step the GradScaler skipped: back to w
                opt.abandon_step()
            record.clear()

    def _pass_at_perturbed(self, opt, record: _StepRecord) -> None:
        k = self.trainer.accumulate_grad_batches
        imbsam_step = isinstance(opt, ImbSAM)
        frozen = frozen_running_stats(self) if self.sharpness_frozen_running_stats else contextlib.nullcontext()
        strategy = self.trainer.strategy
        record.at_perturbed = True
        try:
            with frozen, torch.enable_grad():
                for i, (args, kwargs) in enumerate(record.inputs):
                    # Through the strategy (DDP's forward, the precision's autocast): under DDP the
                    # last micro-batch's backward averages the sum, as at w.
                    last = i == len(record.inputs) - 1
                    sync = contextlib.nullcontext() if last or self.trainer.world_size == 1 else \
                        strategy.block_backward_sync()
                    with sync:
                        output = strategy.training_step(*args, **kwargs)
                        if imbsam_step:
                            loss = self._head_and_tail(output)[1]
                        else:
                            loss = output["loss"] if isinstance(output, dict) else output
                        self._scaled(loss / k).backward()
        finally:
            record.at_perturbed = False

    def _refuse_what_is_not_supported(self, opt) -> None:
        name = type(opt).__name__
        strategy = self.trainer.strategy
        if self.trainer.world_size > 1 and type(strategy) is not DDPStrategy:
            raise RuntimeError(f"imbsam: {name} in Lightning on {self.trainer.world_size} processes runs under the "
                               f"'ddp' strategies (DDPStrategy, any launcher) only, not {type(strategy).__name__}: its "
                               "passes average over the ranks as DDP does")
        refuse_schedule_and_grad_scaler(opt, "Lightning")

    # The pass at w + e runs training_step again: what it logs would count twice.
    def log(self, *args, **kwargs) -> None:
        if self._sharpness_record().at_perturbed:
            return None
        return super().log(*args, **kwargs)

    def log_dict(self, *args, **kwargs) -> None:
        if self._sharpness_record().at_perturbed:
            return None
        return super().log_dict(*args, **kwargs)
