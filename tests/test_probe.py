"""graphprune.probe: ops without a rule are run on random inputs; only channel-wise ones pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import exact, group_of, x2d

import graphprune as gp


class Leaf(nn.Module):
    """A parameter-free module kept whole (as a user's leaf module is)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x):
        if self.how == "elementwise":
            return 3.0 * torch.tanh(x / 3.0) + x.abs().sqrt()
        if self.how == "spatial":  # mixes positions, not channels
            return x - x.mean(dim=(2, 3), keepdim=True)
        if self.how == "mixes":
            return x.flip(1)
        if self.how == "count":  # reads the channel count as a value
            return x / x.shape[1]
        if self.how == "position":  # a per-channel constant made from the width
            return x * torch.arange(x.shape[1], dtype=x.dtype).view(1, -1, 1, 1)
        raise ValueError(self.how)


def _net(how):
    return nn.Sequential(nn.Conv2d(3, 8, 1), Leaf(how), nn.Conv2d(8, 2, 1)).eval()


@pytest.mark.parametrize("how", ["elementwise", "spatial"])
def test_channel_wise_leaf_passes_channels(how):
    model, x = _net(how), x2d()
    dg = build_leaf(model, x)
    g = group_of(dg, "0.weight", 0)
    assert g.prunable and dg.node_info["_1"] == {"probed": True}
    exact(model, x, {g.id: [1, 6]}, dg=dg)


@pytest.mark.parametrize("how", ["mixes", "count", "position"])
def test_leaf_that_is_not_channel_wise_pins(how):
    g = group_of(build_leaf(_net(how), x2d()), "0.weight", 0)
    assert not g.prunable and "no rule for Leaf" in g.reason


def test_leaf_with_parameters_is_not_probed():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.rand(8, 1, 1))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Conv2d(3, 8, 1), Scale(), nn.Conv2d(8, 2, 1)).eval()
    dg = gp.DependencyGraph.build(model, x2d(), leaf_modules=[Scale])
    assert not group_of(dg, "0.weight", 0).prunable


def build_leaf(model, x):
    return gp.DependencyGraph.build(model, x, leaf_modules=[Leaf])
