"""Small DenseNet-BC (Huang et al. 2017) for 3x32x32 inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register


class DenseLayer(nn.Module):
    """Pre-activation bottleneck layer: BN-ReLU-1x1 conv, BN-ReLU-3x3 conv."""

    def __init__(self, in_ch: int, growth_rate: int, bn_size: int = 4) -> None:
        super().__init__()
        mid = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, growth_rate, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(torch.relu(self.norm1(x)))
        return self.conv2(torch.relu(self.norm2(x)))


class DenseBlock(nn.Module):
    """Each layer sees the concatenation of the block input and all earlier outputs."""

    def __init__(
        self, num_layers: int, in_ch: int, growth_rate: int, bn_size: int
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_ch + i * growth_rate, growth_rate, bn_size)
            for i in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv (compression) followed by 2x2 average pooling."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_ch),
            nn.ReLU(),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.AvgPool2d(2, 2),
        )


class DenseNet(nn.Module):
    """DenseNet-BC: 3x3 stem, dense blocks separated by transitions, linear head."""

    def __init__(
        self,
        growth_rate: int = 8,
        block_config: tuple[int, ...] = (4, 4, 4),
        bn_size: int = 4,
        compression: float = 0.5,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        ch = 2 * growth_rate
        self.conv0 = nn.Conv2d(3, ch, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        for i, num_layers in enumerate(block_config):
            blocks.append(DenseBlock(num_layers, ch, growth_rate, bn_size))
            ch += num_layers * growth_rate
            if i != len(block_config) - 1:
                out_ch = int(ch * compression)
                blocks.append(Transition(ch, out_ch))
                ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.norm_final = nn.BatchNorm2d(ch)
        self.classifier = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv0(x))
        x = torch.relu(self.norm_final(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


@register("mini_densenet", (3, 32, 32))
def densenet(
    num_classes: int = 10,
    growth_rate: int = 8,
    block_config: tuple[int, ...] = (4, 4, 4),
) -> DenseNet:
    """DenseNet-BC, growth rate 8, three dense blocks of 4 bottleneck layers."""
    return DenseNet(growth_rate, block_config, num_classes=num_classes)
