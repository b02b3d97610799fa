"""SAM, ASAM and ImbSAM in the Hugging Face ``Trainer``: ``SharpnessTrainer`` in place of
``Trainer``, with ``imbsam.SAM`` / ``ImbSAM`` as its optimizer, and the Trainer's loop runs
the step's passes.

    trainer = SharpnessTrainer(model=model, args=args, train_dataset=train,
                               optimizers=(imbsam.ImbSAM(model.parameters(), torch.optim.AdamW, lr=5e-5), None))
    trainer.train()

For ImbSAM the head/tail split is ``imbsam.HeadTailLoss`` on the model's ``logits`` and the
batch's ``labels``; pass ``head_tail_loss=`` or let the trainer count the classes of
``train_dataset``'s labels (``config.num_labels`` classes, the paper's threshold).

How a step runs: each micro-batch's ``training_step`` at w as the Trainer runs it (ImbSAM: the
tail's gradient set aside with ``torch.autograd.grad``, the head's backward into ``.grad``),
its inputs recorded; at the step's last micro-batch the perturbation phase moves to w + e
and every micro-batch of the step runs again (DDP's sync on the last only), then ImbSAM's
g_H is added into ``.grad``. The Trainer then clips (``max_grad_norm``: the gradient the base
step uses) and calls ``optimizer.step()`` (through Accelerate's GradScaler in fp16), which
restores w and steps; a step the scaler skips leaves the weights at w. Under DDP the pass at
w + e goes through the wrapped model, and ImbSAM's tail gradient at w is averaged here.

Accelerate users with a loop of their own call ``accelerated_step(accelerator, model,
optimizer, loss_fn, inputs, targets, max_grad_norm=...)`` in place of the forward,
``accelerator.backward``, ``accelerator.clip_grad_norm_`` and ``optimizer.step()``.
"""
from __future__ import annotations

import contextlib

import torch

try:
    import transformers
    from accelerate.utils import DistributedType
except ImportError as error:  # the core never needs transformers
    raise ImportError("imbsam.integrations.hf needs transformers: pip install 'imbsam[hf]' "
                      "(or pip install transformers accelerate)") from error

from imbsam.batch_norm import frozen_running_stats
from imbsam.integrations._ranks import average_over_ranks
from imbsam.integrations._refusals import refuse_schedule_and_grad_scaler
from imbsam.integrations._whole_batch_step import check_optimizer, whole_batch_step
from imbsam.losses import HeadTailLoss
from imbsam.optim import ImbSAM
from imbsam.optim._wrapper import SharpnessOptimizer

LABEL_KEYS = ("labels", "label")  # the Trainer's name, and the datasets' (its collator renames it)


def class_counts(dataset, num_classes: int) -> torch.Tensor:
    """How many samples of each class ``dataset``'s labels hold (``labels`` or ``label``; items
    are dicts, as the Trainer's datasets give them; a ``datasets.Dataset`` is read by column)."""
    columns = getattr(dataset, "column_names", None)
    first = columns if columns is not None else (dataset[0] if len(dataset) else {})
    key = next((k for k in LABEL_KEYS if k in first), None)
    if key is None:
        raise ValueError(f"imbsam: SharpnessTrainer counts ImbSAM's classes from the training labels, but the "
                         f"dataset's items have none of {LABEL_KEYS}: pass head_tail_loss=imbsam.HeadTailLoss("
                         "class_counts)")
    if columns is not None:
        labels = torch.as_tensor(dataset[key])
    else:
        labels = torch.as_tensor([int(dataset[i][key]) for i in range(len(dataset))])
    return torch.bincount(labels.reshape(-1), minlength=num_classes)


class _EndOfStep(transformers.TrainerCallback):
    """After the Trainer's ``optimizer.step()``: a step the GradScaler skipped goes back to w."""

    def __init__(self, trainer: "SharpnessTrainer"):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._end_step()


class SharpnessTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose optimizer may be ``imbsam.SAM`` / ``imbsam.ImbSAM``
    (any other steps as in the plain Trainer).

    ``head_tail_loss``: ImbSAM's split of the logits' loss (``imbsam.HeadTailLoss``); None
    builds it from ``train_dataset``'s labels. ``frozen_bn_stats``: keep BatchNorm running
    statistics out of the forward at w + e (the paper's loop updates them in both).
    """

    def __init__(self, *args, head_tail_loss: HeadTailLoss | None = None, frozen_bn_stats: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_tail_loss = head_tail_loss
        self.frozen_bn_stats = frozen_bn_stats
        self._micro_batches: list = []  # this step's (inputs, num_items_in_batch)
        self._tail_grads: list | None = None
        self._finishing: contextlib.ExitStack | None = None
        self.add_callback(_EndOfStep(self))

    def _sharpness_optimizer(self):
        opt = self.optimizer
        while hasattr(opt, "optimizer") and not isinstance(opt, SharpnessOptimizer):  # Accelerate's wrapper
            opt = opt.optimizer
        return opt if isinstance(opt, SharpnessOptimizer) else None

    def _params(self, opt) -> list:
        return [p for group in opt.param_groups for p in group["params"] if p.requires_grad]

    def _split(self, model) -> HeadTailLoss:
        if self.head_tail_loss is None:
            config = getattr(self.accelerator.unwrap_model(model), "config", None)
            classes = getattr(config, "num_labels", None)
            if classes is None:
                raise ValueError("imbsam: SharpnessTrainer with ImbSAM needs head_tail_loss=imbsam.HeadTailLoss("
                                 "class_counts), or a model whose config.num_labels says how many classes to count")
            self.head_tail_loss = HeadTailLoss(class_counts(self.train_dataset, classes))
        return self.head_tail_loss.to(self.args.device)

    def _head_and_tail(self, model, inputs):
        """ImbSAM's two losses of a micro-batch, divided as the Trainer divides its loss."""
        inputs = dict(self._prepare_inputs(inputs))
        labels = inputs.pop("labels")
        with self.compute_loss_context_manager():
            outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        head, tail = self._split(model)(logits, labels)
        ga = self.current_gradient_accumulation_steps
        return head / ga, tail / ga

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        scaler = self.accelerator.scaler
        return scaler.scale(loss) if scaler is not None else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        opt = self._sharpness_optimizer()
        if opt is None:
            return super().training_step(model, inputs, num_items_in_batch)
        self._refuse_what_is_not_supported(opt)
        self._micro_batches.append((inputs, num_items_in_batch))
        if isinstance(opt, ImbSAM):
            model.train()
            head, tail = self._head_and_tail(model, inputs)
            params = self._params(opt)
            grads = torch.autograd.grad(self._scaled(tail), params, retain_graph=True, allow_unused=True)
            self._tail_grads = list(grads) if self._tail_grads is None else [
                t if g is None else g if t is None else t.add_(g) for t, g in zip(self._tail_grads, grads)]
            self.accelerator.backward(head)  # g_H into .grad (scaled in fp16)
            loss = (head + tail).detach()
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.gradient_state.sync_gradients:  # the step's last micro-batch
            self._to_perturbed_and_back(model, opt)
        return loss

    def _to_perturbed_and_back(self, model, opt) -> None:
        try:
            if isinstance(opt, ImbSAM):
                opt.first_step()  # g_H set aside
                for p, g in zip(self._params(opt), self._tail_grads):
                    p.grad = g
                average_over_ranks(self._tail_grads, self.accelerator.num_processes)  # autograd.grad bypasses DDP
                opt.second_step()  # w + e from g_T
            else:
                opt.first_step()
            frozen = frozen_running_stats(model) if self.frozen_bn_stats else contextlib.nullcontext()
            with frozen:
                for i, (inputs, num_items) in enumerate(self._micro_batches):
                    last = i == len(self._micro_batches) - 1
                    sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                    with sync:
                        if isinstance(opt, ImbSAM):
                            self.accelerator.backward(self._head_and_tail(model, inputs)[1])
                        else:
                            transformers.Trainer.training_step(self, model, inputs, num_items)
            if isinstance(opt, ImbSAM):
                opt._engine.fold_head_grads()  # .grad: g_H + g_T', what the Trainer clips and unscales
            self._finishing = contextlib.ExitStack()
            self._finishing.enter_context(opt.finishing_by_step())  # the Trainer's optimizer.step() ends it
        except BaseException:
            opt.abandon_step()
            self._micro_batches, self._tail_grads = [], None
            raise

    def _end_step(self) -> None:
        opt = self._sharpness_optimizer()
        if self._finishing is not None:
            self._finishing.close()
            self._finishing = None
        if opt is not None and opt._engine.phase != "idle":  # the GradScaler skipped the step
            opt.abandon_step()
        self._micro_batches, self._tail_grads = [], None

    def _refuse_what_is_not_supported(self, opt) -> None:
        name = type(opt).__name__
        kind = self.accelerator.distributed_type
        if self.accelerator.num_processes > 1 and kind not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
            raise RuntimeError(f"imbsam: {name} in SharpnessTrainer on several processes runs under DDP only "
                               f"(Accelerate's MULTI_CPU / MULTI_GPU), not {kind}: its passes average as DDP does")
        refuse_schedule_and_grad_scaler(opt, "SharpnessTrainer")
        if isinstance(opt, ImbSAM):
            # ImbSAM's losses are HeadTailLoss's on the logits: a loss of the user's own would
            # be ignored without a word.
            own = [what for what, there in (
                ("a compute_loss override", type(self).compute_loss is not transformers.Trainer.compute_loss),
                ("compute_loss_func", self.compute_loss_func is not None),
                ("label_smoothing_factor", self.label_smoother is not None)) if there]
            if own:
                raise RuntimeError(f"imbsam: ImbSAM in SharpnessTrainer takes its head and tail losses from "
                                   f"head_tail_loss (imbsam.HeadTailLoss on the logits), so {', '.join(own)} would "
                                   "be ignored: drop it, and give class weights or the tail's weight to "
                                   "HeadTailLoss (tail_weight=) instead")


def accelerated_step(accelerator, model: torch.nn.Module, optimizer, loss_fn, inputs, targets, *,
                     max_grad_norm: float | None = None, frozen_bn_stats: bool = False) -> torch.Tensor:
    """One SAM / ASAM / ImbSAM step in an Accelerate loop, on the prepared model and optimizer;
    returns the loss at w (detached).

    ``loss_fn(output, target)``: the loss, or ImbSAM's ``(head, tail)``. Every backward is
    scaled by the accelerator's GradScaler (fp16); ``max_grad_norm`` clips, through
    ``accelerator.clip_grad_norm_`` (which unscales), the gradient the base step uses; the
    prepared optimizer's ``step()`` ends the step (skipped on an inf: the weights stay at w).
    One process, no ``gradient_accumulation_steps`` (refused by name).
    """
    inner = optimizer
    while hasattr(inner, "optimizer") and not isinstance(inner, SharpnessOptimizer):  # AcceleratedOptimizer
        inner = inner.optimizer
    check_optimizer(inner, "accelerated_step", "built before accelerator.prepare")
    if accelerator.num_processes > 1 or accelerator.gradient_accumulation_steps > 1:
        raise RuntimeError("imbsam: accelerated_step runs on one process without Accelerate's gradient "
                           f"accumulation (here {accelerator.num_processes} processes, "
                           f"gradient_accumulation_steps={accelerator.gradient_accumulation_steps}): not supported yet")
    scaler = accelerator.scaler

    def before_step():
        if max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)

    def step():
        if optimizer is not inner:  # Accelerate's wrapper: its scaler's step and update
            return optimizer.step()
        if scaler is None:
            return inner.step()
        scaler.step(inner)
        scaler.update()

    return whole_batch_step(model, inner, loss_fn, inputs, targets,
                            scale=scaler.scale if scaler is not None else (lambda loss: loss),
                            backward=lambda loss, **kwargs: loss.backward(**kwargs), before_step=before_step,
                            step=step, frozen_bn_stats=frozen_bn_stats)
