"""Deep SAD's networks (Ruff et al., ICLR 2020, appendix): LeNet-type encoders without
bias terms, and the decoders of their autoencoder pre-training.

No bias anywhere and BatchNorm without affine parameters: a bias lets the network map
every input onto the centre c (the hypersphere collapse Deep SVDD's paper proves), so
the encoder must not have one. The layer sizes are the paper's (the authors' code,
lukasruff/Deep-SAD-PyTorch, ``src/networks/{fmnist,cifar10}_LeNet.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# BatchNorm's eps in these networks (the authors' value; torch's default is 1e-5).
BN_EPS = 1e-4


def _bn2d(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, affine=False)


def _bn1d(features: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(features, eps=BN_EPS, affine=False)


class FashionMNISTEncoder(nn.Module):
    """28x28x1 -> conv5x5(16) BN LReLU pool -> conv5x5(32) BN LReLU pool -> fc 128 BN LReLU -> fc rep_dim."""

    def __init__(self, rep_dim: int = 64):
        super().__init__()
        self.rep_dim = rep_dim
        self.conv1 = nn.Conv2d(1, 16, 5, bias=False, padding=2)
        self.bn1 = _bn2d(16)
        self.conv2 = nn.Conv2d(16, 32, 5, bias=False, padding=2)
        self.bn2 = _bn2d(32)
        self.fc1 = nn.Linear(32 * 7 * 7, 128, bias=False)
        self.bn3 = _bn1d(128)
        self.fc2 = nn.Linear(128, rep_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.leaky_relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.leaky_relu(self.bn2(self.conv2(x))), 2)
        x = F.leaky_relu(self.bn3(self.fc1(x.flatten(1))))
        return self.fc2(x)


class FashionMNISTDecoder(nn.Module):
    """rep_dim -> fc 128 BN -> 8x4x4, then (LReLU, upsample x2, deconv5x5) three times -> sigmoid."""

    def __init__(self, rep_dim: int = 64):
        super().__init__()
        self.fc = nn.Linear(rep_dim, 128, bias=False)
        self.bn0 = _bn1d(128)
        self.deconv1 = nn.ConvTranspose2d(8, 32, 5, bias=False, padding=2)
        self.bn1 = _bn2d(32)
        self.deconv2 = nn.ConvTranspose2d(32, 16, 5, bias=False, padding=3)  # 16x16 -> 14x14
        self.bn2 = _bn2d(16)
        self.deconv3 = nn.ConvTranspose2d(16, 1, 5, bias=False, padding=2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.bn0(self.fc(z)).view(-1, 8, 4, 4)
        x = self.deconv1(F.interpolate(F.leaky_relu(x), scale_factor=2))
        x = self.deconv2(F.interpolate(F.leaky_relu(self.bn1(x)), scale_factor=2))
        x = self.deconv3(F.interpolate(F.leaky_relu(self.bn2(x)), scale_factor=2))
        return torch.sigmoid(x)


class Cifar10Encoder(nn.Module):
    """32x32x3 -> three (conv5x5 BN LReLU pool) with 32, 64, 128 channels -> fc rep_dim."""

    def __init__(self, rep_dim: int = 128):
        super().__init__()
        self.rep_dim = rep_dim
        self.conv1 = nn.Conv2d(3, 32, 5, bias=False, padding=2)
        self.bn1 = _bn2d(32)
        self.conv2 = nn.Conv2d(32, 64, 5, bias=False, padding=2)
        self.bn2 = _bn2d(64)
        self.conv3 = nn.Conv2d(64, 128, 5, bias=False, padding=2)
        self.bn3 = _bn2d(128)
        self.fc1 = nn.Linear(128 * 4 * 4, rep_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.max_pool2d(F.leaky_relu(bn(conv(x))), 2)
        return self.fc1(x.flatten(1))


class Cifar10Decoder(nn.Module):
    """rep_dim -> (rep_dim/16)x4x4, LReLU, then deconv5x5 BN LReLU upsample x3 -> deconv5x5(3) -> sigmoid."""

    def __init__(self, rep_dim: int = 128):
        super().__init__()
        self.rep_dim = rep_dim
        self.deconv1 = nn.ConvTranspose2d(rep_dim // 16, 128, 5, bias=False, padding=2)
        self.bn1 = _bn2d(128)
        self.deconv2 = nn.ConvTranspose2d(128, 64, 5, bias=False, padding=2)
        self.bn2 = _bn2d(64)
        self.deconv3 = nn.ConvTranspose2d(64, 32, 5, bias=False, padding=2)
        self.bn3 = _bn2d(32)
        self.deconv4 = nn.ConvTranspose2d(32, 3, 5, bias=False, padding=2)
        gain = nn.init.calculate_gain("leaky_relu")  # the authors' initialisation of this decoder
        for d in (self.deconv1, self.deconv2, self.deconv3, self.deconv4):
            nn.init.xavier_uniform_(d.weight, gain=gain)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(z.view(-1, self.rep_dim // 16, 4, 4))
        for deconv, bn in ((self.deconv1, self.bn1), (self.deconv2, self.bn2), (self.deconv3, self.bn3)):
            x = F.interpolate(F.leaky_relu(bn(deconv(x))), scale_factor=2)
        return torch.sigmoid(self.deconv4(x))


class Autoencoder(nn.Module):
    """The pre-training network: its encoder becomes Deep SAD's network φ."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


# Per dataset: (encoder, decoder) classes; one place for which network a dataset gets.
NETWORKS = {"fmnist": (FashionMNISTEncoder, FashionMNISTDecoder), "cifar10": (Cifar10Encoder, Cifar10Decoder)}


def build_autoencoder(dataset: str) -> Autoencoder:
    if dataset not in NETWORKS:
        raise ValueError(f"no Deep SAD network for {dataset!r}; allowed: {', '.join(NETWORKS)}")
    encoder, decoder = NETWORKS[dataset]
    return Autoencoder(encoder(), decoder())
