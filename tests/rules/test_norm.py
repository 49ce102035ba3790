"""graphprune.rules.norm: BatchNorm, InstanceNorm, GroupNorm, LayerNorm (inexact groups, shared modules)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import build, exact, group_of, keys, member, x2d

import graphprune as gp


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


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gn, self.b = nn.Conv2d(3, 12, 3), nn.GroupNorm(4, 12), nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.b(F.relu(self.gn(self.a(x))))


def test_group_norm_loses_whole_groups_exactly():
    model, x = GroupNormNet().eval(), torch.randn(2, 3, 8, 8)
    dg = gp.DependencyGraph.build(model, x)
    group = next(g for g in dg.groups if g.prunable)
    assert group.size == 4 and group.exact                  # 4 normalisation groups of 3
    slim = gp.apply(model, dg, {group.id: [1, 3]})
    gn = next(m for m in slim.modules() if isinstance(m, nn.GroupNorm))
    assert (gn.num_groups, gn.num_channels) == (2, 6)
    assert gp.verify(model, x, {group.id: [1, 3]}, dg=dg, slim=slim) <= 1e-5


class FunctionalGroupNorm(nn.Module):
    def __init__(self, groups: int, affine: bool = True):
        super().__init__()
        self.groups = groups
        self.a, self.b = nn.Conv2d(3, 12, 3), nn.Conv2d(12, 2, 1)
        self.w = nn.Parameter(torch.rand(12) + 0.5) if affine else None
        self.bias = nn.Parameter(torch.randn(12)) if affine else None

    def forward(self, x):
        return self.b(F.group_norm(self.a(x), self.groups, self.w, self.bias))


@pytest.mark.parametrize("affine", [True, False])
def test_functional_group_norm_loses_whole_groups_exactly(affine):
    model, x = FunctionalGroupNorm(4, affine).eval(), torch.randn(2, 3, 8, 8)
    dg = gp.DependencyGraph.build(model, x)
    group = group_of(dg, "a.weight")
    assert group.size == 4 and group.exact and group.prunable
    if affine:
        assert member(group, "w", 0).role == "pass" and member(group, "bias", 0).role == "pass"
    exact(model, x, {group.id: [1, 3]}, dg=dg, zero={"b.weight": (1, [3, 4, 5, 9, 10, 11])})


def test_functional_group_norm_with_one_group_is_inexact():
    model, x = FunctionalGroupNorm(1).eval(), torch.randn(2, 3, 8, 8)
    dg = gp.DependencyGraph.build(model, x)
    group = group_of(dg, "a.weight")
    assert group.size == 12 and not group.exact
    assert "normalises over all channels" in dg.describe(width=200)
    slim = gp.apply(model, dg, {group.id: [0, 5]})
    assert slim(x).shape == (2, 2, 6, 6)


def test_group_norm_in_an_export_graph_loses_whole_groups():
    class Branch(nn.Module):  # a shape branch sends it through torch.export: aten.group_norm
        def __init__(self):
            super().__init__()
            self.a, self.n, self.b = nn.Conv2d(3, 12, 3), nn.GroupNorm(4, 12), nn.Conv2d(12, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(self.n(y) if x.shape[-1] > 4 else y)

    model, x = Branch().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.n.weight.uniform_(0.5, 1.5)
        model.n.bias.normal_(0, 0.1)
    dg = gp.DependencyGraph.build(model, x)
    assert dg.gm.meta.get("graphprune_export")
    group = next(g for g in dg.groups if g.prunable)
    assert group.size == 4 and group.exact
    assert gp.verify(model, x, {group.id: [0, 2]}, dg=dg) <= 1e-5


@pytest.mark.parametrize("per_group", [1, 3])
def test_group_norm_without_affine_parameters_shrinks_its_groups(per_group):
    """Found by fuzzing: GroupNorm(affine=False) has no tensor to slice, so its num_groups was
    never updated and the slim model failed to run (RewriteError for a valid plan)."""
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.GroupNorm(12 // per_group, 12, affine=False),
                          nn.Conv2d(12, 2, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    dg = gp.DependencyGraph.build(model, x)
    group = next(g for g in dg.groups if g.prunable)
    assert group.size == 12 // per_group and group.exact
    plan = {group.id: [0, 2]}
    slim = gp.apply(model, dg, plan)
    gn = next(m for m in slim.modules() if isinstance(m, nn.GroupNorm))
    assert (gn.num_groups, gn.num_channels) == (12 // per_group - 2, 12 - 2 * per_group)
    assert gp.verify(model, x, plan, dg=dg, slim=slim) <= 1e-5


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_with_one_group_loses_single_channels(affine):
    """Found by fuzzing: GroupNorm(1, C) loses channels one by one (an inexact group), but its
    resize kept C channels a group, so num_groups became 0 and the slim model failed to run."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(1, 6, affine=affine), nn.Conv2d(6, 2, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    dg = gp.DependencyGraph.build(model, x)
    group = next(g for g in dg.groups if g.prunable)
    assert group.size == 6 and not group.exact
    plan = {group.id: [1, 4]}
    slim = gp.apply(model, dg, plan)
    gn = next(m for m in slim.modules() if isinstance(m, nn.GroupNorm))
    assert (gn.num_groups, gn.num_channels) == (1, 4)
    result = gp.verify(model, x, plan, dg=dg, slim=slim)
    assert result == 0.0 and not result.exact and str(result).startswith("inexact")


class SharedGroupNorm(nn.Module):
    """One GroupNorm module called on two tensors: a conv's output and ``other``'s."""

    def __init__(self, affine: bool, other: str):
        super().__init__()
        self.other = other
        self.a, self.b, self.head = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(8, 2, 1)
        self.gn = nn.GroupNorm(2, 4, affine=affine)

    def forward(self, x):
        y = self.gn(x if self.other == "input" else self.b(x))
        return self.head(torch.cat([y, self.gn(self.a(x))], 1))


@pytest.mark.parametrize("affine", [True, False])
def test_a_group_norm_called_twice_ties_the_channels_of_both_calls(affine):
    """Both calls share num_groups: without affine parameters to tie them, pruning one
    conv's channels gave the other call the wrong normalisation groups (a wrong slim model)."""
    model, x = SharedGroupNorm(affine, "conv").eval(), torch.randn(2, 4, 6, 6)
    dg = gp.DependencyGraph.build(model, x)
    group = next(g for g in dg.groups if g.prunable)
    assert {"a.weight", "b.weight"} <= set(group.producers)
    plan = {group.id: [1]}
    slim = gp.apply(model, dg, plan)
    assert slim.get_submodule("gn").num_groups == 1
    assert gp.verify(model, x, plan, dg=dg, slim=slim) <= 1e-5


@pytest.mark.parametrize("affine", [True, False])
def test_a_group_norm_also_called_on_the_model_input_pins_its_channels(affine):
    model, x = SharedGroupNorm(affine, "input").eval(), torch.randn(2, 4, 6, 6)
    dg = gp.DependencyGraph.build(model, x)
    assert not any(g.prunable for g in dg.groups)
    assert "also called on a non-channel axis" in dg.describe(width=200)


class SharedLayerNorm(nn.Module):
    """One LayerNorm module normalising the features of two Linear branches."""

    def __init__(self, affine):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(5, 6)
        self.ln = nn.LayerNorm(6, elementwise_affine=affine)
        self.c = nn.Linear(12, 2)

    def forward(self, x):
        return self.c(torch.cat([self.ln(self.a(x)), self.ln(self.b(x))], 1))


@pytest.mark.parametrize("affine", [True, False])
def test_a_layer_norm_called_twice_ties_the_features_of_both_calls(affine):
    """Both calls share normalized_shape: without affine parameters to tie them, pruning
    one branch's features gave the other call a normalized_shape it does not have."""
    model, x = SharedLayerNorm(affine).eval(), torch.randn(3, 5)
    if affine:
        with torch.no_grad():
            model.ln.weight.uniform_(0.5, 1.5), model.ln.bias.uniform_(-0.5, 0.5)
    dg = gp.DependencyGraph.build(model, x)
    group = next(g for g in dg.groups if "a.weight" in g.producers)
    assert set(group.producers) >= {"a.weight", "b.weight"} and not group.exact  # LayerNorm: inexact
    slim = gp.apply(model, dg, {group.id: [1, 4]})
    assert slim.ln.normalized_shape == (4,) and model.ln.normalized_shape == (6,)
    # the slim model normalises the four kept features of each branch
    keep = [0, 2, 3, 5]
    with torch.no_grad():
        w, b = (model.ln.weight[keep], model.ln.bias[keep]) if affine else (None, None)
        parts = [F.layer_norm(layer(x)[:, keep], (4,), w, b) for layer in (model.a, model.b)]
        want = F.linear(torch.cat(parts, 1), model.c.weight[:, keep + [k + 6 for k in keep]], model.c.bias)
        assert (slim(x) - want).abs().max().item() <= 1e-5


def test_layer_norm_makes_the_residual_stream_inexact_and_verify_says_so():
    model, x = gp.zoo.create("mini_vit")
    dg = gp.DependencyGraph.build(model, x)
    stream = next(g for g in dg.groups if g.prunable and not g.exact)
    assert "LayerNorm" in stream.inexact_reason and "inexact" in dg.describe()
    plan = {stream.id: list(range(0, stream.size, 4))}
    result = gp.verify(model, x, plan, dg=dg)
    assert result == 0.0 and not result.exact and "normalisation over pruned channels" in str(result)
    slim = gp.apply(model, dg, plan)
    assert slim(*x).shape == model(*x).shape


class WeightStandardised(nn.Module):
    """timm's ScaledStdConv2d: F.batch_norm over the weight reshaped to [1, out, in * k * k]."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        w = F.batch_norm(self.b.weight.reshape(1, 4, -1), None, None, training=True, momentum=0.0,
                         eps=1e-5).reshape_as(self.b.weight)
        return F.conv2d(F.relu(self.a(x)), w, self.b.bias)


def test_statistics_over_a_channel_axis_make_the_group_inexact():
    # regression: the group claimed to be exact and the slim model differed by 4.75
    model, x = WeightStandardised().eval(), x2d()
    g = group_of(build(model, x), "a.weight", 0)
    assert g.prunable and not g.exact and "takes statistics over channels" in g.inexact_reason


def test_instance_norm_without_tensors_takes_the_slim_width():
    # regression: num_features stayed 8 and every slim forward warned
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.InstanceNorm2d(8), nn.Conv2d(8, 4, 1))
    x = x2d()
    g = group_of(build(model, x), "0.weight", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slim = exact(model, x, {g.id: [1, 2, 6]})
    assert slim.get_submodule("1").num_features == 5
