"""graphprune.rules.shape: flatten/view/reshape, unflatten, pixel (un)shuffle, channel shuffle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import build, exact, group_of, keys, member, x2d

import graphprune as gp


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


class PixelShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(4, 2, 1)
        self.c, self.d = nn.Conv2d(2, 5, 1), nn.Conv2d(20, 3, 1)

    def forward(self, x):
        up = self.b(F.pixel_shuffle(self.a(x), 2))        # 16 -> 4 channels, 2x spatial
        return self.d(F.pixel_unshuffle(self.c(up), 2))    # 5 -> 20 channels, back to 1x


def test_pixel_shuffle_and_unshuffle():
    model, x = PixelShuffleNet().eval(), torch.randn(2, 3, 6, 6)
    dg = gp.DependencyGraph.build(model, x)
    sizes = {g.producers[0].split(".")[0]: g.size for g in dg.groups if g.prunable}
    assert sizes == {"a": 4, "b": 2, "c": 5}                # a: one channel = a block of 4
    plan = {g.id: [0] for g in dg.groups if g.prunable}
    slim = gp.apply(model, dg, plan)
    assert gp.verify(model, x, plan, dg=dg, slim=slim) <= 1e-5
    assert slim.get_parameter("a.weight").shape[0] == 12 and slim.get_parameter("d.weight").shape[1] == 16


def test_channel_shuffle_couples_matching_channels_of_both_halves():
    model, x = gp.zoo.create("mini_shufflenet_v2")
    dg = gp.DependencyGraph.build(model, x)
    rng = np.random.default_rng(1)
    plan = {g.id: rng.choice(g.size, g.size // 3, replace=False).tolist()
            for g in dg.groups if g.prunable and g.size > 2}
    slim = gp.apply(model, dg, plan)
    assert gp.verify(model, x, plan, dg=dg, slim=slim) <= 1e-4


class WidthArithmetic(nn.Module):
    """Widths read as numbers: a mean written out, a hand-written attention scale, numel."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.h = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        mean = y.sum(1, keepdim=True) / y.size(1)
        scaled = y * y.shape[1] ** -0.5
        return self.h(scaled) + mean + y.sum() / y.numel()


def test_widths_read_as_numbers_keep_their_original_value():
    # regression: the slim model divided by the slim channel count (verify error 0.37)
    model, x = WidthArithmetic(), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert g.prunable and g.exact
    slim = exact(model, x, {g.id: [0, 2, 5]}, dg=dg)
    assert "size" not in slim.code and "numel" not in slim.code  # folded to the original 8 and 8 * 8 * 8 * 2


class HeadsFromWidth(nn.Module):
    """A width used as a size: ``view(B, heads, C // heads, ...)`` follows the slim width."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.h = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        b, c, hh, ww = y.shape
        z = y.view(b, 2, c // 2, hh * ww).softmax(-1).view(b, c, hh, ww)
        return self.h(z * (c ** 0.5))


def test_width_in_a_shape_argument_follows_the_slim_width():
    model, x = HeadsFromWidth(), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert g.size == 4  # the per-head dim is the free factor: a group channel is one channel of each head
    exact(model, x, {g.id: [1]}, dg=dg)  # the view must now say 3, not 4, per head


class OneChannelHeads(nn.Module):
    """Heads of one channel each, sizes read at run time: ``c // heads`` sizes an axis of 1."""

    def __init__(self, sizes):
        super().__init__()
        self.sizes = sizes
        self.a = nn.Conv2d(3, 4, 1)
        self.h = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x)
        b, c, hh, ww = y.shape
        if self.sizes == "runtime":
            t = y.view(b, 4, c // 4, hh * ww)
        else:
            t = y.view(y.shape[0], 4, y.shape[1] // 4, -1)
        return self.h(t.softmax(-1).reshape(b, c, hh, ww))


@pytest.mark.parametrize("sizes", ["runtime", "minus1"])
def test_width_sizing_an_axis_without_channels_keeps_its_value(sizes):
    # found by fuzzing (tests/hazards.py "heads"): the slim view computed c // 4 from the slim
    # width, 0 once a head went, and the slimmed model failed to run (RewriteError)
    model, x = OneChannelHeads(sizes), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert g.prunable and g.size == 4  # whole heads of one channel
    exact(model, x, {g.id: [1, 2]}, dg=dg)


class _GQA(nn.Module):
    """A user-written grouped-query attention: key/value heads repeated with repeat_interleave."""

    def __init__(self, d=32, heads=4, kv_heads=2, repeats=None):
        super().__init__()
        self.heads, self.kv_heads, self.repeats = heads, kv_heads, repeats
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * d // heads, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * d // heads, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, -1).transpose(1, 2)
        rep = self.heads // self.kv_heads if self.repeats is None else self.repeats
        k, v = k.repeat_interleave(rep, dim=1), torch.repeat_interleave(v, rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("factor", ["largest", "heads"])
def test_repeat_interleave_copies_labels_so_gqa_prunes(factor):
    model, x = _GQA().eval(), torch.randn(2, 5, 32)
    dg = build(model, x) if factor == "largest" else gp.DependencyGraph.build(model, x, factor="heads")
    prunable = [g for g in dg.groups if g.prunable]
    assert {m.param for g in prunable for m in g.members} >= {"q_proj.weight", "k_proj.weight", "v_proj.weight"}
    if factor == "heads":  # a key/value head and the query heads that read it go together
        g = group_of(dg, "k_proj.weight")
        assert g.size == 2 and len(member(g, "q_proj.weight", 0).positions) == 32
    plan = {g.id: [0] for g in prunable}
    slim = exact(model, x, plan, dg=dg)
    # one key/value head of two (8 rows), or one head dim of each key/value head (2 rows)
    assert slim.k_proj.out_features == (8 if factor == "heads" else 14)


def test_repeat_interleave_with_per_position_counts_pins():
    model, x = _GQA(repeats=torch.tensor([1, 3])).eval(), torch.randn(2, 5, 32)
    dg = build(model, x)
    groups = [g for g in dg.groups if any(m.param == "k_proj.weight" for m in g.members)]
    assert groups and not any(g.prunable for g in groups)  # per-position counts are not followed
