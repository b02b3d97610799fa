"""ImbSAM in a Lightning Trainer: a tiny classifier on synthetic long-tailed data, a few
steps on the CPU (about ten seconds). The one imbsam line is the base class.

    python examples/lightning_imbsam.py [--precision 32|bf16-mixed] [--steps 20]
"""
from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch

import imbsam
from imbsam.integrations.lightning import SharpnessModule

CLASSES, FEATURES = 6, 16


def long_tailed_data(n_max: int = 200, imbalance: int = 20, seed: int = 0):
    """Gaussian blobs, class c with n_max * imbalance^(-c / (C - 1)) samples."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, FEATURES, generator=g) * 0.5  # overlapping: the tail is hard
    xs, ys = [], []
    for c in range(CLASSES):
        n = max(2, int(n_max * imbalance ** (-c / (CLASSES - 1))))
        xs.append(centres[c] + torch.randn(n, FEATURES, generator=g))
        ys.append(torch.full((n,), c))
    return torch.cat(xs), torch.cat(ys)


class Classifier(SharpnessModule):  # instead of pl.LightningModule: the Trainer takes ImbSAM's steps
    def __init__(self, class_counts: torch.Tensor):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, CLASSES))
        self.split = imbsam.HeadTailLoss(class_counts, threshold=40)  # classes with < 40 samples are tail

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        head, tail = self.split(self(x), y)
        self.log("loss", head + tail, prog_bar=True)
        return {"loss": head + tail, "head_loss": head, "tail_loss": tail}

    def configure_optimizers(self):
        return imbsam.ImbSAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)


def main(argv=None) -> float:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    args.add_argument("--steps", type=int, default=20)
    args = args.parse_args(argv)
    torch.manual_seed(0)
    x, y = long_tailed_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    model = Classifier(torch.bincount(y, minlength=CLASSES))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, precision=args.precision,
                         logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(model, loader)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(f"after {trainer.global_step} ImbSAM steps: training accuracy {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
