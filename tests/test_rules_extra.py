"""Rules no zoo model exercises: each checked by the masked-vs-slim verify on a small model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp


class SDPA(nn.Module):
    """q, k, v from Linears, split into heads, F.scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(16, 24)
        self.out = nn.Linear(24, 16)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, 8).transpose(1, 2)
        k = self.k(x).view(b, n, 4, 8).transpose(1, 2)
        v = self.v(x).view(b, n, 4, 6).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, 24))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gn, self.b = nn.Conv2d(3, 12, 3), nn.GroupNorm(4, 12), nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.b(F.relu(self.gn(self.a(x))))


class PixelShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(4, 2, 1)
        self.c, self.d = nn.Conv2d(2, 5, 1), nn.Conv2d(20, 3, 1)

    def forward(self, x):
        up = self.b(F.pixel_shuffle(self.a(x), 2))        # 16 -> 4 channels, 2x spatial
        return self.d(F.pixel_unshuffle(self.c(up), 2))    # 5 -> 20 channels, back to 1x


class PadMatmulNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.w = nn.Parameter(torch.randn(8, 6))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        y = F.pad(F.relu(self.a(x)), (1, 1, 1, 1)).mean((2, 3))   # spatial padding only
        return self.head(y @ self.w)


@pytest.mark.parametrize("factor, sizes", [("largest", [8, 6]), ("heads", [4])])
def test_scaled_dot_product_attention(factor, sizes):
    model, x = SDPA().eval(), torch.randn(2, 5, 16)
    dg = gp.DependencyGraph.build(model, x, factor=factor)
    groups = [g for g in dg.groups if g.prunable]
    assert sorted(g.size for g in groups) == sorted(sizes)
    plan = {g.id: [0, 1] for g in groups}
    slim = gp.apply(model, dg, plan)
    assert gp.verify(model, x, plan, dg=dg, slim=slim) <= 1e-5
    # the default scale 1/sqrt(head_dim) of the original is kept when head dims shrink
    sdpa = next(n for n in slim.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert sdpa.kwargs.get("scale") == pytest.approx(8 ** -0.5)


def test_group_norm_loses_whole_groups_exactly():
    model, x = GroupNormNet().eval(), torch.randn(2, 3, 8, 8)
    dg = gp.DependencyGraph.build(model, x)
    group = next(g for g in dg.groups if g.prunable)
    assert group.size == 4 and group.exact                  # 4 normalisation groups of 3
    slim = gp.apply(model, dg, {group.id: [1, 3]})
    gn = next(m for m in slim.modules() if isinstance(m, nn.GroupNorm))
    assert (gn.num_groups, gn.num_channels) == (2, 6)
    assert gp.verify(model, x, {group.id: [1, 3]}, dg=dg, slim=slim) <= 1e-5


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
    with pytest.warns(UserWarning, match="inexact"):
        assert gp.verify(model, x, plan, dg=dg, slim=slim) == 0.0


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


def test_pixel_shuffle_and_unshuffle():
    model, x = PixelShuffleNet().eval(), torch.randn(2, 3, 6, 6)
    dg = gp.DependencyGraph.build(model, x)
    sizes = {g.producers[0].split(".")[0]: g.size for g in dg.groups if g.prunable}
    assert sizes == {"a": 4, "b": 2, "c": 5}                # a: one channel = a block of 4
    plan = {g.id: [0] for g in dg.groups if g.prunable}
    slim = gp.apply(model, dg, plan)
    assert gp.verify(model, x, plan, dg=dg, slim=slim) <= 1e-5
    assert slim.get_parameter("a.weight").shape[0] == 12 and slim.get_parameter("d.weight").shape[1] == 16


def test_spatial_pad_and_matmul_with_a_parameter():
    model, x = PadMatmulNet().eval(), torch.randn(2, 3, 8, 8)
    dg = gp.DependencyGraph.build(model, x)
    by_size = {g.size: g for g in dg.groups if g.prunable}
    assert set(by_size) == {8, 6}                          # conv channels, and w's columns as a layer
    assert {(m.param, m.dim) for m in by_size[6].members} >= {("w", 1), ("head.weight", 1)}
    plan = {by_size[8].id: [2, 5], by_size[6].id: [0]}
    slim = gp.apply(model, dg, plan)
    assert slim.get_parameter("w").shape == (6, 5)
    assert gp.verify(model, x, plan, dg=dg, slim=slim) <= 1e-5


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


def test_parametrized_weights_are_pinned_with_a_reason_until_the_parametrization_goes():
    """Weight norm / spectral norm compute the weight from other tensors: their channels
    stay whole, and describe() says so and how to prune them; without the
    parametrization the same network prunes exactly."""
    from torch.nn.utils import parametrizations, parametrize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3))
    parametrizations.weight_norm(model[0])
    parametrizations.spectral_norm(model[4])
    model.eval()
    x = torch.randn(2, 3, 10, 10)
    dg = gp.DependencyGraph.build(model, x)
    assert [g.size for g in dg.groups] == [8, 6, 4] and not any(g.prunable for g in dg.groups)
    assert "0.weight is parametrized (_WeightNorm)" in dg.groups[0].reason
    assert "4.weight is parametrized (_SpectralNorm)" in dg.groups[1].reason
    assert "remove_parametrizations" in dg.describe(width=300)
    with torch.no_grad():
        want = model(x)
    for i in (0, 4):
        parametrize.remove_parametrizations(model[i], "weight")
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-5)  # the same function, plain weights
    dg = gp.DependencyGraph.build(model, x)
    plan = {g.id: [0, 2] for g in dg.groups if g.prunable}
    assert len(plan) == 2
    assert gp.verify(model, x, plan, dg=dg) <= 1e-5
