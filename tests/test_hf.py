"""imbsam.integrations.hf: SAM, ASAM and ImbSAM in the Hugging Face Trainer take the steps of
the same training written by hand (``hand_written_sam.reference``: plain PyTorch,
independent of imbsam's optimizers)."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import imbsam

if os.environ.get("CI"):  # CI installs it (requirements.txt): missing there is a failure, not a skip
    import transformers
else:
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'imbsam[hf]')")

from imbsam.integrations.hf import SharpnessTrainer, accelerated_step, class_counts  # noqa: E402

from hand_written_sam import BATCH, LR, MOMENTUM, RHO, STEPS, counts, data, loader, network, reference  # noqa: E402


class Classifier(torch.nn.Module):
    """The task's network as the Trainer calls it: keyword inputs, a dict with loss and logits."""

    def __init__(self):
        super().__init__()
        self.net = network()

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}


class InOrder(SharpnessTrainer):
    """The batches in the dataset's order, as the hand-written training takes them."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def dataset():
    x, y = data()
    return [{"x": x[i], "labels": y[i]} for i in range(len(x))]


def arguments(tmp_path, **kwargs):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH, max_steps=STEPS,
                    learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                    use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                    dataloader_num_workers=0, remove_unused_columns=False, seed=0)
    settings.update(kwargs)
    return transformers.TrainingArguments(**settings)


def optimizer(kind: str, model):
    if kind == "imbsam":
        return imbsam.ImbSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)
    return imbsam.SAM(model.parameters(), torch.optim.SGD, rho=RHO, adaptive=kind == "asam", lr=LR,
                      momentum=MOMENTUM)


def train(kind, tmp_path, trainer_cls=InOrder, **kwargs):
    model = Classifier()
    split = imbsam.HeadTailLoss(counts(), threshold=20) if kind == "imbsam" else None
    trainer = trainer_cls(model=model, args=arguments(tmp_path, **kwargs), train_dataset=dataset(),
                          optimizers=(optimizer(kind, model), None), head_tail_loss=split)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return model.net, trainer


CASES = [("32", 1, None), ("32", 2, None), ("32", 2, 0.5), ("bf16", 1, None), ("bf16", 2, 0.5)]


@pytest.mark.parametrize("precision,k,clip", CASES, ids=[f"{p}-k{k}-clip{c}" for p, k, c in CASES])
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_the_trainer_takes_the_hand_written_steps(kind, precision, k, clip, tmp_path):
    got, _ = train(kind, tmp_path, gradient_accumulation_steps=k, max_grad_norm=clip or 0.0,
                   bf16=precision == "bf16")
    # Accelerate autocasts the model's forward only; the loss is taken of fp32 logits.
    want, _ = reference(kind, "bf16-mixed" if precision == "bf16" else "32", k, clip, gamma=1.0,
                        loss_in_autocast=False)
    tolerance = 1e-6 if precision == "32" else 1e-5
    for (name, a), b in zip(got.named_parameters(), want.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=tolerance), (name, (a - b).abs().max())


def test_asam_takes_the_hand_written_steps(tmp_path):
    got, _ = train("asam", tmp_path)
    want, _ = reference("asam", "32", 1, None, gamma=1.0)
    for a, b in zip(got.parameters(), want.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()


@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_a_run_resumed_from_a_trainer_checkpoint_continues_bitwise(kind, tmp_path):
    whole, _ = train(kind, tmp_path / "whole", max_steps=4, gradient_accumulation_steps=2)
    train(kind, tmp_path / "split", max_steps=4, gradient_accumulation_steps=2, save_strategy="steps",
          save_steps=2)
    checkpoint = str(tmp_path / "split" / "out" / "checkpoint-2")
    model = Classifier()
    with torch.no_grad():  # nothing of the fresh model's own weights may survive the resume
        for p in model.parameters():
            p.add_(1.0)
    split = imbsam.HeadTailLoss(counts(), threshold=20) if kind == "imbsam" else None
    trainer = InOrder(model=model, args=arguments(tmp_path / "resumed", max_steps=4, gradient_accumulation_steps=2),
                      train_dataset=dataset(), optimizers=(optimizer(kind, model), None), head_tail_loss=split)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=checkpoint)
    assert trainer.state.global_step == 4
    for a, b in zip(model.net.parameters(), whole.parameters()):
        assert torch.equal(a, b)


def test_imbsams_tail_classes_come_from_the_training_labels(tmp_path):
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, num_labels=4))
    g = torch.Generator().manual_seed(0)
    labels = [0] * 50 + [1] * 20 + [2] * 1 + [3] * 1  # the paper's threshold, n_max / 25 = 2: classes 2 and 3
    train_set = [{"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": torch.tensor(c)} for c in labels]
    opt = imbsam.ImbSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
    trainer = SharpnessTrainer(model=model, args=arguments(tmp_path, max_steps=3, bf16=True), train_dataset=train_set,
                               optimizers=(opt, None))
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert torch.equal(trainer.head_tail_loss.tail_classes.cpu(), torch.tensor([False, False, True, True]))
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_class_counts_read_a_dataset_of_dicts():
    assert class_counts(dataset(), 4).tolist() == counts().tolist()


def test_another_optimizer_trains_as_in_the_plain_trainer(tmp_path):
    model = Classifier()
    trainer = InOrder(model=model, args=arguments(tmp_path, max_steps=1), train_dataset=dataset(),
                      optimizers=(torch.optim.SGD(model.parameters(), lr=LR), None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    net = network()
    x, y = data()
    F.cross_entropy(net(x[:BATCH]), y[:BATCH]).backward()
    with torch.no_grad():
        for p in net.parameters():
            p.sub_(LR * p.grad)
    for a, b in zip(model.net.parameters(), net.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-7)


def test_a_sharpness_schedule_is_refused_before_the_first_step(tmp_path):
    model = Classifier()
    before = [p.detach().clone() for p in model.parameters()]
    opt = imbsam.SAM(model.parameters(), torch.optim.SGD, lr=LR, schedule=imbsam.schedules.Periodic(2))
    trainer = InOrder(model=model, args=arguments(tmp_path, max_steps=1), train_dataset=dataset(),
                      optimizers=(opt, None))
    with pytest.raises(RuntimeError, match="takes neither a sharpness schedule nor use_grad_scaler"):
        trainer.train()
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def accelerator(**kwargs):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # one process, several settings in turn
    return Accelerator(cpu=True, **kwargs)


ACCELERATE_CASES = [("no", None), ("no", 0.5), ("bf16", None), ("bf16", 0.5)]


@pytest.mark.parametrize("precision,clip", ACCELERATE_CASES, ids=[f"{p}-clip{c}" for p, c in ACCELERATE_CASES])
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_accelerated_step_takes_the_hand_written_steps(kind, precision, clip):
    acc = accelerator(mixed_precision=precision)
    net = network()
    opt = optimizer(kind, net)
    net, opt = acc.prepare(net, opt)
    loss_fn = imbsam.HeadTailLoss(counts(), threshold=20) if kind == "imbsam" else F.cross_entropy
    for x, y in list(loader())[:STEPS]:
        accelerated_step(acc, net, opt, loss_fn, x, y, max_grad_norm=clip)
    want, _ = reference(kind, "bf16-mixed" if precision == "bf16" else "32", 1, clip, gamma=1.0,
                        loss_in_autocast=False)
    tolerance = 1e-6 if precision == "no" else 1e-5
    for a, b in zip(acc.unwrap_model(net).parameters(), want.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=tolerance), (a - b).abs().max()


def test_accelerated_step_refuses_accelerates_own_accumulation():
    acc = accelerator(gradient_accumulation_steps=2)
    net = network()
    net, opt = acc.prepare(net, optimizer("sam", net))
    before = [p.detach().clone() for p in net.parameters()]
    x, y = data()
    with pytest.raises(RuntimeError, match="without Accelerate's gradient accumulation"):
        accelerated_step(acc, net, opt, F.cross_entropy, x[:BATCH], y[:BATCH])
    for a, b in zip(net.parameters(), before):
        assert torch.equal(a, b)


def _rank_trains(rank: int, world: int, path: str, kind: str, out: str) -> None:
    """One rank of the Trainer under DDP (gloo; the group made by the test's launcher)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    model = Classifier()
    split = imbsam.HeadTailLoss(counts(), threshold=20) if kind == "imbsam" else None
    trainer = InOrder(model=model, args=arguments(out, ddp_backend="gloo", gradient_accumulation_steps=2),
                      train_dataset=dataset(), optimizers=(optimizer(kind, model), None), head_tail_loss=split)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    torch.save([p.detach() for p in model.net.parameters()], path)


@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_two_ddp_processes_take_the_steps_of_one_on_the_global_batch(kind, tmp_path):
    """Accelerate gives rank r batches r, r + 2, ... of the in-order loader: with batches of 8
    on two ranks, global batch i is samples 16 i ... 16 i + 15."""
    from ranks import run_ranks

    paths = run_ranks(_rank_trains, (kind, tmp_path / "out"), str(tmp_path / "rank"))
    want, _ = reference(kind, "32", 2, None, batch=2 * BATCH, gamma=1.0)
    for path in paths:
        for a, b in zip(torch.load(path, weights_only=True), want.parameters()):
            assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()


@pytest.mark.parametrize("own", ["compute_loss", "label_smoothing_factor", "compute_loss_func"])
def test_a_loss_of_the_users_own_is_refused_with_imbsam(own, tmp_path):
    """ImbSAM's losses come from head_tail_loss: these were ignored without a word."""

    class Weighted(InOrder):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    model = Classifier()
    before = [p.detach().clone() for p in model.parameters()]
    extra = {"compute_loss_func": lambda outputs, labels, num_items_in_batch=None: outputs["loss"]} \
        if own == "compute_loss_func" else {}
    trainer = (Weighted if own == "compute_loss" else InOrder)(
        model=model, args=arguments(tmp_path, max_steps=1), train_dataset=dataset(),
        optimizers=(optimizer("imbsam", model), None), head_tail_loss=imbsam.HeadTailLoss(counts(), threshold=20),
        **extra)
    if own == "label_smoothing_factor":  # what label_smoothing_factor=0.3 sets (its check wants a model config)
        from transformers.trainer_pt_utils import LabelSmoother

        trainer.label_smoother = LabelSmoother(epsilon=0.3)
    with pytest.raises(RuntimeError, match=f"so {'a compute_loss override' if own == 'compute_loss' else own} would "
                                           "be ignored"):
        trainer.train()
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def test_class_counts_read_label_as_well():
    x, y = data()
    assert class_counts([{"x": x[i], "label": y[i]} for i in range(len(x))], 4).tolist() == counts().tolist()
    with pytest.raises(ValueError, match="none of \\('labels', 'label'\\): pass head_tail_loss"):
        class_counts([{"x": x[0], "target": y[0]}], 4)
