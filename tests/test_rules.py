"""Op rules, one small hand-written model per op family.

Each test checks the group structure the rules build (sizes, prunable flags, which
parameter axes are members, ``Member.indices``) and that a plan on the model is exact:
``gp.verify`` is tiny, and the slim model also matches an *independent* reference, a
copy of the model whose consumer columns of the removed channels were zeroed by hand
(so a wrong member list cannot hide behind ``verify``'s own masking).
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_state, flat_outputs, snapshot

import graphprune as gp

TOL = 1e-5


# --- helpers ----------------------------------------------------------------------------


def _inputs(x):
    return x if isinstance(x, tuple) else (x,)





def build(model, x):
    return gp.DependencyGraph.build(model.eval(), _inputs(x))


def keys(g):
    """(param, dim) pairs a group owns."""
    return {(m.param, m.dim) for m in g.members}


def member(g, param, dim):
    found = [m for m in g.members if m.param == param and m.dim == dim]
    assert len(found) == 1, f"{param}[{dim}] not a member of group {g.id}: {sorted(keys(g))}"
    return found[0]


def group_of(dg, param, dim=0):
    """The one group that owns axis ``dim`` of ``param``."""
    found = [g for g in dg.groups if (param, dim) in keys(g)]
    assert len(found) == 1, f"{param}[{dim}] is in {len(found)} groups"
    return found[0]


def exact(model, x, plan, *, dg=None, zero=None, tol=TOL):
    """Apply ``plan``; check verify, output shapes, an independent reference, no mutation.

    ``zero`` maps a parameter name to ``(dim, indices)``: the hand-derived consumer
    slices that read the removed channels. Zeroing them in a copy of the model must
    make it compute what the slim model computes.
    """
    x = _inputs(x)
    model.eval()
    dg = dg or build(model, x)
    snap = snapshot(model)
    with torch.no_grad():
        before = flat_outputs(model(*x))
    slim = gp.apply(model, dg, plan)
    assert isinstance(slim, torch.fx.GraphModule)
    assert gp.verify(model, x, plan, dg=dg, slim=slim) <= tol
    slim.eval()
    with torch.no_grad():
        got = flat_outputs(slim(*x))
    assert [t.shape for t in got] == [t.shape for t in before]
    if zero is not None:
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for name, (dim, idx) in zero.items():
                ref.get_parameter(name).index_fill_(dim, torch.tensor(idx, dtype=torch.long), 0.0)
            want = flat_outputs(ref(*x))
        for a, b in zip(want, got, strict=True):
            assert (a - b).abs().max().item() <= tol
        # and the removed channels did matter: the unmasked model differs
        assert max((a - b).abs().max().item() for a, b in zip(before, got)) > 1e-3
    assert_state(model, snap)
    with torch.no_grad():
        again = flat_outputs(model(*x))
    assert all(torch.equal(a, b) for a, b in zip(before, again))
    return slim


def conv_attrs_agree(conv):
    w = conv.weight
    if conv.transposed:
        assert w.shape[0] == conv.in_channels and w.shape[1] * conv.groups == conv.out_channels
    else:
        assert w.shape[0] == conv.out_channels and w.shape[1] * conv.groups == conv.in_channels
    if conv.bias is not None:
        assert conv.bias.shape[0] == conv.out_channels


def x2d(c=3, hw=8):
    return torch.randn(2, c, hw, hw)


# --- module / functional / method forms --------------------------------------------------


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


# --- convolutions --------------------------------------------------------------------------


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
    dg = build(model, x)
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


class Linear3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


def test_linear_on_3d_input():
    model, x = Linear3d(), torch.randn(2, 4, 5)
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert g.size == 8 and g.prunable
    assert keys(g) == {("a.weight", 0), ("a.bias", 0), ("b.weight", 1)}
    slim = exact(model, x, {g.id: [0, 3, 4]}, dg=dg, zero={"b.weight": (1, [0, 3, 4])})
    assert (slim.a.out_features, slim.b.in_features) == (5, 5)
    assert tuple(slim.a.weight.shape) == (5, 5) and tuple(slim.b.weight.shape) == (3, 5)


# --- normalisation -------------------------------------------------------------------------


def _randomize_norm(norm):
    with torch.no_grad():
        if norm.weight is not None:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.1)
        if norm.running_mean is not None:
            norm.running_mean.normal_(0, 0.2)
            norm.running_var.uniform_(0.5, 1.5)


class Norms(nn.Module):
    def __init__(self, kind):
        super().__init__()
        if kind == "bn1d":
            self.a, self.h = nn.Linear(3, 8), nn.Linear(8, 2)
            self.n = nn.BatchNorm1d(8)
        elif kind == "bn1d_seq":
            self.a, self.h = nn.Conv1d(3, 8, 3), nn.Conv1d(8, 2, 1)
            self.n = nn.BatchNorm1d(8)
        elif kind == "bn2d":
            self.a, self.h = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1)
            self.n = nn.BatchNorm2d(8)
        elif kind == "bn2d_noaffine":
            self.a, self.h = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1)
            self.n = nn.BatchNorm2d(8, affine=False)
        else:
            self.a, self.h = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1)
            self.n = nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        _randomize_norm(self.n)

    def forward(self, x):
        return self.h(self.n(self.a(x)))


NORM_INPUTS = {"bn1d": (4, 3), "bn1d_seq": (2, 3, 9), "bn2d": (2, 3, 8, 8),
               "bn2d_noaffine": (2, 3, 8, 8), "instancenorm2d": (2, 3, 8, 8)}


@pytest.mark.parametrize("kind", list(NORM_INPUTS))
def test_norm_layers_follow_their_input(kind):
    model, x = Norms(kind), torch.randn(*NORM_INPUTS[kind])
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    stats = {("n.running_mean", 0), ("n.running_var", 0)}
    affine = {("n.weight", 0), ("n.bias", 0)} if kind != "bn2d_noaffine" else set()
    assert keys(g) == {("a.weight", 0), ("a.bias", 0), ("h.weight", 1)} | stats | affine
    assert g.size == 8 and g.prunable
    assert member(g, "n.running_var", 0).indices([2, 6]) == [2, 6]
    slim = exact(model, x, {g.id: [2, 6]}, dg=dg, zero={"h.weight": (1, [2, 6])})
    n = slim.n
    assert n.num_features == 6
    assert n.running_mean.shape == n.running_var.shape == (6,)
    if n.weight is not None:
        assert n.weight.shape == n.bias.shape == (6,)
    keep = [0, 1, 3, 4, 5, 7]
    assert torch.equal(n.running_var, model.n.running_var[keep])


# --- pooling, resizing, gates ----------------------------------------------------------------


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


# --- concatenation, splitting, slicing ---------------------------------------------------


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.h = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.h(torch.cat([self.a(x), self.b(x)], dim=1))


def test_cat_offsets():
    model, x = Concat(), x2d()
    dg = build(model, x)
    ga, gb = group_of(dg, "a.weight", 0), group_of(dg, "b.weight", 0)
    assert ga.id != gb.id and (ga.size, gb.size) == (4, 6)
    assert ga.prunable and gb.prunable
    # the consumer's input axis is split between the two groups at offset 4
    assert member(ga, "h.weight", 1).indices(range(4)) == [0, 1, 2, 3]
    assert member(gb, "h.weight", 1).indices(range(6)) == [4, 5, 6, 7, 8, 9]
    assert member(gb, "h.weight", 1).indices([2]) == [4 + 2]
    assert member(ga, "h.weight", 1).indices([2]) == [2]
    slim = exact(model, x, {gb.id: [2]}, dg=dg, zero={"h.weight": (1, [6])})
    assert slim.h.in_channels == 9
    slim = exact(model, x, {ga.id: [0], gb.id: [2, 5]}, dg=dg, zero={"h.weight": (1, [0, 6, 9])})
    assert slim.h.in_channels == 7


class ConcatAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(3, 10, 3, padding=1)
        self.h = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.h(torch.cat([self.a(x), self.b(x)], dim=1) + self.c(x))


def test_cat_then_add_is_one_group():
    model, x = ConcatAdd(), x2d()
    dg = build(model, x)
    g = group_of(dg, "c.weight", 0)
    assert group_of(dg, "a.weight", 0).id == g.id == group_of(dg, "b.weight", 0).id
    assert g.size == 10 and g.prunable
    assert member(g, "a.weight", 0).indices([2, 5]) == [2]
    assert member(g, "b.weight", 0).indices([2, 5]) == [1]
    assert member(g, "c.weight", 0).indices([2, 5]) == [2, 5]
    assert member(g, "h.weight", 1).indices([2, 5]) == [2, 5]
    slim = exact(model, x, {g.id: [2, 5]}, dg=dg, zero={"h.weight": (1, [2, 5])})
    assert (slim.a.out_channels, slim.b.out_channels, slim.c.out_channels) == (3, 5, 8)


class Splits(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.h1 = nn.Conv2d(4, 2, 1)
        self.h2 = nn.Conv2d(4, 2, 1)
        self.h3 = nn.Conv2d(2, 2, 1)
        self.h4 = nn.Conv2d(3, 2, 1)
        self.h5 = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        y = self.a(x)
        p, _ = torch.split(y, 4, dim=1)
        _, q = y.chunk(2, 1)
        r = y[:, 2:4]
        s = y[:, 5:]
        t, _ = torch.chunk(y, 2, dim=1)
        return self.h1(p) + self.h2(q) + self.h3(r) + self.h4(s) + self.h5(t[:, -3:])


def test_split_chunk_and_slices_rewrite_sizes():
    model, x = Splits(), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert g.size == 8 and g.prunable
    assert member(g, "h1.weight", 1).indices(range(8)) == [0, 1, 2, 3]
    assert member(g, "h2.weight", 1).indices([5]) == [1]
    assert member(g, "h3.weight", 1).indices([3]) == [1]
    assert member(g, "h4.weight", 1).indices([5, 6, 7]) == [0, 1, 2]
    assert member(g, "h5.weight", 1).indices([1, 2, 3]) == [0, 1, 2]
    removed = [0, 3, 6]
    slim = exact(model, x, {g.id: removed}, dg=dg,
                 zero={"h1.weight": (1, [0, 3]), "h2.weight": (1, [2]), "h3.weight": (1, [1]),
                       "h4.weight": (1, [1]), "h5.weight": (1, [2])})
    # surviving channels per piece: split 0..3 -> {1,2}; chunk 4..7 -> {4,5,7};
    # [2:4] -> {2}; [5:] -> {5,7}; chunk 0..3 then [-3:] -> {1,2}
    assert [slim.get_submodule(f"h{i}").in_channels for i in range(1, 6)] == [2, 3, 1, 2, 2]


class Flatten(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.a = nn.Conv2d(3, 4, 1)
        self.flat = nn.Flatten()
        self.l = nn.Linear(4 * 3 * 3, 2)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(self.a(x), 3)
        if self.mode == "torch.flatten":
            y = torch.flatten(y, 1)
        elif self.mode == "view":
            y = y.view(y.size(0), -1)
        elif self.mode == "reshape_literal":
            y = y.reshape(2, 36)
        elif self.mode == "method_flatten":
            y = y.flatten(1)
        else:
            y = self.flat(y)
        return self.l(y)


@pytest.mark.parametrize("mode", ["torch.flatten", "view", "reshape_literal", "method_flatten", "nn.Flatten"])
def test_flatten_into_linear_expands_channel_to_block(mode):
    model, x = Flatten(mode), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert keys(g) == {("a.weight", 0), ("a.bias", 0), ("l.weight", 1)}
    assert g.size == 4 and g.prunable
    m = member(g, "l.weight", 1)
    for c in range(4):
        assert m.indices([c]) == list(range(c * 9, (c + 1) * 9))
    cols = [*range(9, 18), *range(27, 36)]
    slim = exact(model, x, {g.id: [1, 3]}, dg=dg, zero={"l.weight": (1, cols)})
    assert slim.l.in_features == 18 and tuple(slim.l.weight.shape) == (2, 18)


@pytest.mark.parametrize("form", ["nn.Unflatten", "method", "torch.unflatten"])
def test_unflatten_of_linear_features_into_maps(form):
    """A Linear's features unflattened to [C, 2, 2] maps: each map channel owns a block of 4
    features; the slim unflatten (a module or a call) takes the new channel count."""
    class Unflat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.un, self.conv = nn.Linear(8, 24), nn.Unflatten(1, (6, 2, 2)), nn.Conv2d(6, 4, 1)

        def forward(self, x):
            y = self.fc(x)
            if form == "nn.Unflatten":
                y = self.un(y)
            elif form == "method":
                y = y.unflatten(1, (6, 2, 2))
            else:
                y = torch.unflatten(y, 1, (6, 2, 2))
            return self.conv(y).flatten(1)

    model, x = Unflat(), torch.randn(2, 8)
    dg = build(model, x)
    g = group_of(dg, "conv.weight", 1)
    assert keys(g) == {("fc.weight", 0), ("fc.bias", 0), ("conv.weight", 1)} and g.size == 6
    assert member(g, "fc.weight", 0).indices([1]) == [4, 5, 6, 7]
    slim = exact(model, x, {g.id: [1, 4]}, dg=dg, zero={"conv.weight": (1, [1, 4])})
    assert slim.fc.out_features == 16 and slim.conv.in_channels == 4
    if form == "nn.Unflatten":
        assert slim.un.unflattened_size == (4, 2, 2) and model.un.unflattened_size == (6, 2, 2)


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


# --- functional forms with free parameters -----------------------------------------------------


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


# --- what pins channels -----------------------------------------------------------------------


class NoRule(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.h = nn.Conv2d(6, 2, 1)
        self.k = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x)
        if self.op == "cumsum":
            y = torch.cumsum(y, 1)
        else:
            y = torch.fft.fft(y).real
        return self.k(y) + self.h(F.relu(self.b(x)))


@pytest.mark.parametrize("op", ["cumsum", "fft"])
def test_op_without_rule_pins_with_reason_naming_it(op):
    model, x = NoRule(op), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert not g.prunable
    assert "rule" in g.reason and op in g.reason
    # the unrelated branch is still prunable
    other = group_of(dg, "b.weight", 0)
    assert other.prunable and other.size == 6
    with pytest.raises(gp.PlanError, match=op):
        gp.apply(model, dg, {g.id: [0]})
    exact(model, x, {other.id: [3]}, dg=dg, zero={"h.weight": (1, [3])})


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


class PickChannel(nn.Module):
    def __init__(self, index):
        super().__init__()
        self.index = index
        self.a = nn.Conv2d(3, 8, 1)
        self.h = nn.Conv2d(8, 2, 1)
        self.k = nn.Conv2d(1, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.h(y) + self.k(y[:, self.index].unsqueeze(1))


def test_integer_index_on_channel_axis_pins():
    dg = build(PickChannel(7), x2d())
    g = group_of(dg, "a.weight", 0)
    assert not g.prunable and "getitem" in g.reason


def test_negative_integer_index_on_channel_axis_pins():
    model, x = PickChannel(-1), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    # today it is prunable, and gp.apply(model, dg, {g.id: [7]}) raises RewriteError
    assert not g.prunable and "getitem" in g.reason


class Outputs(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 5, 1)
        self.c = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        if self.kind == "tuple":
            return self.b(y), self.c(y)
        if self.kind == "dict":
            return {"b": self.b(y), "c": self.c(y)}
        return self.b(y), y


def test_groups_reaching_outputs_are_unprunable():
    model, x = Outputs("direct"), x2d()
    dg = build(model, x)
    assert [g.prunable for g in dg.groups] == [False, False]
    for g in dg.groups:
        assert "output" in g.reason


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_multiple_outputs_keep_their_shapes(kind):
    model, x = Outputs(kind), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert g.prunable and g.size == 4
    for name in ("b", "c"):
        out = group_of(dg, f"{name}.weight", 0)
        assert not out.prunable and "output" in out.reason
    slim = exact(model, x, {g.id: [0, 2]}, dg=dg,
                 zero={"b.weight": (1, [0, 2]), "c.weight": (1, [0, 2])})
    assert slim.b.in_channels == slim.c.in_channels == 2


# --- tensor constants created in forward --------------------------------------------------------


class InputNormalize(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.h = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = (x - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / 0.25
        return self.h(self.a(x).relu())


def test_tensor_constant_in_forward_does_not_block_apply():
    model, x = InputNormalize(), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert g.prunable
    exact(model, x, {g.id: [1, 6]}, dg=dg, zero={"h.weight": (1, [1, 6])})
