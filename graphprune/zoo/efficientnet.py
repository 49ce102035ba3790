"""EfficientNet-B0-style network (Tan & Le 2019), scaled down, for 3x64x64 inputs.

Written after torchvision's ``efficientnet.py``: MBConv blocks (1x1 expand,
depthwise kxk, squeeze-excitation with SiLU and a sigmoid gate, linear 1x1
project), SiLU activations, stochastic depth on the residual branch and
``result += input`` when shapes match.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import register
from .blocks import Conv2dNormActivation, SqueezeExcitation
from .mobilenet import make_divisible

# (expand_ratio, kernel, stride, input_channels, out_channels, num_layers) of B0
_MBCONV_SETTING = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)


class StochasticDepth(nn.Module):
    """Row-wise drop path: ``x * mask / keep_prob`` in training, identity in eval."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep_prob = 1.0 - self.p
        size = [x.shape[0]] + [1] * (x.ndim - 1)
        mask = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(keep_prob)
        return x * mask / keep_prob


class MBConv(nn.Module):
    """Inverted residual with SE; the SE squeeze width is a quarter of the block input."""

    def __init__(
        self,
        input_channels: int,
        out_channels: int,
        expand_ratio: float,
        kernel: int,
        stride: int,
        stochastic_depth_prob: float,
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and input_channels == out_channels

        layers: list[nn.Module] = []
        expanded_channels = make_divisible(input_channels * expand_ratio, 8)
        if expanded_channels != input_channels:
            layers.append(
                Conv2dNormActivation(input_channels, expanded_channels, kernel_size=1, activation_layer=nn.SiLU)
            )
        layers.append(
            Conv2dNormActivation(
                expanded_channels,
                expanded_channels,
                kernel_size=kernel,
                stride=stride,
                groups=expanded_channels,
                activation_layer=nn.SiLU,
            )
        )
        squeeze_channels = max(1, input_channels // 4)
        layers.append(SqueezeExcitation(expanded_channels, squeeze_channels, activation=nn.SiLU))
        layers.append(
            Conv2dNormActivation(
                expanded_channels, out_channels, kernel_size=1, activation_layer=None
            )
        )
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)
        self.out_channels = out_channels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += input
        return result


class EfficientNet(nn.Module):
    """Stem 3x3/2, MBConv stages, 1x1 head conv, avgpool, dropout + Linear."""

    def __init__(
        self,
        width_mult: float = 0.5,
        depth_mult: float = 0.5,
        stochastic_depth_prob: float = 0.2,
        dropout: float = 0.2,
        num_classes: int = 10,
    ) -> None:
        super().__init__()

        def adjust_channels(channels: int) -> int:
            return make_divisible(channels * width_mult, 8)

        def adjust_depth(num_layers: int) -> int:
            return int(math.ceil(num_layers * depth_mult))

        settings = [
            (t, k, s, adjust_channels(i), adjust_channels(o), adjust_depth(n))
            for t, k, s, i, o, n in _MBCONV_SETTING
        ]
        layers: list[nn.Module] = [
            Conv2dNormActivation(3, settings[0][3], kernel_size=3, stride=2, activation_layer=nn.SiLU)
        ]

        total_stage_blocks = sum(cfg[-1] for cfg in settings)
        stage_block_id = 0
        for t, k, s, in_ch, out_ch, n in settings:
            stage: list[nn.Module] = []
            for j in range(n):
                # linearly increasing stochastic depth probability
                sd_prob = (
                    stochastic_depth_prob * float(stage_block_id) / total_stage_blocks
                )
                stage.append(
                    MBConv(
                        in_ch if j == 0 else out_ch,
                        out_ch,
                        t,
                        k,
                        s if j == 0 else 1,
                        sd_prob,
                    )
                )
                stage_block_id += 1
            layers.append(nn.Sequential(*stage))

        lastconv_input_channels = settings[-1][4]
        lastconv_output_channels = 4 * lastconv_input_channels
        layers.append(
            Conv2dNormActivation(
                lastconv_input_channels, lastconv_output_channels, kernel_size=1,
                activation_layer=nn.SiLU,
            )
        )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(lastconv_output_channels, num_classes),
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                init_range = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -init_range, init_range)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


@register("mini_efficientnet", (3, 64, 64))
def efficientnet(
    num_classes: int = 10, width_mult: float = 0.5, depth_mult: float = 0.5
) -> EfficientNet:
    """EfficientNet-B0 layout at half width and half depth (10 MBConv blocks)."""
    return EfficientNet(
        width_mult=width_mult, depth_mult=depth_mult, num_classes=num_classes
    )
