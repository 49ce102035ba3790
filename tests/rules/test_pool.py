"""graphprune.rules.pool: pooling, upsampling/interpolation and padding."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import build, exact, group_of, keys, x2d

import graphprune as gp


class PoolResize(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.up = nn.Upsample(scale_factor=2)
        self.mp = nn.MaxPool2d(2)
        self.h = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = F.max_pool2d(self.a(x), 2)
        y = F.avg_pool2d(self.mp(self.up(y)), 2)
        y = F.adaptive_avg_pool2d(y, (3, 3))
        y = F.interpolate(y, scale_factor=2, mode="bilinear")
        y = nn.functional.adaptive_max_pool2d(self.up(y), 5)
        return self.h(y)


def test_pooling_and_interpolation_keep_channels():
    model, x = PoolResize(), x2d(hw=16)
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert keys(g) == {("a.weight", 0), ("a.bias", 0), ("h.weight", 1)}
    assert g.size == 8 and g.prunable
    exact(model, x, {g.id: [0, 3, 4, 7]}, dg=dg, zero={"h.weight": (1, [0, 3, 4, 7])})


def test_padding_a_channel_axis_pins_it():
    class ChannelPad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            y = self.a(x).permute(0, 2, 3, 1)
            return self.b(F.pad(y, (1, 1)).permute(0, 3, 1, 2))

    dg = gp.DependencyGraph.build(ChannelPad(), torch.randn(1, 3, 4, 4))
    assert not any(g.prunable for g in dg.groups)
    assert "pads a channel axis" in dg.describe(width=200)


class ChannelsLastPad(nn.Module):
    """Swin-style: [B, H, W, C] padded on H and W with (0, 0) for C."""

    def __init__(self, crop: bool = False):
        super().__init__()
        self.crop = crop
        self.a, self.b = nn.Linear(3, 8), nn.Linear(7 if crop else 8, 2)

    def forward(self, x):
        y = F.pad(self.a(x), (0, -1) if self.crop else (0, 0, 1, 1, 0, 2))
        return self.b(y)


def test_padding_a_channel_axis_by_nothing_keeps_its_channels():
    model, x = ChannelsLastPad().eval(), torch.randn(2, 4, 4, 3)
    dg = gp.DependencyGraph.build(model, x)
    g = group_of(dg, "a.weight")
    assert g.prunable and g.exact
    exact(model, x, {g.id: [1, 5]}, dg=dg, zero={"b.weight": (1, [1, 5])})


def test_cropping_a_channel_axis_pins_it():
    dg = gp.DependencyGraph.build(ChannelsLastPad(crop=True), torch.randn(2, 4, 4, 3))
    assert not group_of(dg, "a.weight").prunable
    assert "pads a channel axis" in dg.describe(width=200)


class ChannelsLastPool(nn.Module):
    """[B, N, C] tokens: avg_pool1d and interpolate act on the last axis, which carries channels."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a = nn.Linear(4, 8)
        self.h = nn.Linear(4 if how == "pool" else 16, 3)

    def forward(self, x):
        y = self.a(x)
        y = F.avg_pool1d(y, 2) if self.how == "pool" else F.interpolate(y, scale_factor=2)
        return self.h(y)


def test_pooling_or_resampling_a_channel_axis_pins_it():
    # regression: the group used to stay "prunable, exact" and every plan failed (or was wrong)
    for how in ("pool", "interpolate"):
        model, x = ChannelsLastPool(how).eval(), torch.randn(2, 5, 4)
        g = group_of(build(model, x), "a.weight", 0)
        assert not g.prunable and "pools or resamples a channel axis" in g.reason
