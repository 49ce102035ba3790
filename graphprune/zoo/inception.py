"""Small GoogLeNet-style network with two Inception blocks for 3x32x32 inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register


class BasicConv2d(nn.Module):
    """Conv2d + BatchNorm + ReLU (via ``Tensor.relu``)."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_ch,
            out_ch,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).relu()


class InceptionBlock(nn.Module):
    """Four parallel branches concatenated along channels.

    Branches: 1x1; 1x1 -> 3x3; 1x1 -> 5x5 (or 1x1 -> 3x3 -> 3x3 when
    ``factorize_5x5``); 3x3 max-pool -> 1x1.
    """

    def __init__(
        self,
        in_ch: int,
        ch1x1: int,
        ch3x3_red: int,
        ch3x3: int,
        ch5x5_red: int,
        ch5x5: int,
        pool_proj: int,
        factorize_5x5: bool = False,
    ) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(in_ch, ch1x1, 1)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_ch, ch3x3_red, 1), BasicConv2d(ch3x3_red, ch3x3, 3)
        )
        if factorize_5x5:
            self.branch3 = nn.Sequential(
                BasicConv2d(in_ch, ch5x5_red, 1),
                BasicConv2d(ch5x5_red, ch5x5, 3),
                BasicConv2d(ch5x5, ch5x5, 3),
            )
        else:
            self.branch3 = nn.Sequential(
                BasicConv2d(in_ch, ch5x5_red, 1), BasicConv2d(ch5x5_red, ch5x5, 5)
            )
        self.branch4 = BasicConv2d(in_ch, pool_proj, 1)
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1(x)
        b2 = self.branch2(x)
        b3 = self.branch3(x)
        b4 = self.branch4(F.max_pool2d(x, 3, stride=1, padding=1))
        return torch.cat([b1, b2, b3, b4], 1)


class InceptionNet(nn.Module):
    """Stem, two Inception blocks with a max-pool between, pooled linear head."""

    def __init__(
        self, num_classes: int = 10, width: int = 16, dropout: float = 0.2
    ) -> None:
        super().__init__()
        w = width
        self.stem = BasicConv2d(3, 2 * w, 3)
        self.block1 = InceptionBlock(2 * w, w, w, 2 * w, w // 2, w // 2, w // 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.block2 = InceptionBlock(
            self.block1.out_channels, 2 * w, w, 3 * w, w // 2, w, w, factorize_5x5=True
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.block2.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.pool1(self.block1(x))
        x = self.avgpool(self.block2(x))
        x = x.reshape(x.size(0), -1)
        return self.fc(self.dropout(x))


@register("mini_inception", (3, 32, 32))
def inception(num_classes: int = 10, width: int = 16) -> InceptionNet:
    """Two-block Inception network (5x5 branch in block 1, 3x3-3x3 in block 2)."""
    return InceptionNet(num_classes=num_classes, width=width)
