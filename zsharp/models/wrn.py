"""Wide Residual Networks (WRN-d-k), in particular WRN-28-10.

S. Zagoruyko, N. Komodakis, "Wide Residual Networks", BMVC 2016, arXiv:1605.07146.

A 3×3 stem convolution with 16 filters, then three groups of ``n = (depth - 4) / 6``
pre-activation basic blocks (BN-ReLU-conv3×3, optional dropout, BN-ReLU-conv3×3) with
16k, 32k and 64k filters (the first block of groups 2 and 3 has stride 2), a final BN-ReLU,
global average pooling and a linear layer. Where the shape changes, the shortcut is a 1×1
convolution applied to the pre-activated input. WRN-28-10 has 36.5M parameters for 10
classes. Dropout between the two convolutions of a block defaults to 0 (the paper uses 0.3
in some runs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block B(3, 3) with optional dropout."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        # The projection shortcut sees the pre-activated input, as in the paper's code.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis 2016).

    Args:
        depth: 6n + 4 (28 for WRN-28-10).
        widen_factor: k (10 for WRN-28-10).
        num_classes: size of the output layer.
        in_channels: image channels.
        dropout: dropout rate inside each block.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.in_planes = widths[0]
        self.block1 = self._make_group(widths[1], n, 1, dropout)
        self.block2 = self._make_group(widths[2], n, 2, dropout)
        self.block3 = self._make_group(widths[3], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def _make_group(self, planes: int, blocks: int, stride: int, dropout: float) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(WideBasicBlock(self.in_planes, planes, s, dropout))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))


def wrn28_10(
    num_classes: int, image_size: int = 32, in_channels: int = 3, dropout: float = 0.0
) -> WideResNet:
    """WRN-28-10 (Zagoruyko & Komodakis 2016)."""
    return WideResNet(28, 10, num_classes=num_classes, in_channels=in_channels, dropout=dropout)
