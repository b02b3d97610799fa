"""The paper's classifier: torchvision's ResNet-34 with a CIFAR stem.

The first conv becomes 3x3 / stride 1 / padding 1 without bias and the max-pool goes,
so a 32x32 image reaches the last stage at 4x4 and the adaptive average pool is the
paper's 4x4 pool. (The paper's README calls this network ResNet-32.)
"""
from __future__ import annotations

from torch import nn


def resnet34_cifar(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-34 with a CIFAR stem; ``in_channels=1`` for grayscale (Fashion-MNIST)."""
    from torchvision.models import resnet34

    model = resnet34(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
