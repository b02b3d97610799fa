"""ImbSAM with timm: its optimizer factory builds imbsam's optimizers by name, and
``sharpness_step`` is the train step timm's loop calls. A timm ResNet-10 on small
synthetic long-tailed images, a few steps on the CPU (about ten seconds).

    python examples/timm_imbsam.py [--steps 10]
"""
from __future__ import annotations

import argparse

import timm
import torch
from timm.optim import create_optimizer_v2

import imbsam
from imbsam.integrations import timm as imbsam_timm  # registers "samsgd", "imbsamsgd", ...

CLASSES = 4


def long_tailed_images(seed: int = 0):
    """Noise images whose class shifts one colour channel; 48, 24, 8 and 4 samples per class."""
    g = torch.Generator().manual_seed(seed)
    counts = [48, 24, 8, 4]
    x = torch.randn(sum(counts), 3, 32, 32, generator=g)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x[:, 0] += 0.5 * y.view(-1, 1, 1).float()
    return x, y, torch.tensor(counts)


def main(argv=None) -> float:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--steps", type=int, default=10)
    args = args.parse_args(argv)
    torch.manual_seed(0)
    x, y, counts = long_tailed_images()
    model = timm.create_model("resnet10t", pretrained=False, num_classes=CLASSES)
    optimizer = create_optimizer_v2(model, "imbsamsgd", lr=0.05, weight_decay=5e-4, rho=0.05)
    split = imbsam.HeadTailLoss(counts, threshold=10)  # classes with fewer than 10 samples are tail
    batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    step = 0
    while step < args.steps:
        for inputs, targets in batches:
            loss = imbsam_timm.sharpness_step(model, optimizer, split, inputs, targets, clip_grad=5.0)
            step += 1
            print(f"step {step:3d}  loss {loss.item():.4f}")
            if step == args.steps:
                break
    return loss.item()


if __name__ == "__main__":
    main()
