"""Small U-Net (Ronneberger et al. 2015) for 1x64x64 segmentation inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register


class DoubleConv(nn.Sequential):
    """(3x3 conv, BN, ReLU) twice."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """Three-level U-Net with a bottleneck; output has the input's spatial size.

    The three up-sampling steps use, from deepest to shallowest, a stride-2
    ``nn.ConvTranspose2d``, ``F.interpolate`` (bilinear) and ``nn.Upsample``
    (bilinear). Skips are joined by ``torch.cat([skip, up], dim=1)``.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 2, base: int = 8
    ) -> None:
        super().__init__()
        c1, c2, c3, c4 = base, 2 * base, 4 * base, 8 * base
        self.enc1 = DoubleConv(in_channels, c1)
        self.enc2 = DoubleConv(c1, c2)
        self.enc3 = DoubleConv(c2, c3)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(c3, c4)
        self.up3 = nn.ConvTranspose2d(c4, c3, 2, stride=2)
        self.dec3 = DoubleConv(c3 + c3, c3)
        self.dec2 = DoubleConv(c2 + c3, c2)
        self.up1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec1 = DoubleConv(c1 + c2, c1)
        self.head = nn.Conv2d(c1, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(self.pool(s1))
        s3 = self.enc3(self.pool(s2))
        x = self.bottleneck(self.pool(s3))
        x = self.dec3(torch.cat([s3, self.up3(x)], dim=1))
        up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.dec2(torch.cat([s2, up], dim=1))
        x = self.dec1(torch.cat([s1, self.up1(x)], dim=1))
        return self.head(x)


@register("mini_unet", (1, 64, 64))
def unet(num_classes: int = 2, base: int = 8) -> UNet:
    """U-Net, depth 3, base width 8, 1 input channel, ``num_classes`` output maps."""
    return UNet(in_channels=1, num_classes=num_classes, base=base)
