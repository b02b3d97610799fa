"""imbsam.integrations.lightning: SAM, ASAM and ImbSAM in Lightning's automatic optimization
take the steps that the same training written by hand takes (``hand_written_sam.reference``:
plain PyTorch, independent of imbsam's optimizers)."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import imbsam

if os.environ.get("CI"):  # CI installs it (requirements.txt): missing there is a failure, not a skip
    import lightning.pytorch as pl
else:
    pl = pytest.importorskip("lightning.pytorch", reason="needs Lightning (pip install 'imbsam[lightning]')")
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from imbsam.integrations.lightning import SharpnessModule  # noqa: E402

from hand_written_sam import BATCH, GAMMA, LR, MOMENTUM, RHO, STEPS, counts, data, loader, network, reference  # noqa: E402


class Model(SharpnessModule):
    def __init__(self, kind: str, scheduler: bool = True):
        super().__init__()
        self.kind, self.scheduler = kind, scheduler
        self.net = network()
        self.split = imbsam.HeadTailLoss(counts(), threshold=20)  # classes 2 and 3 are tail

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("seen", float(len(x)), reduce_fx="sum", on_step=False, on_epoch=True)
        if self.kind == "imbsam":
            head, tail = self.split(self(x), y)
            self.log("loss_at_w", (head + tail).detach().float(), on_step=True, on_epoch=False)
            return {"loss": head + tail, "head_loss": head, "tail_loss": tail}
        loss = F.cross_entropy(self(x), y)
        self.log("loss_at_w", loss.detach().float(), on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        if self.kind == "imbsam":
            opt = imbsam.ImbSAM(self.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)
        else:
            opt = imbsam.SAM(self.parameters(), torch.optim.SGD, rho=RHO, adaptive=self.kind == "asam", lr=LR,
                             momentum=MOMENTUM)
        if not self.scheduler:
            return opt
        schedule = torch.optim.lr_scheduler.ExponentialLR(opt, GAMMA)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def trainer(**kwargs):
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, max_steps=STEPS)
    settings.update(kwargs)
    if settings.get("precision") == "16-mixed":
        # Lightning turns precision="16-mixed" into bf16-mixed on the CPU; its plugin, given
        # explicitly, runs fp16 autocast with a GradScaler("cpu"), as 16-mixed does on a GPU.
        del settings["precision"]
        settings["plugins"] = [MixedPrecision("16-mixed", "cpu")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pl.Trainer(**settings)


def fit(model, **kwargs):
    t = trainer(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, loader())
    return t


CASES = [("32", 1, None), ("32", 2, None), ("32", 2, 0.5), ("bf16-mixed", 1, None), ("bf16-mixed", 2, 0.5),
         ("16-mixed", 1, None), ("16-mixed", 2, 0.5)]


@pytest.mark.parametrize("precision,k,clip", CASES, ids=[f"{p}-k{k}-clip{c}" for p, k, c in CASES])
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_the_trainer_takes_the_hand_written_steps(kind, precision, k, clip):
    model = Model(kind)
    t = fit(model, precision=precision, accumulate_grad_batches=k, gradient_clip_val=clip)
    assert t.global_step == STEPS
    want, loss_at_w = reference(kind, precision, k, clip)
    for (name, got), expected in zip(model.net.named_parameters(), want.parameters()):
        assert torch.allclose(got, expected, rtol=0, atol=1e-6), (name, (got - expected).abs().max())
    # The pass at w + e logged nothing: the loss logged is the one at w, and "seen" counts
    # each training sample of the steps once.
    assert torch.allclose(t.callback_metrics["loss_at_w"], loss_at_w, rtol=0, atol=1e-6)
    assert t.callback_metrics["seen"].item() == STEPS * k * BATCH


def test_asam_takes_the_hand_written_steps():
    model = Model("asam")
    fit(model)
    want, _ = reference("asam", "32", 1, None)
    for got, expected in zip(model.net.parameters(), want.parameters()):
        assert torch.allclose(got, expected, rtol=0, atol=1e-6), (got - expected).abs().max()


@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_a_run_resumed_from_a_trainer_checkpoint_continues_bitwise(kind, tmp_path):
    """Two epochs of 4 steps, and the same split at the epoch's end into two fits (Lightning
    restarts an epoch cut mid-way, so the split is where a resume is exact)."""
    epochs = dict(max_steps=-1, accumulate_grad_batches=2, precision="16-mixed")
    whole = Model(kind)
    fit(whole, max_epochs=2, **epochs)
    first = Model(kind)
    t = fit(first, max_epochs=1, **epochs)
    path = str(tmp_path / "epoch1.ckpt")
    t.save_checkpoint(path)
    second = Model(kind)
    with torch.no_grad():  # nothing of the fresh module's own weights may survive the resume
        for p in second.parameters():
            p.add_(1.0)
    t2 = trainer(max_epochs=2, **epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t2.fit(second, loader(), ckpt_path=path)
    assert t2.global_step == 2 * len(loader()) // 2
    for got, want in zip(second.net.parameters(), whole.net.parameters()):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_a_step_the_scaler_skips_leaves_the_weights_at_w_and_backs_off(kind):
    """A non-finite loss in the first batch: the GradScaler skips that step and halves its
    scale; the weights are not left at w + e, and the next step is the one a run without
    the bad batch takes first (a power-of-two scale changes no rounding)."""
    x, y = data()
    bad = x[:BATCH].clone()
    bad[0] = float("inf")
    two = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat([bad, x[:BATCH]]),
                                                                      torch.cat([y[:BATCH], y[:BATCH]])),
                                      batch_size=BATCH)
    model = Model(kind, scheduler=False)
    t = trainer(precision="16-mixed", max_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, two)
    assert t.precision_plugin.scaler.get_scale() == 2.0 ** 15
    good = Model(kind, scheduler=False)
    fit(good, precision="16-mixed", max_steps=1)
    for got, want in zip(model.parameters(), good.parameters()):
        assert torch.allclose(got, want, rtol=0, atol=1e-7), (got - want).abs().max()


def test_imbsam_needs_the_head_and_the_tail_loss():
    class LossOnly(Model):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            return out["loss"]

    with pytest.raises(TypeError, match="training_step returns {'loss': head \\+ tail, 'head_loss'"):
        fit(LossOnly("imbsam"), max_steps=1)


def test_a_sharpness_schedule_is_refused_before_the_first_step():
    class Scheduled(Model):
        def configure_optimizers(self):
            return imbsam.SAM(self.parameters(), torch.optim.SGD, lr=LR, schedule=imbsam.schedules.Periodic(2))

    model = Scheduled("sam")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="SAM in Lightning takes neither a sharpness schedule nor use_grad_scaler"):
        fit(model, max_steps=1)
    for got, want in zip(model.parameters(), before):
        assert torch.equal(got, want)


def test_another_optimizer_steps_as_in_a_plain_lightning_module():
    class Plain(Model):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    model = Plain("sam")
    fit(model, max_steps=1)
    assert model._sharpness_record().inputs == []  # no batch kept for a step this module does not run
    net = network()
    x, y = next(iter(loader()))
    F.cross_entropy(net(x), y).backward()
    with torch.no_grad():
        for p in net.parameters():
            p.sub_(LR * p.grad)
    for got, want in zip(model.net.parameters(), net.parameters()):
        assert torch.allclose(got, want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("frozen", [False, True], ids=["updated-in-both", "frozen-at-w+e"])
def test_batchnorm_statistics_update_in_both_forwards_or_in_the_first(frozen):
    """The paper's loop updates the running statistics at w and at w + e; with
    ``sharpness_frozen_running_stats`` only the forward at w does."""

    class WithBatchNorm(Model):
        sharpness_frozen_running_stats = frozen

        def __init__(self):
            super().__init__("sam", scheduler=False)
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.BatchNorm1d(12), torch.nn.Linear(12, 4))

    model = WithBatchNorm()
    start = [t.detach().clone() for t in model.net.state_dict().values()]
    fit(model, max_steps=1)
    bn = model.net[1]
    by_hand = WithBatchNorm().net
    with torch.no_grad():
        for t, s in zip(by_hand.state_dict().values(), start):
            t.copy_(s)
    x, _ = next(iter(loader()))
    by_hand(x)  # the forward at w
    expected_batches = 1 if frozen else 2
    assert bn.num_batches_tracked.item() == expected_batches
    if frozen:
        assert torch.equal(bn.running_mean, by_hand[1].running_mean)
        assert torch.equal(bn.running_var, by_hand[1].running_var)
    else:
        assert not torch.equal(bn.running_mean, by_hand[1].running_mean)  # the forward at w + e moved them on


class EveryOtherSample(torch.utils.data.Sampler):
    """Rank r of W takes samples r, r + W, ...: with batches of 8 on two ranks, global batch
    i is samples 16 i ... 16 i + 15, unshuffled (Lightning's own sampler shuffles)."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return iter(range(rank, self.n, world))

    def __len__(self):
        return self.n // 2


@pytest.mark.parametrize("kind,k", [("sam", 1), ("imbsam", 2)])
def test_two_ddp_processes_take_the_steps_of_one_on_the_global_batch(kind, k, monkeypatch):
    """Lightning's DDP on two gloo processes (127.0.0.1), each on its half of every batch
    (DistributedSampler): the one-process training on the global batch."""
    from ranks import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    model = Model(kind)
    t = trainer(strategy="ddp_spawn", devices=2, accumulate_grad_batches=k, use_distributed_sampler=False)
    x, y = data()
    shares = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH,
                                         sampler=EveryOtherSample(len(x)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, shares)
    want, _ = reference(kind, "32", k, None, batch=2 * BATCH)
    for (name, got), expected in zip(model.net.named_parameters(), want.parameters()):
        assert torch.allclose(got, expected, rtol=0, atol=1e-6), (name, (got - expected).abs().max())


def test_a_strategy_other_than_ddp_is_refused_on_several_processes():
    model = Model("sam")
    before = [p.detach().clone() for p in model.parameters()]
    model.trainer = type("Stub", (), {"strategy": object(), "world_size": 2})()
    with pytest.raises(RuntimeError, match="runs under the 'ddp' strategies .* only, not object"):
        model._refuse_what_is_not_supported(model.configure_optimizers()["optimizer"])
    for got, want in zip(model.parameters(), before):
        assert torch.equal(got, want)


# ---- what a user's module does besides returning the loss (a review's findings, 2026-12-05) ----

def weights_of(model) -> list:
    return [p.detach().clone() for p in model.net.parameters()]


@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_validation_calling_training_step_changes_no_step(kind):
    """validation_step = training_step is common; with the sanity check on, its batches were
    replayed at w + e as if they belonged to the step."""

    class Validating(Model):
        def validation_step(self, batch, batch_idx):
            return self.training_step(batch, batch_idx)

    plain = Model(kind)
    fit(plain, max_steps=4)
    validating = Validating(kind)
    t = trainer(max_steps=4, num_sanity_val_steps=2, val_check_interval=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(validating, loader(), loader())
    for a, b in zip(weights_of(validating), weights_of(plain)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_what_training_step_does_to_its_batch_does_not_reach_the_pass_at_w_plus_e(kind):
    """An in-place edit of the batch (x.div_(2)) and a dict batch popped: the pass at w + e gets
    the batch as the loader gave it, so both train as the out-of-place version does."""

    class InPlace(Model):
        def training_step(self, batch, batch_idx):
            x, y = batch["x"], batch.pop("y")
            x.div_(2.0)
            return super().training_step((x, y), batch_idx)

    class OutOfPlace(Model):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch["x"] / 2.0, batch["y"]), batch_idx)

    x, y = data()
    dicts = [{"x": x[i], "y": y[i]} for i in range(len(x))]
    results = []
    for cls in (InPlace, OutOfPlace):
        model = cls(kind)
        t = trainer()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.fit(model, torch.utils.data.DataLoader(dicts, batch_size=BATCH))
        results.append(weights_of(model))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_a_training_step_inherited_from_another_base_is_recorded():
    class Existing(pl.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

    class Sharp(SharpnessModule, Existing):
        def __init__(self):
            super().__init__()
            self.net = network()

        def configure_optimizers(self):
            return Model.configure_optimizers(self)

        kind, scheduler = "sam", True

    model = Sharp()
    fit(model)
    want, _ = reference("sam", "32", 1, None)
    for a, b in zip(model.net.parameters(), want.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_an_optimizer_step_override_without_super_is_named():
    class WarmUp(Model):
        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            optimizer.step(closure=optimizer_closure)  # Lightning's docs' warm-up pattern, without super()

    with pytest.raises(RuntimeError, match="an optimizer_step override must call super\\(\\).optimizer_step"):
        fit(WarmUp("sam"), max_steps=3)


def test_an_imbsam_loss_that_is_not_head_plus_tail_is_refused():
    class Regularised(Model):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            out["loss"] = out["loss"] + 0.1 * sum(p.square().sum() for p in self.parameters())
            return out

    model = Regularised("imbsam")
    before = weights_of(model)
    with pytest.raises(ValueError, match="'loss' .* is not 'head_loss' \\+ 'tail_loss'"):
        fit(model, max_steps=1)
    for a, b in zip(weights_of(model), before):
        assert torch.equal(a, b)


def test_training_step_knows_when_it_runs_at_w_plus_e():
    class Counting(Model):
        def training_step(self, batch, batch_idx):
            self.calls = getattr(self, "calls", []) + [self.sharpness_second_pass]
            return super().training_step(batch, batch_idx)

    model = Counting("sam")
    fit(model, max_steps=2)
    assert model.calls == [False, True, False, True]
