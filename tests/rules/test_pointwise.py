"""graphprune.rules.pointwise: activations, add (residuals), broadcast mul (gates, per-channel scales)."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import build, conv_attrs_agree, exact, group_of, keys, member, x2d


class ActForm(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.h = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.a(x) - 0.1
        if self.form == "module":
            y = self.act(y)
        elif self.form == "functional":
            y = F.relu(y)
        elif self.form == "torch":
            y = torch.relu(y)
        else:
            y = y.relu()
        return self.h(y)


@pytest.mark.parametrize("form", ["module", "functional", "torch", "method"])
def test_activation_forms_pass_channels(form):
    model, x = ActForm(form), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert g.size == 6 and g.prunable
    assert keys(g) == {("a.weight", 0), ("a.bias", 0), ("h.weight", 1)}
    assert member(g, "a.weight", 0).role == "out"
    assert member(g, "h.weight", 1).role == "in"
    assert member(g, "h.weight", 1).indices([4, 1]) == [1, 4]
    out = group_of(dg, "h.weight", 0)
    assert not out.prunable and "output" in out.reason
    slim = exact(model, x, {g.id: [1, 4]}, dg=dg, zero={"h.weight": (1, [1, 4])})
    assert slim.a.out_channels == 4 and slim.h.in_channels == 4
    conv_attrs_agree(slim.a)
    conv_attrs_agree(slim.h)


class AddForm(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.h = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.a(x)
        z = self.b(x)
        if self.form == "operator":
            y = operator.add(y, z)
        elif self.form == "torch":
            y = torch.add(y, z)
        elif self.form == "method":
            y = y.add(z)
        else:
            y += z
        return self.h(y)


@pytest.mark.parametrize("form", ["operator", "torch", "method", "iadd"])
def test_add_forms_couple_both_producers(form):
    model, x = AddForm(form), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert g.size == 6 and g.prunable
    assert keys(g) == {("a.weight", 0), ("a.bias", 0), ("b.weight", 0), ("b.bias", 0), ("h.weight", 1)}
    assert group_of(dg, "b.weight", 0).id == g.id
    assert member(g, "b.weight", 0).indices([0, 5]) == [0, 5]
    slim = exact(model, x, {g.id: [0, 5]}, dg=dg, zero={"h.weight": (1, [0, 5])})
    assert slim.a.weight.shape[0] == slim.b.weight.shape[0] == 4


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(3, 8, 1)
        self.h = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.b(F.relu(self.a(x)))
        return self.h(torch.relu(y + self.c(x)))


def test_residual_add_is_one_group():
    model, x = Residual(), x2d()
    dg = build(model, x)
    res = group_of(dg, "b.weight", 0)
    assert group_of(dg, "c.weight", 0).id == res.id
    assert keys(res) == {("b.weight", 0), ("b.bias", 0), ("c.weight", 0), ("c.bias", 0), ("h.weight", 1)}
    assert res.size == 8 and res.prunable
    inner = group_of(dg, "a.weight", 0)
    assert inner.id != res.id and keys(inner) == {("a.weight", 0), ("a.bias", 0), ("b.weight", 1)}
    # b.weight's input axis belongs to the inner group, its output axis to the residual one
    assert member(inner, "b.weight", 1).role == "in"
    plan = {res.id: [1, 2, 6], inner.id: [0, 7]}
    slim = exact(model, x, plan, dg=dg,
                 zero={"h.weight": (1, [1, 2, 6]), "b.weight": (1, [0, 7])})
    assert tuple(slim.b.weight.shape[:2]) == (5, 6)
    assert slim.c.out_channels == 5


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.r = nn.Conv2d(8, 3, 1)
        self.e = nn.Conv2d(3, 8, 1)
        self.h = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        gate = torch.sigmoid(self.e(F.relu(self.r(y.mean((2, 3), keepdim=True)))))
        return self.h(y * gate)


def test_broadcast_gate_couples_expand_conv_with_gated_channels():
    model, x = SqueezeExcite(), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert group_of(dg, "e.weight", 0).id == g.id
    assert keys(g) == {("a.weight", 0), ("a.bias", 0), ("e.weight", 0), ("e.bias", 0),
                       ("r.weight", 1), ("h.weight", 1)}
    assert g.size == 8 and g.prunable
    squeeze = group_of(dg, "r.weight", 0)
    assert keys(squeeze) == {("r.weight", 0), ("r.bias", 0), ("e.weight", 1)} and squeeze.size == 3
    slim = exact(model, x, {g.id: [1, 6], squeeze.id: [2]}, dg=dg,
                 zero={"h.weight": (1, [1, 6]), "r.weight": (1, [1, 6]), "e.weight": (1, [2])})
    assert slim.e.out_channels == 6 and slim.r.out_channels == 2


class ChannelScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, 6, 1, 1) + 0.5)
        self.h = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.h(F.relu(self.a(x) * self.scale))


def test_per_channel_scale_parameter_is_a_member():
    model, x = ChannelScale(), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert keys(g) == {("a.weight", 0), ("a.bias", 0), ("scale", 1), ("h.weight", 1)}
    assert member(g, "scale", 1).indices([0, 5]) == [0, 5]
    slim = exact(model, x, {g.id: [0, 5]}, dg=dg, zero={"h.weight": (1, [0, 5])})
    assert torch.equal(slim.scale.detach(), model.scale.detach()[:, 1:5])


def test_clamp_with_a_per_channel_bound_slices_the_bound():
    # regression: the group was prunable but every plan failed (size 4 vs 8)
    class ClampBound(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.h = nn.Conv2d(8, 4, 1)
            self.register_buffer("low", torch.linspace(-0.3, 0.3, 8).view(8, 1, 1))

        def forward(self, x):
            return self.h(torch.clamp(self.a(x), min=self.low) + self.a(x).clip(max=self.low))

    model, x = ClampBound(), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert ("low", 0) in keys(g)
    exact(model, x, {g.id: [1, 4]}, dg=dg)


def test_aten_overloads_tagged_pointwise_have_the_elementwise_rule():
    # torch.export graphs hold ATen ops: every one tagged torch.Tag.pointwise (atan, erf, where,
    # comparisons ...) couples its tensors elementwise without a rule of its own
    class Shaped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.h = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            if y.shape[0] > 0:  # shape-dependent Python: the torch.export fallback
                y = torch.atan(y) + torch.erf(y)
            return self.h(y)

    model, x = Shaped().eval(), x2d()
    dg = build(model, x)
    assert any(n.target is torch.ops.aten.atan.default for n in dg.gm.graph.nodes)
    g = group_of(dg, "a.weight", 0)
    assert g.prunable
    exact(model, x, {g.id: [0, 7]}, dg=dg)


def stochastic_depth(x, p=0.2, mode="row", training=False):
    """Stands in for torchvision.ops.stochastic_depth: a function fx keeps whole, named like it."""
    return x


torch.fx.wrap("stochastic_depth")
stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"


def test_stochastic_depth_by_name_passes_channels():
    # functions of packages graphprune does not import are keyed "module:qualname"
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.h = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.h(y + stochastic_depth(y))

    model, x = Net().eval(), x2d()
    dg = build(model, x)
    assert any(n.target is stochastic_depth for n in dg.gm.graph.nodes)
    g = group_of(dg, "a.weight", 0)
    assert g.prunable
    exact(model, x, {g.id: [1, 2]}, dg=dg)
