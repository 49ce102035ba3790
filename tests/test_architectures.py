"""Issue-3 structures: attention heads vs head dims, grouped convs, MHA, inexact groups."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.modules import SlimMultiheadAttention


def _sizes(dg):
    return [g.size for g in dg.groups if g.prunable]


@pytest.mark.parametrize("name", ["vit_tiny", "vit_mha"])
def test_attention_prunes_head_dims_or_whole_heads(name):
    model, x = gp.zoo.create(name)
    by_dim = gp.DependencyGraph.build(model, x)
    by_head = gp.DependencyGraph.build(model, x, factor="heads")
    # vit: embed 64, 4 heads of 16, MLP hidden 128, depth 4
    assert _sizes(by_dim).count(16) == 4 and _sizes(by_head).count(4) == 4
    for dg, attn_size in ((by_dim, 16), (by_head, 4)):
        attn_groups = [g for g in dg.groups if g.prunable and g.size == attn_size]
        plan = {g.id: [0, 1] for g in attn_groups}
        slim = gp.apply(model, dg, plan)
        assert gp.verify(model, x, plan, dg=dg, slim=slim) <= 1e-4
        assert gp.count(slim, x).macs < gp.count(model, x).macs


def test_head_pruning_rewrites_reshapes_and_projections():
    model, x = gp.zoo.create("vit_tiny")
    dg = gp.DependencyGraph.build(model, x, factor="heads")
    first = next(g for g in dg.groups if g.prunable and g.size == 4)
    slim = gp.apply(model, dg, {first.id: [1, 3]})
    params = dict(slim.named_parameters())
    qkv = next(k for k in params if k.endswith("attn.qkv.weight"))
    proj = qkv.replace("qkv.weight", "proj.weight")
    assert params[qkv].shape == (3 * 2 * 16, 64) and params[proj].shape == (64, 2 * 16)
    assert any(n.op == "call_method" and n.target == "reshape" and 2 in n.args and 16 in n.args
               for n in slim.graph.nodes)


def test_multihead_attention_is_replaced_by_an_equivalent_slim_module():
    model, x = gp.zoo.create("vit_mha")
    dg = gp.DependencyGraph.build(model, x)
    head_dim_groups = [g for g in dg.groups if g.prunable and g.size == 16]
    plan = {g.id: list(range(0, 16, 2)) for g in head_dim_groups}
    slim = gp.apply(model, dg, plan)
    replaced = [m for m in slim.modules() if isinstance(m, SlimMultiheadAttention)]
    assert len(replaced) == len(head_dim_groups) and replaced[0].head_dim == 8
    assert replaced[0].scale == pytest.approx(16 ** -0.5)  # the original scale survives
    assert gp.verify(model, x, plan, dg=dg, slim=slim) <= 1e-4


def test_layer_norm_makes_the_residual_stream_inexact_and_verify_says_so():
    model, x = gp.zoo.create("vit_tiny")
    dg = gp.DependencyGraph.build(model, x)
    stream = next(g for g in dg.groups if g.prunable and not g.exact)
    assert "LayerNorm" in stream.inexact_reason and "inexact" in dg.describe()
    plan = {stream.id: list(range(0, stream.size, 4))}
    with pytest.warns(UserWarning, match="inexact"):
        assert gp.verify(model, x, plan, dg=dg) == 0.0
    slim = gp.apply(model, dg, plan)
    assert slim(*x).shape == model(*x).shape


@pytest.mark.parametrize("mode", ["groups", "channels"])
def test_grouped_convs_keep_their_structure(mode):
    model, x = gp.zoo.create("resnext")
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


def test_channel_shuffle_couples_matching_channels_of_both_halves():
    model, x = gp.zoo.create("shufflenet_v2")
    dg = gp.DependencyGraph.build(model, x)
    rng = np.random.default_rng(1)
    plan = {g.id: rng.choice(g.size, g.size // 3, replace=False).tolist()
            for g in dg.groups if g.prunable and g.size > 2}
    slim = gp.apply(model, dg, plan)
    assert gp.verify(model, x, plan, dg=dg, slim=slim) <= 1e-4


def test_user_rule_for_a_custom_leaf_module():
    class Gate(nn.Module):  # per-channel gate with a data-dependent branch: must be a leaf
        def __init__(self, c):
            super().__init__()
            self.w = nn.Parameter(torch.rand(c) + 0.5)

        def forward(self, x):
            if x.sum() > 1e9:
                x = x / 2
            return x * self.w.view(1, -1, 1, 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.g, self.b = nn.Conv2d(3, 8, 3), Gate(8), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(self.g(self.a(x)))

    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = gp.DependencyGraph.build(model, x, leaf_modules=[Gate])
    assert not any(g.prunable for g in dg.groups)          # no rule yet: pinned, with a reason
    assert "no rule for Gate" in dg.describe(width=200)

    @gp.register(Gate)
    def gate_rule(ctx, node, module):
        labels = ctx.labels(node.args[0])
        w = ctx.module_param(node.target, "w", 0, "pass")
        return labels[:1] + (ctx.couple([labels[1], w], 8, "gate"),) + labels[2:]

    dg = gp.DependencyGraph.build(model, x)                  # a registered type is a leaf by itself
    group = next(g for g in dg.groups if g.prunable)
    assert {m.param for m in group.members} >= {"a.weight", "g.w", "b.weight"}
    slim = gp.apply(model, dg, {group.id: [0, 5]})
    assert slim.get_parameter("g.w").shape == (6,)
    assert gp.verify(model, x, {group.id: [0, 5]}, dg=dg, slim=slim) <= 1e-5
