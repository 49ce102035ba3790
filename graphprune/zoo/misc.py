"""Miscellaneous zoo models: SE-ResNet, a 1-D conv net and an MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register


class SqueezeExcitation(nn.Module):
    """Channel gate: global pool, 1x1 reduce, ReLU, 1x1 expand, sigmoid, multiply."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        squeezed = max(1, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.expand(self.relu(self.reduce(self.pool(x)))))
        return x * gate


class SEBasicBlock(nn.Module):
    """CIFAR basic block with an SE gate on the residual branch before the add."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int = 1, reduction: int = 4
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.se = SqueezeExcitation(out_ch, reduction)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return F.relu(torch.add(out, self.shortcut(x)))


class SEResNet(nn.Module):
    """CIFAR SE-ResNet: 3 stages of ``(depth - 2) // 6`` SE basic blocks."""

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        width: int = 16,
        reduction: int = 4,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"SE-ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        in_ch = width
        for i, stride in enumerate((1, 2, 2)):
            out_ch = width * 2**i
            for j in range(n):
                blocks.append(
                    SEBasicBlock(in_ch, out_ch, stride if j == 0 else 1, reduction)
                )
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = self.flatten(F.adaptive_avg_pool2d(x, (1, 1)))
        return self.fc(x)


@register("se_resnet20", (3, 32, 32))
def se_resnet(num_classes: int = 10, depth: int = 20, width: int = 16) -> SEResNet:
    """CIFAR SE-ResNet-20 (squeeze-excitation reduction 4)."""
    return SEResNet(depth=depth, num_classes=num_classes, width=width)


class ResBlock1d(nn.Module):
    """Two Conv1d+BN layers with an identity shortcut added in place."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv1d(channels, channels, kernel_size, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm1d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class Conv1dNet(nn.Module):
    """1-D conv net for (channels, length) signals with a residual block."""

    def __init__(
        self, in_channels: int = 4, num_classes: int = 10, width: int = 16
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv1d(in_channels, width, 7, padding=3, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.MaxPool1d(2),
        )
        self.res = ResBlock1d(width)
        self.down = nn.Sequential(
            nn.Conv1d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm1d(2 * width),
            nn.ReLU(),
            nn.MaxPool1d(2),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(2 * width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(self.res(self.stem(x))))


@register("conv1d", (4, 128))
def conv1d(num_classes: int = 10, width: int = 16) -> Conv1dNet:
    """1-D conv net on 4-channel length-128 signals."""
    return Conv1dNet(in_channels=4, num_classes=num_classes, width=width)


class MLP(nn.Module):
    """Three Linear layers with BatchNorm1d after the first and Dropout."""

    def __init__(
        self,
        in_features: int = 64,
        hidden: tuple[int, int] = (128, 64),
        num_classes: int = 10,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        h1, h2 = hidden
        self.fc1 = nn.Linear(in_features, h1)
        self.bn1 = nn.BatchNorm1d(h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.relu(self.bn1(self.fc1(x))))
        x = self.dropout(F.relu(self.fc2(x)))
        return self.fc3(x)


@register("mlp", (64,))
def mlp(num_classes: int = 10, hidden: tuple[int, int] = (128, 64)) -> MLP:
    """MLP 64 -> 128 -> 64 -> ``num_classes`` on flat 64-feature inputs."""
    return MLP(in_features=64, hidden=hidden, num_classes=num_classes)
