"""The classifiers of the long-tailed benchmarks.

* ``resnet34_cifar``: the paper's network, torchvision's ResNet-34 with a CIFAR stem (the
  first conv becomes 3x3 / stride 1 / padding 1 without bias and the max-pool goes, so a
  32x32 image reaches the last stage at 4x4 and the adaptive pool is the paper's 4x4
  pool). The paper's README calls it ResNet-32.
* ``resnet32``: the classic CIFAR ResNet-32 (He et al. 2016): 3 stages x 5 basic blocks,
  16/32/64 channels, parameter-free shortcuts (option A), 0.46 M parameters.
* ``resnet32-gn``: the same with GroupNorm (8 groups) for BatchNorm: no layer couples the
  samples of a batch, so ImbSAM's tail passes on the tail samples alone
  (``--tail-passes subset``) take exactly its full-batch step.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

MODELS = ("resnet34", "resnet32", "resnet32-gn")
# The models whose BatchNorm normalises a training batch by its own statistics.
BATCH_NORMALISED = ("resnet34", "resnet32")
GROUPS = 8  # resnet32-gn's GroupNorm groups: 16, 32 and 64 channels split evenly


def resnet34_cifar(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-34 with a CIFAR stem; ``in_channels=1`` for grayscale (Fashion-MNIST)."""
    try:
        from torchvision.models import resnet34
    except ImportError as exc:
        raise ImportError("resnet34_cifar builds on torchvision's ResNet-34: pip install torchvision "
                          "(or imbsam[train])") from exc

    model = resnet34(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(GROUPS, channels)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.stride, self.extra = stride, cout - cin

    def shortcut(self, x):
        # Option A: subsample and zero-pad the channels; no parameters.
        if self.stride == 1 and self.extra == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet32(nn.Module):
    def __init__(self, num_classes: int = 100, in_channels: int = 3, blocks_per_stage: int = 5, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = norm(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                layers.append(_BasicBlock(cin, cout, stride if i == 0 else 1, norm))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet32(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    return ResNet32(num_classes, in_channels)


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    if name == "resnet34":
        return resnet34_cifar(num_classes, in_channels)
    if name == "resnet32":
        return resnet32(num_classes, in_channels)
    if name == "resnet32-gn":
        return ResNet32(num_classes, in_channels, norm=_group_norm)
    raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
