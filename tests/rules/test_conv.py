"""graphprune.rules.conv: Conv1d/2d/3d, depthwise, grouped, transposed and functional convolutions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TOL, build, conv_attrs_agree, exact, group_of, keys, member, x2d

import graphprune as gp


class ConvNd(nn.Module):
    def __init__(self, nd):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
        self.a = conv(3, 6, 3, padding=1)
        self.h = conv(6, 2, 1)

    def forward(self, x):
        return self.h(torch.tanh(self.a(x)))


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_nd(nd):
    model = ConvNd(nd)
    x = torch.randn(2, 3, *([5] * nd))
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert g.size == 6 and g.prunable
    assert keys(g) == {("a.weight", 0), ("a.bias", 0), ("h.weight", 1)}
    # the model input's channels are not a group
    assert all(("a.weight", 1) not in keys(gr) for gr in dg.groups)
    slim = exact(model, x, {g.id: [0, 2, 3]}, dg=dg, zero={"h.weight": (1, [0, 2, 3])})
    assert slim.a.out_channels == 3 and slim.h.in_channels == 3
    conv_attrs_agree(slim.a)
    conv_attrs_agree(slim.h)


class Depthwise(nn.Module):
    def __init__(self, mult):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.d = nn.Conv2d(8, 8 * mult, 3, padding=1, groups=8)
        self.h = nn.Conv2d(8 * mult, 2, 1)

    def forward(self, x):
        return self.h(self.d(self.a(x)).relu())


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_couples_input_and_output(mult):
    model, x = Depthwise(mult), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert group_of(dg, "d.weight", 0).id == g.id
    assert g.size == 8 and g.prunable
    assert keys(g) == {("a.weight", 0), ("a.bias", 0), ("d.weight", 0), ("d.bias", 0), ("h.weight", 1)}
    # depthwise weights have one input per group: axis 1 is never a member
    assert all(("d.weight", 1) not in keys(gr) for gr in dg.groups)
    assert member(g, "a.weight", 0).indices([3]) == [3]
    assert member(g, "d.weight", 0).indices([3]) == list(range(3 * mult, 4 * mult))
    assert member(g, "h.weight", 1).indices([3, 5]) == [
        *range(3 * mult, 4 * mult), *range(5 * mult, 6 * mult)]
    removed = [3, 5]
    cols = [c * mult + j for c in removed for j in range(mult)]
    slim = exact(model, x, {g.id: removed}, dg=dg, zero={"h.weight": (1, cols)})
    assert slim.d.groups == 6 and slim.d.in_channels == 6 and slim.d.out_channels == 6 * mult
    conv_attrs_agree(slim.d)


class Grouped(nn.Module):
    def __init__(self, groups, cout):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.d = nn.Conv2d(8, cout, 3, padding=1, groups=groups)
        self.h = nn.Conv2d(cout, 2, 1)

    def forward(self, x):
        return self.h(self.d(self.a(x)).relu())


@pytest.mark.parametrize(("groups", "cout", "removed"), [(2, 4, [0]), (4, 12, [1, 2])])
def test_grouped_conv_removes_whole_conv_groups(groups, cout, removed):
    model, x = Grouped(groups, cout), x2d()
    dg = gp.DependencyGraph.build(model.eval(), (x,), grouped="groups")
    g = group_of(dg, "a.weight", 0)
    assert group_of(dg, "d.weight", 0).id == g.id
    assert g.size == groups and g.prunable  # one channel per conv group
    ipg, opg = 8 // groups, cout // groups
    assert member(g, "a.weight", 0).indices([1]) == list(range(ipg, 2 * ipg))
    assert member(g, "d.weight", 0).indices([1]) == list(range(opg, 2 * opg))
    assert member(g, "h.weight", 1).indices([1]) == list(range(opg, 2 * opg))
    cols = [k * opg + j for k in removed for j in range(opg)]
    slim = exact(model, x, {g.id: removed}, dg=dg, zero={"h.weight": (1, cols)})
    left = groups - len(removed)
    assert slim.d.groups == left
    assert slim.d.in_channels == left * ipg and slim.d.out_channels == left * opg
    assert tuple(slim.d.weight.shape[:2]) == (left * opg, ipg)
    conv_attrs_agree(slim.d)


def test_grouped_conv_loses_the_same_positions_in_every_group_by_default():
    model, x = Grouped(2, 4), x2d()  # a: 8 channels -> d: 2 groups of 4 in, 2 out -> h
    dg = build(model, x)
    a, d = group_of(dg, "a.weight", 0), group_of(dg, "d.weight", 0)
    assert a.id != d.id and a.prunable and d.prunable
    assert a.size == 4 and d.size == 2  # positions within a conv group
    assert member(a, "a.weight", 0).indices([1]) == [1, 5]  # position 1 of both groups
    assert member(a, "d.weight", 1).indices([1]) == [1]
    assert member(d, "d.weight", 0).indices([0]) == [0, 2]
    assert member(d, "h.weight", 1).indices([0]) == [0, 2]
    slim = exact(model, x, {a.id: [1], d.id: [0]}, dg=dg, zero={"d.weight": (1, [1]), "h.weight": (1, [0, 2])})
    assert slim.d.groups == 2 and slim.d.in_channels == 6 and slim.d.out_channels == 2
    assert tuple(slim.d.weight.shape[:2]) == (2, 3)
    conv_attrs_agree(slim.d)


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.t = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.h = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.h(self.t(self.a(x)).relu())


def test_conv_transpose():
    model, x = Transposed(), x2d()
    dg = build(model, x)
    gin, gout = group_of(dg, "a.weight", 0), group_of(dg, "t.weight", 1)
    assert gin.id != gout.id and gin.size == 8 and gout.size == 6
    assert gin.prunable and gout.prunable
    assert keys(gin) == {("a.weight", 0), ("a.bias", 0), ("t.weight", 0)}
    assert keys(gout) == {("t.weight", 1), ("t.bias", 0), ("h.weight", 1)}
    assert member(gin, "t.weight", 0).role == "in"
    assert member(gout, "t.weight", 1).role == "out"
    slim = exact(model, x, {gin.id: [0, 3], gout.id: [1, 2]}, dg=dg,
                 zero={"t.weight": (0, [0, 3]), "h.weight": (1, [1, 2])})
    assert slim.t.in_channels == 6 and slim.t.out_channels == 4
    assert tuple(slim.t.weight.shape[:2]) == (6, 4)
    conv_attrs_agree(slim.t)


class FreeParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.cb = nn.Parameter(torch.randn(8) * 0.1)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.lw = nn.Parameter(torch.randn(5, 8) * 0.3)
        self.lb = nn.Parameter(torch.randn(5) * 0.1)
        self.h = nn.Linear(5, 2)

    def forward(self, x):
        y = F.conv2d(x, self.w, self.cb, padding=1) * self.scale
        y = y.mean((2, 3))
        return self.h(F.relu(F.linear(y, self.lw, self.lb)))


class ModuleTwin(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.l = nn.Linear(8, 5)
        self.h = nn.Linear(5, 2)

    def forward(self, x):
        return self.h(F.relu(self.l(self.c(x).mean((2, 3)))))


def test_functional_conv_and_linear_with_free_parameters():
    model, x = FreeParams(), x2d()
    dg = build(model, x)
    gc = group_of(dg, "w", 0)
    gl = group_of(dg, "lw", 0)
    assert keys(gc) == {("w", 0), ("cb", 0), ("scale", 1), ("lw", 1)}
    assert keys(gl) == {("lw", 0), ("lb", 0), ("h.weight", 1)}
    assert member(gc, "w", 0).role == "out" and member(gc, "lw", 1).role == "in"
    assert member(gl, "lw", 0).role == "out" and member(gl, "h.weight", 1).role == "in"
    assert member(gc, "scale", 1).indices([2, 7]) == [2, 7]
    # the same structure as the module form
    twin = build(ModuleTwin(), x)
    assert [(g.size, g.prunable) for g in dg.groups] == [(g.size, g.prunable) for g in twin.groups]
    slim = exact(model, x, {gc.id: [2, 7], gl.id: [0]}, dg=dg,
                 zero={"lw": (1, [2, 7]), "h.weight": (1, [0])})
    assert tuple(slim.w.shape) == (6, 3, 3, 3) and tuple(slim.scale.shape) == (1, 6, 1, 1)
    assert tuple(slim.lw.shape) == (4, 6) and tuple(slim.lb.shape) == (4,)
    assert slim.h.in_features == 4


class DepthwiseFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.w = nn.Parameter(torch.randn(8, 1, 3, 3))
        self.h = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.h(F.conv2d(self.a(x).relu(), self.w, padding=1, groups=8))


def test_functional_depthwise_conv_rewrites_groups_argument():
    model, x = DepthwiseFunctional(), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert group_of(dg, "w", 0).id == g.id and g.size == 8 and g.prunable
    slim = exact(model, x, {g.id: [1, 2]}, dg=dg, zero={"h.weight": (1, [1, 2])})
    conv = next(n for n in slim.graph.nodes if n.op == "call_function" and "conv2d" in str(n.target))
    assert (conv.kwargs.get("groups") if "groups" in conv.kwargs else conv.args[6]) == 6


class ComputedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.w = nn.Parameter(torch.randn(4, 8, 3, 3))
        self.m = nn.Parameter(torch.rand(4, 8, 1, 1) + 0.5)
        self.h = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.h(F.conv2d(self.a(x).relu(), self.w * self.m, padding=1))


def test_computed_functional_weight_is_exact_or_pinned():
    model, x = ComputedWeight(), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    if not g.prunable:  # pinning with a reason is an acceptable answer too
        assert g.reason
        return
    plan = {g.id: [1, 2]}
    slim = exact(model, x, plan, dg=dg, zero={"w": (1, [1, 2])})
    assert tuple(slim.w.shape) == (4, 6, 3, 3) and tuple(slim.m.shape) == (4, 6, 1, 1)


def test_computed_functional_weight_input_axis_is_a_consumer():
    model, x = ComputedWeight(), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert g.prunable
    plan = {g.id: [1, 2]}
    slim = gp.apply(model, dg, plan)
    with torch.no_grad():
        diff = (gp.masked_model(model, dg, plan).eval()(x) - slim(x)).abs().max().item()
    assert member(g, "w", 1).role == "in"
    assert diff <= TOL


@pytest.mark.parametrize("mode", ["groups", "channels"])
def test_grouped_convs_keep_their_structure(mode):
    model, x = gp.zoo.create("mini_resnext")
    dg = gp.DependencyGraph.build(model, x, grouped=mode)
    rng = np.random.default_rng(0)
    plan = {g.id: rng.choice(g.size, g.size // 2, replace=False).tolist()
            for g in dg.groups if g.prunable and g.size > 1}
    slim = gp.apply(model, dg, plan)
    assert gp.verify(model, x, plan, dg=dg, slim=slim) <= 1e-4
    original = {n: m.groups for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    pruned = {n: m for n, m in slim.named_modules() if n in original}
    for name, conv in pruned.items():
        assert conv.weight.shape[1] * conv.groups == conv.in_channels
        if mode == "channels":
            assert conv.groups == original[name]       # same groups, fewer channels each
        else:
            assert conv.weight.shape[1] == model.get_submodule(name).weight.shape[1]


class GroupedTwice(nn.Module):
    """One grouped conv module called on channels and again on the model input."""

    def __init__(self, order):
        super().__init__()
        self.order = order
        self.a = nn.Conv2d(4, 4, 1)
        self.g = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.h = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.g(self.a(x)) + self.g(x) if self.order == "channels first" else self.g(x) + self.g(self.a(x))
        return self.h(y)


@pytest.mark.parametrize("order", ["channels first", "input first"])
def test_grouped_conv_called_on_channels_and_on_an_input_keeps_its_columns(order):
    # adversary's report, reproduced by the hazard fuzzer: with grouped="channels" the call on
    # the model input left the weight's input axis to the other call, which pruned it, and the
    # slim conv failed on the unpruned input (RewriteError "Given groups=2, weight of size
    # [6, 1, 3, 3], expected input[1, 4, 6, 6] to have 2 channels")
    torch.manual_seed(0)
    model, x = GroupedTwice(order), x2d(4, 6)
    dg = gp.DependencyGraph.build(model.eval(), x, grouped="channels")
    assert not group_of(dg, "a.weight", 0).prunable  # g reads a's channels and x through the same columns
    g = group_of(dg, "g.weight", 0)
    assert g.prunable and g.size == 3  # output positions within each of the two conv groups
    slim = exact(model, x, {g.id: [1]}, dg=dg)
    assert slim.g.groups == 2 and slim.g.in_channels == 4 and slim.g.out_channels == 4
    conv_attrs_agree(slim.g)
