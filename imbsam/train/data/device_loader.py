"""Batches drawn from a dataset that lives on the device, augmented on the device.

The whole uint8 dataset sits in device memory; an epoch is a permutation from a
dedicated generator; random crop (zero padding) and horizontal flip are done for the
whole batch at once by index arithmetic. No per-sample Python, no host sync, and the
generator's state is all a checkpoint needs to replay the same batches.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop_flip(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Per-sample random crop of the zero-padded batch back to its size, then a random flip."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device, generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device, generator=generator)
    rows = (oy + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (ox + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    flip = torch.rand(b, device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


class DeviceLoader:
    """Iterates ``(images, labels)`` batches: float images normalised, labels int64.

    Args:
        images: (N, C, H, W) uint8; labels: (N,) int64 (moved to ``device`` once).
        train: shuffle, and augment (random crop with ``padding``, horizontal flip) unless
            ``augment`` is False.
        generator: the source of all randomness (on ``device``); None for evaluation.
        drop_last: drop the last partial batch (a CUDA graph replays one shape).
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, mean, std, device: torch.device,
                 train: bool, generator: Optional[torch.Generator] = None, drop_last: bool = False,
                 padding: int = 4, channels_last: bool = False, augment: bool = True):
        if train and generator is None:
            raise ValueError("a training loader needs a generator")
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.train, self.generator = batch_size, train, generator
        self.drop_last, self.padding, self.channels_last = drop_last, padding, channels_last
        self.augment = train and augment
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, device=device).view(shape)
        self.std = torch.tensor(std, device=device).view(shape)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.labels)
        order = (torch.randperm(n, device=self.labels.device, generator=self.generator) if self.train
                 else torch.arange(n, device=self.labels.device))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx]
            if self.augment:
                x = random_crop_flip(x, self.padding, self.generator)
            x = (x.float() / 255 - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]
