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


class ReduceAll(nn.Module):
    """A reduction over every axis, channels included, as ``dim=()`` or with no dim at all."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x) - 5.0  # mostly negative: a removed (zeroed) channel would become the max
        if self.form == "amax(dim=())":
            r = torch.amax(y, dim=())
        elif self.form == "mean(dim=())":
            r = y.mean(dim=())
        elif self.form == "sum(dim=[])":
            r = y.sum(dim=[])
        elif self.form == "amax()":
            r = y.amax()
        else:
            r = y.mean()
        return self.b(y) + r


@pytest.mark.parametrize("form", ["amax(dim=())", "mean(dim=())", "sum(dim=[])", "amax()", "mean()"])
def test_reduction_over_every_axis_covers_the_channels(form):
    # found by the hazard fuzzer's review of the reduction rule: dim=() (every axis, as torch
    # reads it) was taken for no axis, so a max or mean over the channels stayed "exact" and
    # the slim model differed from the masked original (verify 4.2 for amax, 2.5 for mean)
    model, x = ReduceAll(form), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert g.prunable and g.exact == form.startswith("sum")
    if g.exact:
        exact(model, x, {g.id: [0, 2]}, dg=dg)
    else:
        assert "reduces over channels" in g.inexact_reason


class Exported(nn.Module):
    """``torch.export`` (the fallback for shape-dependent Python) writes ``y.square().sum()``
    and ``y.mean()`` as ``aten.square.default``, ``aten.sum.default``, ``aten.mean.default``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        if x.shape[0] > 0:  # symbolic tracing cannot follow this
            y = self.a(x)
            return self.b(y) + y.square().sum() + y.mean()
        return x


def test_full_reductions_of_the_export_graph_have_rules():
    # found by the hazard fuzzer (dead ends summed into the output through export): those ATen
    # forms had no rule, so the channels feeding them were pinned on the export path only
    model, x = Exported(), x2d()
    dg = build(model, x)
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in dg.gm.graph.nodes)
    g = group_of(dg, "a.weight", 0)
    assert g.prunable and not g.exact and "reduces over channels" in g.inexact_reason  # the mean
