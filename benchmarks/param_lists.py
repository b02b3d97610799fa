"""Parameter lists of the models the benchmarks step: shapes only, built on the meta device."""
from __future__ import annotations

import torch

from imbsam.train.models import resnet32, resnet34_cifar

MODELS = ("resnet34", "vit_b_16", "resnet32")


def _shapes(build) -> list[torch.Size]:
    with torch.device("meta"):
        return [p.shape for p in build().parameters()]


def model_shapes(name: str) -> list[torch.Size]:
    if name == "resnet34":  # the paper's CIFAR-100 model: 21.3 M parameters in 110 tensors
        return _shapes(lambda: resnet34_cifar(num_classes=100))
    if name == "vit_b_16":  # 86.6 M parameters in 152 tensors
        from torchvision.models import vit_b_16
        return _shapes(vit_b_16)
    if name == "resnet32":  # the light CIFAR standard: 0.47 M parameters in 95 tensors (quick runs)
        return _shapes(lambda: resnet32(num_classes=100))
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
