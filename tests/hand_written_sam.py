"""The SAM and ImbSAM training that the integration tests compare with, written by hand in
plain PyTorch, independent of imbsam's optimizers: the gradients at w of every micro-batch
(scaled and divided as a trainer does), e from them, the same micro-batches at w + e, g_H
added (ImbSAM), unscaled, clipped, torch's SGD step; and the small task it trains."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import imbsam

RHO, LR, MOMENTUM, GAMMA = 0.05, 0.1, 0.9, 0.7  # GAMMA: a per-step LR decay, so a missed scheduler step shows
BATCH, STEPS = 8, 3
EPS = 1e-16  # imbsam's e = rho g / (||g|| + EPS)
ASAM_ETA = 0.01  # imbsam's default adaptive_eta


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = torch.tensor([0] * 40 + [1] * 30 + [2] * 16 + [3] * 10)[torch.randperm(96, generator=g)]
    return x, y


def counts():
    return torch.bincount(data()[1], minlength=4)


def network():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4))


def loader(batch: int = BATCH):
    x, y = data()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


AUTOCAST = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def reference(kind: str, precision: str, k: int, clip, steps: int = STEPS, batch: int = BATCH, gamma=GAMMA,
              loss_in_autocast: bool = True):
    """The hand-written training: plain PyTorch, the Trainer's batches and scaling. Returns
    the network and the last micro-batch's loss at w."""
    net = network()
    params = list(net.parameters())
    base = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    schedule = torch.optim.lr_scheduler.ExponentialLR(base, gamma)  # gamma 1: a constant LR
    split = imbsam.HeadTailLoss(counts(), threshold=20)
    scale = 2.0 ** 16 if precision == "16-mixed" else 1.0  # GradScaler's first scale: a power of two
    dtype = AUTOCAST[precision]

    def losses(x, y):
        # Lightning autocasts the whole training_step; Accelerate the model's forward only
        # (loss_in_autocast=False), whose logits it returns in fp32.
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = net(x)
            if loss_in_autocast:
                return split(logits, y) if kind == "imbsam" else (F.cross_entropy(logits, y), None)
        logits = logits.float()
        return split(logits, y) if kind == "imbsam" else (F.cross_entropy(logits, y), None)

    batches = list(loader(batch))
    for step in range(steps):
        micro = batches[step * k:(step + 1) * k]
        base.zero_grad()
        tail_sums = [torch.zeros_like(p) for p in params]
        for x, y in micro:
            first, tail = losses(x, y)
            last_loss = (first + tail if kind == "imbsam" else first).detach().float()
            if kind == "imbsam":
                for t, g in zip(tail_sums, torch.autograd.grad(tail / k * scale, params, retain_graph=True)):
                    t.add_(g)
            (first / k * scale).backward()
        at_w = [p.grad / scale for p in params]  # SAM: g; ImbSAM: g_H
        direction = [t / scale for t in tail_sums] if kind == "imbsam" else at_w
        if kind == "asam":  # on tensors of two or more dimensions, T = |w| + eta: e = rho T^2 g / ||T g||
            t = [p.detach().abs() + ASAM_ETA if p.dim() > 1 else torch.ones_like(p) for p in params]
            norms = [torch.linalg.vector_norm(ti * g) for ti, g in zip(t, direction)]
            norm = torch.linalg.vector_norm(torch.stack(norms))
            e = [RHO * ti * ti * g / (norm + EPS) for ti, g in zip(t, direction)]
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in direction]))
            e = [RHO * g / (norm + EPS) for g in direction]
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.add_(ei)
        base.zero_grad()
        for x, y in micro:
            first, tail = losses(x, y)
            ((tail if kind == "imbsam" else first) / k * scale).backward()
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
            for p, h in zip(params, at_w):
                p.grad = p.grad / scale + (h if kind == "imbsam" else 0)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        base.step()
        schedule.step()
    return net, last_loss
