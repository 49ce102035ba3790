"""VGG-11 with BatchNorm, reduced width, 2x2 feature map flattened into the head."""

from __future__ import annotations

import torch
from torch import nn

from . import register

# VGG-11 ("A") configuration in units of the base width; the fifth max-pool is
# dropped so a 32x32 input leaves a 2x2 map and each channel feeds 4 features.
_VGG11 = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8)


class VGG(nn.Module):
    """VGG feature extractor followed by a three-layer MLP classifier."""

    def __init__(
        self,
        cfg: tuple[int | str, ...] = _VGG11,
        num_classes: int = 10,
        width: int = 16,
        hidden: int = 128,
        spatial: int = 2,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out_ch = int(v) * width
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, padding=1),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(in_ch * spatial * spatial, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


@register("mini_vgg11_bn", (3, 32, 32))
def vgg11_bn(num_classes: int = 10, width: int = 16, hidden: int = 128) -> VGG:
    """VGG-11-BN with channels ``width * (1, 2, 4, 4, 8, 8, 8, 8)`` on 3x32x32."""
    return VGG(_VGG11, num_classes=num_classes, width=width, hidden=hidden)
