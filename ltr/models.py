"""Backbones: torchvision ResNet-34 with a CIFAR stem, and He et al.'s CIFAR ResNet-32."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from .errors import LtrError


class CifarResNet34(ResNet):
    """torchvision's ResNet-34 with a 3x3 stride-1 stem and no max-pool (the official model)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(BasicBlock, [3, 4, 6, 3], num_classes=num_classes)
        # 32x32 inputs: a 7x7 stride-2 stem and a max-pool would throw away 15/16 of the pixels.
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 512-d feature vector."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.fc(self.features(x))

    def last_conv(self) -> nn.Conv2d:
        """The final convolution of the backbone (for 'last two layers' retraining)."""
        return self.layer4[-1].conv2


class _CifarBlock(nn.Module):
    """BasicBlock with the parameter-free shortcut of He et al. (option A: subsample + zero-pad)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.stride != 1 or self.pad:
            short = x[:, :, :: self.stride, :: self.stride]
            half = self.pad // 2
            short = F.pad(short, (0, 0, 0, 0, half, self.pad - half))
        return F.relu(out + short)


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet of depth 6n+2: widths 16/32/64, strides 1/2/2."""

    def __init__(self, depth: int = 32, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise LtrError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_CifarBlock(cin, width, stride if i == 0 else 1))
                cin = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 64-d feature vector."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.fc(self.features(x))

    def last_conv(self) -> nn.Conv2d:
        """The final convolution of the backbone (for 'last two layers' retraining)."""
        return self.layer3[-1].conv2


# resnet8 is the same family at depth 8: small enough for CPU smoke runs and notebooks in CI.
MODELS = {
    "resnet34": lambda num_classes: CifarResNet34(num_classes),
    "resnet32": lambda num_classes: CifarResNet(32, num_classes),
    "resnet8": lambda num_classes: CifarResNet(8, num_classes),
}


def build_model(name: str, num_classes: int) -> nn.Module:
    """A backbone by name, with a Linear(num_features, num_classes) classifier `fc`."""
    if name not in MODELS:
        raise LtrError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes)


def _orthonormal_columns(a: torch.Tensor) -> torch.Tensor:
    """Q of a's QR decomposition with the signs fixed (diag(R) > 0): Haar-distributed for Gaussian a."""
    q, r = torch.linalg.qr(a)
    signs = torch.sign(torch.diagonal(r))
    return q * torch.where(signs == 0, torch.ones_like(signs), signs)


def simplex_etf(num_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """A fixed simplex-ETF classifier: K = num_classes unit rows in R^dim, drawn from `seed`, float32.

    The K x K simplex ETF M = sqrt(K / (K - 1)) (I - 11^T / K) has unit rows with pairwise cosine
    -1 / (K - 1); its rows span the (K - 1)-dimensional subspace orthogonal to 1 = (1, ..., 1). With
    r = min(dim, K - 1), a random r-dimensional subspace of that span (orthonormal basis Q, K x r, from
    a Gaussian K x r matrix centred column-wise) and a random orthonormal frame U (dim x r) give

        W = rownormalise(M Q U^T)        (K x dim)

    - dim >= K - 1 (ResNet-34's 512-d features, 100 classes): r = K - 1, Q Q^T = I - 11^T / K, so
      W W^T = M M^T: W is the simplex ETF itself, rotated into feature space by a random isometry
      (every row norm 1, every pairwise cosine exactly -1 / (K - 1)); the normalisation changes nothing.
    - dim < K - 1 (ResNet-8 / ResNet-32's 64-d features, 100 classes): no K unit vectors in R^dim have
      equal pairwise cosines -1 / (K - 1). W is then the simplex ETF projected orthogonally onto a random
      dim-dimensional subspace of its own span (M Q = sqrt(K / (K - 1)) Q, since Q lies in that span),
      each row rescaled to norm 1: unit rows of rank dim, the projected rows summing to zero before the
      rescaling, and pairwise cosines spread around -1 / (K - 1) instead of equal to it. The simplex
      is isotropic in its span, so no subspace is preferred: a random one is as good as any.

    The draws use their own generator, so the caller's random stream (the backbone's initialisation) is
    the one a plain run with the same seed sees.
    """
    k = int(num_classes)
    if k < 2 or dim < 1:
        raise LtrError(f"a simplex ETF needs at least 2 classes and 1 feature dimension, got {k} and {dim}")
    gen = torch.Generator().manual_seed(int(seed))
    r = min(dim, k - 1)
    ones = torch.ones(k, 1, dtype=torch.float64)
    m = math.sqrt(k / (k - 1)) * (torch.eye(k, dtype=torch.float64) - ones @ ones.T / k)
    g = torch.randn(k, r, generator=gen, dtype=torch.float64)
    q = _orthonormal_columns(g - g.mean(0, keepdim=True))  # K x r, columns orthogonal to 1
    u = _orthonormal_columns(torch.randn(dim, r, generator=gen, dtype=torch.float64))  # dim x r
    w = m @ q @ u.T
    return (w / w.norm(dim=1, keepdim=True)).float()


@torch.no_grad()
def fix_etf_classifier(model: nn.Module, seed: int) -> None:
    """Make model.fc Hasegawa & Sato's classifier: simplex-ETF weight (fixed, requires_grad False), bias 0.
    The bias stays trained (under the run's weight decay); checkpoints carry the weight in the state_dict."""
    fc = model.fc
    fc.weight.copy_(simplex_etf(fc.out_features, fc.in_features, seed).to(fc.weight))
    fc.weight.requires_grad_(False)
    fc.bias.zero_()


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
