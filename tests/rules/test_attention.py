"""graphprune.rules.attention: scaled_dot_product_attention, MultiheadAttention, heads vs head dims."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import exact, group_of, keys

import graphprune as gp
from graphprune.metrics import estimate
from graphprune.modules import SlimMultiheadAttention


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


def _sizes(dg):
    return [g.size for g in dg.groups if g.prunable]


@pytest.mark.parametrize("name", ["mini_vit", "mini_vit_mha"])
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
    model, x = gp.zoo.create("mini_vit")
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
    model, x = gp.zoo.create("mini_vit_mha")
    dg = gp.DependencyGraph.build(model, x)
    head_dim_groups = [g for g in dg.groups if g.prunable and g.size == 16]
    plan = {g.id: list(range(0, 16, 2)) for g in head_dim_groups}
    slim = gp.apply(model, dg, plan)
    replaced = [m for m in slim.modules() if isinstance(m, SlimMultiheadAttention)]
    assert len(replaced) == len(head_dim_groups) and replaced[0].head_dim == 8
    assert replaced[0].scale == pytest.approx(16 ** -0.5)  # the original scale survives
    assert gp.verify(model, x, plan, dg=dg, slim=slim) <= 1e-4


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_is_traced_through_and_prunes(norm_first):
    # regression: nn.TransformerEncoder was a leaf without a rule (nothing pruned); it is traced
    # through now (fast path off while tracing), its MultiheadAttention has a rule
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True, norm_first=norm_first)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 16)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.h = nn.Linear(16, 3)

        def forward(self, x):
            return self.h(self.enc(self.a(x)))

    model, x = Model().eval(), torch.randn(2, 5, 8)
    dg = gp.DependencyGraph.build(model, x)
    mlp = group_of(dg, "enc.layers.0.linear1.weight", 0)
    attention = group_of(dg, "enc.layers.1.self_attn.in_proj_weight", 0)
    assert mlp.exact and attention.exact and mlp.size == 32
    exact(model, x, {mlp.id: [0, 5, 31], attention.id: [1]}, dg=dg)
    result = gp.prune(model, x, ratio=0.5)
    assert result.after.params < 0.35 * result.before.params
    slim = result.model
    with torch.no_grad():  # an eval model's slim attention keeps dropout off (it used to be on)
        assert torch.equal(slim(x), slim(x))
        own = gp.apply(model, result.graph, result.plan, output="module")
        torch.testing.assert_close(own(x), slim(x))
    assert type(own.enc) is nn.TransformerEncoder


class CrossAttention(nn.Module):
    """Queries from ``x``; keys and values from ``y`` of another width and length, through
    ``nn.MultiheadAttention(kdim=6, vdim=10)`` (separate q/k/v projection weights)."""

    def __init__(self, batch_first=True, **options):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 16), nn.Linear(5, 6), nn.Linear(5, 10)
        self.attn = nn.MultiheadAttention(16, 4, kdim=6, vdim=10, batch_first=batch_first, **options)
        self.head = nn.Linear(16, 3)
        self.batch_first = batch_first

    def forward(self, x, y):
        q, k, v = self.q(x), self.k(y).relu(), self.v(y)
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        out, _ = self.attn(q, k, v)
        return self.head(out if self.batch_first else out.transpose(0, 1))


def _cross(batch_first, **options):
    torch.manual_seed(0)
    model = CrossAttention(batch_first, **options).eval()
    with torch.no_grad():  # torch starts bias_k/bias_v and in_proj_bias at zero: make them count
        model.attn.in_proj_bias.normal_()
    return model, (torch.randn(2, 5, 8), torch.randn(2, 7, 5))


OPTIONS = [{}, {"add_bias_kv": True}, {"add_zero_attn": True}, {"add_bias_kv": True, "add_zero_attn": True}]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "bias_kv", "zero_attn", "both"])
def test_multihead_attention_with_kdim_vdim_bias_kv_and_zero_attn_prunes_exactly(batch_first, options):
    # regression: such a module was pinned ("uses kdim/vdim, bias_kv or add_zero_attn")
    model, x = _cross(batch_first, **options)
    dg = gp.DependencyGraph.build(model, x)
    query = group_of(dg, "attn.q_proj_weight", 1)
    key, value = group_of(dg, "attn.k_proj_weight", 1), group_of(dg, "attn.v_proj_weight", 1)
    head_dim = group_of(dg, "attn.q_proj_weight", 0)
    assert (query.size, key.size, value.size, head_dim.size) == (16, 6, 10, 4)
    assert all(g.prunable and g.exact for g in (query, key, value, head_dim))
    assert ("k.weight", 0) in keys(key) and ("v.weight", 0) in keys(value) and ("q.weight", 0) in keys(query)
    expected = {("attn.k_proj_weight", 0), ("attn.v_proj_weight", 0), ("attn.in_proj_bias", 0)}
    if "add_bias_kv" in options:
        expected |= {("attn.bias_k", 2), ("attn.bias_v", 2)}
    assert expected <= keys(head_dim)
    # each input stream alone: the columns of its own projection read it
    exact(model, x, {key.id: [0, 4]}, dg=dg, zero={"attn.k_proj_weight": (1, [0, 4])})
    exact(model, x, {value.id: [1, 2, 9]}, dg=dg, zero={"attn.v_proj_weight": (1, [1, 2, 9])})
    exact(model, x, {query.id: [3]}, dg=dg, zero={"attn.q_proj_weight": (1, [3])})
    # head dim 1 of every head: its q.k term and its value channel are gone
    rows = [1, 5, 9, 13]
    exact(model, x, {head_dim.id: [1]}, dg=dg,
          zero={"attn.q_proj_weight": (0, rows), "attn.in_proj_bias": (0, rows), "attn.out_proj.weight": (1, rows)})
    plan = {g.id: [0, 1] for g in dg.groups if g.prunable}
    slim = exact(model, x, plan, dg=dg)
    attn = slim.get_submodule("attn")
    assert isinstance(attn, SlimMultiheadAttention)
    assert (attn.in_dim, attn.kdim, attn.vdim, attn.head_dim) == (14, 4, 8, 2)
    assert (attn.bias_k is not None, attn.add_zero_attn) == ("add_bias_kv" in options, "add_zero_attn" in options)
    assert gp.count(slim, x).macs < gp.count(model, x).macs
    estimated = estimate(dg, plan)  # the macs facet over the plan's shapes agrees with the slim count
    assert (estimated.macs, estimated.params) == (gp.count(slim, x).macs, gp.count(slim, x).params)


@pytest.mark.parametrize("factor", ["largest", "heads"])
def test_multihead_attention_with_kdim_vdim_prunes_whole_heads_and_keeps_its_class(factor):
    model, x = _cross(False, add_bias_kv=True, add_zero_attn=True)
    dg = gp.DependencyGraph.build(model, x, factor=factor)
    inner = group_of(dg, "attn.q_proj_weight", 0)
    cols = [4, 5, 6, 7] if factor == "heads" else [1, 5, 9, 13]  # head 1, or head dim 1 of every head
    exact(model, x, {inner.id: [1]}, dg=dg, zero={"attn.out_proj.weight": (1, cols)} if factor == "heads" else None)
    # only the key/value streams narrow: nn.MultiheadAttention expresses that itself (kdim, vdim)
    narrow = {group_of(dg, "attn.k_proj_weight", 1).id: [0], group_of(dg, "attn.v_proj_weight", 1).id: [2, 3]}
    slim = exact(model, x, narrow, dg=dg)
    attn = slim.get_submodule("attn")
    assert type(attn) is nn.MultiheadAttention and (attn.kdim, attn.vdim) == (5, 8)
    # the module form: the user's class, with the slim attention module where it needs one
    plan = {g.id: [0] for g in dg.groups if g.prunable}
    with torch.no_grad():
        own = gp.apply(model, dg, plan, output="module")
        graph = gp.apply(model, dg, plan)
        assert type(own) is CrossAttention and isinstance(own.attn, SlimMultiheadAttention)
        torch.testing.assert_close(own(*x), graph(*x))
        assert gp.verify(model, x, plan, dg=dg, slim=own) <= 1e-5
