"""imbsam.integrations.timm: the names in timm's optimizer factory build the optimizers they
say, and ``sharpness_step`` takes the steps of the same training written by hand
(``hand_written_sam.reference``: plain PyTorch, independent of imbsam's optimizers)."""
from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.nn.functional as F

import imbsam

if os.environ.get("CI"):  # CI installs it (requirements.txt): missing there is a failure, not a skip
    import timm
else:
    timm = pytest.importorskip("timm", reason="needs timm (pip install 'imbsam[timm]')")
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.utils import NativeScaler  # noqa: E402

from imbsam.integrations import timm as imbsam_timm  # noqa: E402

from hand_written_sam import BATCH, LR, MOMENTUM, RHO, STEPS, counts, data, loader, network, reference  # noqa: E402

BASES = {"sgd": (torch.optim.SGD, {"nesterov": True, "momentum": 0.9}),
         "momentum": (torch.optim.SGD, {"nesterov": False, "momentum": 0.9}),
         "adamw": (torch.optim.AdamW, {}), "adam": (torch.optim.Adam, {})}


@pytest.mark.parametrize("name", imbsam_timm.NAMES)
def test_each_name_builds_the_optimizer_it_says_with_timms_groups(name):
    prefix = next(p for p in ("imbsam", "asam", "sam") if name.startswith(p))
    base_cls, settings = BASES[name[len(prefix):]]
    opt = create_optimizer_v2(network(), name, lr=0.03, weight_decay=1e-4, rho=0.07)
    assert type(opt) is (imbsam.ImbSAM if prefix == "imbsam" else imbsam.SAM)
    assert type(opt.base_optimizer) is base_cls
    group = opt.param_groups[0]
    assert group["rho"] == 0.07 and group["lr"] == 0.03 and group["adaptive"] == (prefix == "asam")
    for key, value in settings.items():
        assert group[key] == value, key
    # timm's groups: weight decay on the weights, none on the biases
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 1e-4]


def train(kind: str, precision: str, clip):
    net = network()
    name = {"sam": "sammomentum", "asam": "asammomentum", "imbsam": "imbsammomentum"}[kind]
    opt = create_optimizer_v2(net, name, lr=LR, momentum=MOMENTUM, weight_decay=0.0, rho=RHO)
    split = imbsam.HeadTailLoss(counts(), threshold=20)
    loss_fn = split if kind == "imbsam" else F.cross_entropy
    fp16 = precision == "16-mixed"
    scaler = NativeScaler(device="cpu") if fp16 else None
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.float16) if fp16 else None
    for x, y in list(loader())[:STEPS]:
        imbsam_timm.sharpness_step(net, opt, loss_fn, x, y, loss_scaler=scaler, clip_grad=clip,
                                   **({"amp_autocast": autocast} if autocast else {}))
    return net


CASES = [("32", None), ("32", 0.5), ("16-mixed", None), ("16-mixed", 0.5)]


@pytest.mark.parametrize("precision,clip", CASES, ids=[f"{p}-clip{c}" for p, c in CASES])
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_sharpness_step_takes_the_hand_written_steps(kind, precision, clip):
    got = train(kind, precision, clip)
    want, _ = reference(kind, precision, 1, clip, gamma=1.0)
    for (name, a), b in zip(got.named_parameters(), want.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (name, (a - b).abs().max())


def test_asam_takes_the_hand_written_steps():
    got = train("asam", "32", None)
    want, _ = reference("asam", "32", 1, None, gamma=1.0)
    for a, b in zip(got.parameters(), want.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()


@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_a_step_the_scaler_skips_leaves_the_weights_at_w_and_backs_off(kind):
    net = network()
    opt = create_optimizer_v2(net, f"{kind}momentum", lr=LR, momentum=MOMENTUM, weight_decay=0.0, rho=RHO)
    loss_fn = imbsam.HeadTailLoss(counts(), threshold=20) if kind == "imbsam" else F.cross_entropy
    scaler = NativeScaler(device="cpu")
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.float16)
    x, y = data()
    bad = x[:BATCH].clone()
    bad[0] = float("inf")
    before = [p.detach().clone() for p in net.parameters()]
    imbsam_timm.sharpness_step(net, opt, loss_fn, bad, y[:BATCH], loss_scaler=scaler, amp_autocast=autocast)
    for a, b in zip(net.parameters(), before):
        assert torch.equal(a, b)
    assert scaler.state_dict()["scale"] == 2.0 ** 15
    imbsam_timm.sharpness_step(net, opt, loss_fn, x[:BATCH], y[:BATCH], loss_scaler=scaler, amp_autocast=autocast)
    want, _ = reference(kind, "16-mixed", 1, None, steps=1, gamma=1.0)
    for a, b in zip(net.parameters(), want.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-7), (a - b).abs().max()


@pytest.mark.parametrize("frozen", [False, True])
def test_a_timm_model_trains_and_its_batchnorm_counts_the_forwards_it_was_given(frozen):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=4)
    opt = create_optimizer_v2(model, "imbsamsgd", lr=0.05, weight_decay=1e-4, rho=0.05)
    split = imbsam.HeadTailLoss(torch.tensor([40, 30, 6, 4]), threshold=10)
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 3, 0, 1])
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        loss = imbsam_timm.sharpness_step(model, opt, split, x, y, frozen_bn_stats=frozen)
        assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.num_batches_tracked.item() == (2 if frozen else 4)


def test_another_optimizer_is_refused_by_name():
    net = network()
    with pytest.raises(TypeError, match="sharpness_step takes an imbsam.SAM or imbsam.ImbSAM .* got SGD"):
        imbsam_timm.sharpness_step(net, torch.optim.SGD(net.parameters(), lr=0.1), F.cross_entropy, *data())


def _rank_trains(rank: int, world: int, path: str, kind: str) -> None:
    net = network()
    opt = create_optimizer_v2(net, f"{kind}momentum", lr=LR, momentum=MOMENTUM, weight_decay=0.0, rho=RHO)
    model = torch.nn.parallel.DistributedDataParallel(net)
    loss_fn = imbsam.HeadTailLoss(counts(), threshold=20) if kind == "imbsam" else F.cross_entropy
    outcome = "trained"
    for x, y in list(loader(2 * BATCH))[:STEPS]:  # global batches of 16, each rank every other sample
        try:
            imbsam_timm.sharpness_step(model, opt, loss_fn, x[rank::world], y[rank::world])
        except RuntimeError as error:
            outcome = str(error)
            break
    torch.save({"outcome": outcome, "weights": [p.detach() for p in net.parameters()]}, path)


@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_under_ddp_sam_takes_the_one_process_step_and_imbsam_is_refused(kind, tmp_path):
    """SAM: both passes go through DDP's forward and backward, averaged: two gloo ranks take
    the one-process steps on the global batch. ImbSAM: refused before anything is written."""
    from ranks import run_ranks

    paths = run_ranks(_rank_trains, (kind,), str(tmp_path / "rank"))
    results = [torch.load(path, weights_only=True) for path in paths]
    if kind == "imbsam":
        for result in results:
            assert "ImbSAM's step on a DistributedDataParallel model is not supported" in result["outcome"]
            for a, b in zip(result["weights"], network().parameters()):
                assert torch.equal(a, b)
        return
    want, _ = reference("sam", "32", 1, None, batch=2 * BATCH, gamma=1.0)
    for result in results:
        assert result["outcome"] == "trained"
        for a, b in zip(result["weights"], want.parameters()):
            assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()


@pytest.mark.parametrize("kind,loss_fn,message", [
    ("imbsam", F.cross_entropy, "with ImbSAM, loss_fn\\(output, target\\) returns \\(head_loss, tail_loss\\)"),
    ("sam", imbsam.HeadTailLoss(counts(), threshold=20), "with SAM, loss_fn\\(output, target\\) returns the loss"),
    ("sam", lambda out, y: F.cross_entropy(out, y, reduction="none"), "it returned a tensor of shape \\(8,\\)"),
], ids=["imbsam-one-loss", "sam-pair", "sam-per-sample"])
def test_a_loss_fn_of_the_wrong_kind_is_named_before_any_write(kind, loss_fn, message):
    net = network()
    opt = create_optimizer_v2(net, f"{kind}momentum", lr=LR, momentum=MOMENTUM, weight_decay=0.0, rho=RHO)
    before = [p.detach().clone() for p in net.parameters()]
    x, y = data()
    with pytest.raises(TypeError, match=message):
        imbsam_timm.sharpness_step(net, opt, loss_fn, x[:BATCH], y[:BATCH])
    for a, b in zip(net.parameters(), before):
        assert torch.equal(a, b)


def test_agc_leaves_the_classifier_head_unclipped_as_timms_loop_does():
    from timm.utils.clip_grad import dispatch_clip_grad

    torch.manual_seed(0)
    x, y = data()
    got = network()
    opt = create_optimizer_v2(got, "sammomentum", lr=LR, momentum=MOMENTUM, weight_decay=0.0, rho=RHO)
    imbsam_timm.sharpness_step(got, opt, F.cross_entropy, x[:BATCH], y[:BATCH], clip_grad=0.01, clip_mode="agc")
    # by hand: SAM's gradient at w + e, AGC on every parameter but the last layer's two
    net = network()
    params = list(net.parameters())
    F.cross_entropy(net(x[:BATCH]), y[:BATCH]).backward()
    grads = [p.grad.clone() for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(RHO * g / (norm + 1e-16))
    net.zero_grad()
    F.cross_entropy(net(x[:BATCH]), y[:BATCH]).backward()
    with torch.no_grad():
        for p, b in zip(params, backup):
            p.copy_(b)
    dispatch_clip_grad(params[:-2], 0.01, mode="agc")
    torch.optim.SGD(params, lr=LR, momentum=MOMENTUM).step()
    for a, b in zip(got.parameters(), params):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()
