"""MobileNetV3-Small (Howard et al. 2019) with a width multiplier, for 3x64x64 inputs.

Written after torchvision's ``mobilenetv3.py``: inverted residuals with optional
1x1 expansion, depthwise kxk, squeeze-excitation (ReLU, hardsigmoid gate) after
the depthwise activation, linear 1x1 projection; ReLU or Hardswish per block;
classifier Linear -> Hardswish -> Dropout -> Linear.
"""

from __future__ import annotations

import torch
from torch import nn

from . import register
from .blocks import Conv2dNormActivation as _Conv2dNormActivation
from .blocks import SqueezeExcitation
from .mobilenet import make_divisible

# (input_channels, kernel, expanded_channels, out_channels, use_se, activation, stride)
_SMALL_SETTING = (
    (16, 3, 16, 16, True, "RE", 2),
    (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1),
    (48, 5, 144, 48, True, "HS", 1),
    (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1),
    (96, 5, 576, 96, True, "HS", 1),
)


def Conv2dNormActivation(*args, **kwargs) -> nn.Sequential:  # noqa: N802  (a layer, as in torchvision)
    """The shared conv-BN-activation block with MobileNetV3's BatchNorm settings."""
    return _Conv2dNormActivation(*args, eps=0.001, momentum=0.01, **kwargs)


class InvertedResidual(nn.Module):
    """Expand (if needed), depthwise, SE (optional), project; residual if shapes match."""

    def __init__(
        self,
        input_channels: int,
        kernel: int,
        expanded_channels: int,
        out_channels: int,
        use_se: bool,
        use_hs: bool,
        stride: int,
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and input_channels == out_channels

        layers: list[nn.Module] = []
        activation_layer = nn.Hardswish if use_hs else nn.ReLU

        # expand
        if expanded_channels != input_channels:
            layers.append(
                Conv2dNormActivation(
                    input_channels,
                    expanded_channels,
                    kernel_size=1,
                    activation_layer=activation_layer,
                )
            )

        # depthwise
        layers.append(
            Conv2dNormActivation(
                expanded_channels,
                expanded_channels,
                kernel_size=kernel,
                stride=stride,
                groups=expanded_channels,
                activation_layer=activation_layer,
            )
        )
        if use_se:
            squeeze_channels = make_divisible(expanded_channels // 4, 8)
            layers.append(SqueezeExcitation(expanded_channels, squeeze_channels, scale_activation=nn.Hardsigmoid))

        # project
        layers.append(
            Conv2dNormActivation(
                expanded_channels, out_channels, kernel_size=1, activation_layer=None
            )
        )

        self.block = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3(nn.Module):
    """Hardswish stem 3x3/2, inverted residuals, 1x1 conv (6x), pool, MLP classifier."""

    def __init__(
        self,
        width_mult: float = 0.5,
        last_channel: int = 1024,
        dropout: float = 0.2,
        num_classes: int = 10,
    ) -> None:
        super().__init__()

        def adjust_channels(channels: int) -> int:
            return make_divisible(channels * width_mult, 8)

        layers: list[nn.Module] = []

        # building first layer
        firstconv_output_channels = adjust_channels(_SMALL_SETTING[0][0])
        layers.append(
            Conv2dNormActivation(
                3,
                firstconv_output_channels,
                kernel_size=3,
                stride=2,
                activation_layer=nn.Hardswish,
            )
        )

        # building inverted residual blocks
        for in_ch, k, exp, out_ch, use_se, act, stride in _SMALL_SETTING:
            layers.append(
                InvertedResidual(
                    adjust_channels(in_ch),
                    k,
                    adjust_channels(exp),
                    adjust_channels(out_ch),
                    use_se,
                    act == "HS",
                    stride,
                )
            )

        # building last several layers
        lastconv_input_channels = adjust_channels(_SMALL_SETTING[-1][3])
        lastconv_output_channels = 6 * lastconv_input_channels
        layers.append(
            Conv2dNormActivation(
                lastconv_input_channels,
                lastconv_output_channels,
                kernel_size=1,
                activation_layer=nn.Hardswish,
            )
        )

        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last_channel = adjust_channels(last_channel)
        self.classifier = nn.Sequential(
            nn.Linear(lastconv_output_channels, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
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
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


@register("mini_mobilenet_v3", (3, 64, 64))
def mobilenet_v3(num_classes: int = 10, width_mult: float = 0.5) -> MobileNetV3:
    """MobileNetV3-Small with channels scaled by ``width_mult`` (multiples of 8)."""
    return MobileNetV3(width_mult=width_mult, num_classes=num_classes)
