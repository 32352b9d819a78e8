"""CIFAR ResNets (ResNet-20/32/44/56/110) of He et al. 2016.

K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
arXiv:1512.03385, section 4.2 ("CIFAR-10 and Analysis").

The network is a 3×3 stem convolution with 16 filters, then three stages of ``n`` basic
blocks each (16, 32 and 64 filters; the first block of stages 2 and 3 halves the feature
map with stride 2), global average pooling and one fully connected layer: ``6n + 2``
weighted layers in all. Shortcuts follow the paper's option A (parameter-free identity; where
the shape changes, the input is subsampled with stride 2 and zero-padded in the channel
dimension), which gives the paper's parameter counts (0.27M / 0.46M / 0.85M / 1.7M for
ResNet-20/32/56/110). Option B (1×1 projection + BatchNorm where the shape changes) is
available as ``shortcut="B"``.

Weights use Kaiming (He et al. 2015) normal initialisation, as in the widely used CIFAR
reproduction of these networks. Because the head uses global average pooling, any image size
works (at least 8 pixels is sensible: the map shrinks by 4 in all).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from zsharp.models.normalize import with_input_norm

Shortcut = Literal["A", "B"]

CIFAR_RESNET_DEPTHS: tuple[int, ...] = (20, 32, 44, 56, 110)


class _PadShortcutA(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the new channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError("option-A shortcuts can only add channels")
        self.stride = stride
        extra = out_planes - in_planes
        # Pad evenly on both sides of the channel dimension, as in the reference code.
        self.pad_front = extra // 2
        self.pad_back = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with a residual connection (post-activation, He et al. 2016)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: Shortcut = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _PadShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (He et al. 2016, section 4.2).

    Args:
        depth: 6n + 2 (20, 32, 44, 56, 110, ...).
        num_classes: size of the output layer.
        in_channels: image channels.
        shortcut: ``"A"`` (zero-padding identity, the paper's CIFAR choice) or ``"B"``
            (1×1 projection + BatchNorm where the shape changes).
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: Shortcut = "A",
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._make_stage(16, n, stride=1, shortcut=shortcut)
        self.layer2 = self._make_stage(32, n, stride=2, shortcut=shortcut)
        self.layer3 = self._make_stage(64, n, stride=2, shortcut=shortcut)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_stage(
        self, planes: int, blocks: int, stride: int, shortcut: Shortcut
    ) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s, shortcut))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


def cifar_resnet(
    depth: int, num_classes: int, in_channels: int = 3, shortcut: Shortcut = "A"
) -> CifarResNet:
    """Build ResNet-``depth`` for CIFAR-sized images (He et al. 2016)."""
    return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut)


def _builder(depth: int):  # type: ignore[no-untyped-def]
    def build(
        num_classes: int,
        image_size: int,
        in_channels: int = 3,
        shortcut: Shortcut = "A",
        input_norm: str = "none",
    ) -> nn.Module:
        return with_input_norm(cifar_resnet(depth, num_classes, in_channels, shortcut), input_norm)

    build.__name__ = build.__qualname__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth} (the registry's builder; image_size is not used)."
    return build


resnet20 = _builder(20)
resnet32 = _builder(32)
resnet56 = _builder(56)
resnet110 = _builder(110)
