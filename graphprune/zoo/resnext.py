"""A CIFAR-style ResNeXt (Xie et al. 2017) for 3x32x32 inputs.

Bottleneck blocks follow torchvision's ``Bottleneck`` with ``groups`` (the
cardinality): 1x1 reduce to ``D = cardinality * group_width``, grouped 3x3,
1x1 expand to ``2 * D`` (template C of the paper), projection shortcut
(``downsample``) at the first block of every stage, residual ``out += identity``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import register


class ResNeXtBottleneck(nn.Module):
    """1x1 -> grouped 3x3 (stride) -> 1x1, BN after each, ReLU after the add."""

    expansion = 2

    def __init__(
        self,
        inplanes: int,
        cardinality: int,
        group_width: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        width = cardinality * group_width
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(
            width,
            width,
            kernel_size=3,
            stride=stride,
            padding=1,
            groups=cardinality,
            bias=False,
        )
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class ResNeXt(nn.Module):
    """3x3 stem, three stages (strides 1, 2, 2; group width doubling), pool, fc."""

    def __init__(
        self,
        layers: tuple[int, int, int] = (2, 2, 2),
        cardinality: int = 8,
        width_per_group: int = 4,
        stem_width: int = 32,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.cardinality = cardinality
        self.inplanes = stem_width
        self.conv1 = nn.Conv2d(
            3, stem_width, kernel_size=3, stride=1, padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(width_per_group, layers[0], stride=1)
        self.layer2 = self._make_layer(width_per_group * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width_per_group * 4, layers[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, group_width: int, blocks: int, stride: int) -> nn.Sequential:
        out_ch = self.cardinality * group_width * ResNeXtBottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_ch:
            downsample = nn.Sequential(
                nn.Conv2d(
                    self.inplanes, out_ch, kernel_size=1, stride=stride, bias=False
                ),
                nn.BatchNorm2d(out_ch),
            )
        layers = [
            ResNeXtBottleneck(
                self.inplanes, self.cardinality, group_width, stride, downsample
            )
        ]
        self.inplanes = out_ch
        for _ in range(1, blocks):
            layers.append(
                ResNeXtBottleneck(self.inplanes, self.cardinality, group_width)
            )
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


@register("mini_resnext", (3, 32, 32))
def resnext(
    num_classes: int = 10, cardinality: int = 8, width_per_group: int = 4
) -> ResNeXt:
    """ResNeXt-20 (8x4d): 2 blocks per stage, widths D = 32/64/128, outputs 64/128/256."""
    return ResNeXt(
        layers=(2, 2, 2),
        cardinality=cardinality,
        width_per_group=width_per_group,
        num_classes=num_classes,
    )
