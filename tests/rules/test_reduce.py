"""graphprune.rules.reduce: sum and mean over spatial axes and over the channel axis."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import build, exact, group_of, keys, member, x2d


class SpatialMean(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.a = nn.Conv2d(3, 5, 3)
        self.l = nn.Linear(5, 2)

    def forward(self, x):
        y = self.a(x)
        if self.form == "mean":
            y = y.mean((2, 3))
        elif self.form == "torch.mean":
            y = torch.mean(y, dim=[-2, -1])
        else:
            y = y.sum(dim=(2, 3))
        return self.l(y)


@pytest.mark.parametrize("form", ["mean", "torch.mean", "sum"])
def test_spatial_reduction_keeps_channels(form):
    model, x = SpatialMean(form), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert keys(g) == {("a.weight", 0), ("a.bias", 0), ("l.weight", 1)}
    assert g.size == 5 and g.prunable
    assert member(g, "l.weight", 1).indices([1, 4]) == [1, 4]
    slim = exact(model, x, {g.id: [1, 4]}, dg=dg, zero={"l.weight": (1, [1, 4])})
    assert slim.l.in_features == 3


class ChannelReduce(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.h = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x)
        r = y.sum(1, keepdim=True) if self.op == "sum" else y.mean(1, keepdim=True)
        return self.h(self.b(x)) + r


def test_sum_over_channels_pins_or_is_exact():
    model, x = ChannelReduce("sum"), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert group_of(dg, "b.weight", 0).prunable
    if not g.prunable:
        assert "sum" in g.reason
        return
    # a removed channel adds nothing to the sum: zeroing its producer row is the reference
    exact(model, x, {g.id: [1, 2]}, dg=dg, zero={"a.weight": (0, [1, 2]), "a.bias": (0, [1, 2])})


def test_mean_over_channels_pins_or_is_marked_inexact():
    dg = build(ChannelReduce("mean"), x2d())
    g = group_of(dg, "a.weight", 0)
    if g.prunable:
        assert getattr(g, "exact", True) is False
        assert "mean" in g.inexact_reason
    else:
        assert "mean" in g.reason
    assert group_of(dg, "b.weight", 0).prunable
