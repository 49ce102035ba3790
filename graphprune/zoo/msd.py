"""Mixed-Scale Dense network (Pelt & Sethian, PNAS 2018)."""

from __future__ import annotations

import torch
from torch import nn

from . import register


class MSDNet(nn.Module):
    """Densely connected dilated 3x3 convs, each seeing the input and all earlier layers.

    Layer ``i`` uses dilation ``(i % max_dilation) + 1`` (padding equal to the
    dilation, so the spatial size is preserved) and produces ``width`` channels;
    a final 1x1 conv maps the input and every layer output to ``num_classes``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        depth: int = 10,
        width: int = 1,
        max_dilation: int = 10,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for i in range(depth):
            dilation = (i % max_dilation) + 1
            conv = nn.Conv2d(
                in_channels + i * width, width, 3, padding=dilation, dilation=dilation
            )
            norm: list[nn.Module] = [nn.BatchNorm2d(width)] if batch_norm else []
            self.layers.append(nn.Sequential(conv, *norm, nn.ReLU()))
        self.final = nn.Conv2d(in_channels + depth * width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return self.final(torch.cat(features, dim=1))


@register("msd", (1, 32, 32))
def msd(
    num_classes: int = 2, depth: int = 10, width: int = 1, batch_norm: bool = False
) -> MSDNet:
    """MS-D network of ``depth`` width-1 layers with dilations 1..10 on 1x32x32."""
    return MSDNet(
        in_channels=1,
        num_classes=num_classes,
        depth=depth,
        width=width,
        batch_norm=batch_norm,
    )
