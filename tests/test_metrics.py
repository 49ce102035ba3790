"""gp.count and the estimate from the same rule facets: they agree on every zoo model, dense and
pruned, whether the model was traced by torch.fx or through the torch.export fallback; MACs are
per sample, agree with torch's FlopCounterMode, and break down per layer."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import graphprune as gp
from graphprune.metrics import CountEstimator, estimate


class ForceExport(nn.Module):
    """A shape-dependent branch: symbolic tracing fails, torch.export specialises."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *xs):
        if xs[0].shape[0] > 0:
            return self.inner(*xs)
        return self.inner(*xs) * 0


def _plans(model, dg):
    scores = gp.score("random", model, dg, seed=0)
    return [gp.Plan(), gp.select(dg, scores, 0.5),
            gp.select(dg, scores, 0.3, scope="global", round_to=4)]


@pytest.mark.parametrize("route", ["fx", "export"])
@pytest.mark.parametrize("name", gp.zoo.list_models())
def test_estimate_equals_count_of_the_slim_model(name, route):
    model, x = gp.zoo.create(name)
    if route == "export":
        model = ForceExport(model).eval()
    dg = gp.DependencyGraph.build(model, x)
    exported = any(isinstance(n.target, torch._ops.OpOverload) for n in dg.gm.graph.nodes)
    assert exported == (route == "export")
    dense = gp.count(model, x)
    for plan in _plans(model, dg):
        slim = gp.apply(model, dg, plan)
        assert estimate(dg, plan) == gp.count(slim, x), plan
    assert estimate(dg, {}).macs == dense.macs > 0


def test_attention_macs_are_counted_by_the_estimator():
    # nn.MultiheadAttention and SDPA have a macs facet: the estimate once missed them (8.9 M of 21.8 M)
    model, x = gp.zoo.create("mini_vit_mha")
    dg = gp.DependencyGraph.build(model, x)
    assert CountEstimator(dg).counts({})[1] == gp.count(model, x).macs == 10_880_128  # per sample, batch of 2


def test_macs_target_is_hit_with_one_apply(monkeypatch):
    model, x = gp.zoo.create("mini_vit_mha")
    dg = gp.DependencyGraph.build(model, x)
    calls = []
    real = gp.select.__globals__["apply"]
    monkeypatch.setitem(gp.select.__globals__, "apply", lambda *a, **k: calls.append(1) or real(*a, **k))
    plan = gp.select(dg, gp.score("magnitude", model, dg), 0.5, target="macs", model=model, example_inputs=x)
    after = gp.count(gp.apply(model, dg, plan), x).macs
    assert abs(after / gp.count(model, x).macs - 0.5) <= 0.01
    assert len(calls) == 1


@pytest.fixture(scope="module")
def resnet20():
    model, x = gp.zoo.create("resnet20", width=8)
    return model, x, gp.DependencyGraph.build(model, x)


def test_count_estimator_matches_exact_counts(resnet20) -> None:
    for model, x, dg in (resnet20, (*gp.zoo.create("mini_densenet"), None)):
        dg = dg or gp.DependencyGraph.build(model, x)
        est = CountEstimator(dg)
        before = gp.count(model, x)
        assert est.counts({}) == (before.params, before.macs)
        plan = gp.select(dg, gp.score("random", model, dg, seed=1), 0.6)
        after = gp.count(gp.apply(model, dg, plan), x)
        assert est.counts(plan) == (after.params, after.macs)


# --- per sample ---------------------------------------------------------------------------------
def test_macs_are_per_sample_of_the_example_batch():
    # the zoo's example batch of 2 once made resnet20 show 81.6 M MACs for a 40.8 M network
    model, (x,) = gp.zoo.create("resnet20")
    assert x.shape[0] == 2
    per_sample = gp.count(model, x).macs
    assert per_sample == gp.count(model, x[:1]).macs == 40_813_184
    assert gp.count(model, x, batch_size=1).macs == 2 * per_sample  # the whole example batch
    assert gp.count(model, torch.cat([x, x]), batch_size=2).macs == 2 * per_sample
    dg = gp.DependencyGraph.build(model, x)
    assert CountEstimator(dg).counts({})[1] == per_sample
    assert CountEstimator(dg, batch_size=1).counts({})[1] == 2 * per_sample
    with pytest.raises(gp.InputError, match="batch_size"):
        gp.count(model, x, batch_size=0)


def test_dict_inputs_take_the_batch_of_the_first_tensor():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)

        def forward(self, x, mask=None):
            return self.a(x) * mask

    model = Keyword()
    c = gp.count(model, {"x": torch.randn(5, 4), "mask": torch.ones(5, 6)})
    assert c.macs == 4 * 6 and c.params == 30


# --- per layer -----------------------------------------------------------------------------------
def test_layers_add_up_to_the_totals_and_compare_before_and_after():
    model, x = gp.zoo.create("vit_tiny")
    result = gp.prune(model, x, ratio=0.5)
    before, after = result.before.layers, result.after.layers
    for counts in (result.before, result.after):
        assert (counts.layers.params, counts.layers.macs) == (counts.params, counts.macs)
    assert before["blocks.0.attn.qkv"].op == "Linear" and before["blocks.0.attn.qkv"].shape == (2, 65, 192)
    assert before["blocks.0.attn.qkv"].macs == 65 * 64 * 192
    assert before["pos_embed"].op == "parameter" and before["pos_embed"].params == 65 * 64
    assert {r.op for r in before if r.name == "blocks.0.attn"} == {"matmul"}  # q k^T and attn v
    fc1 = before.compare(after)["blocks.0.mlp.fc1"]
    assert fc1.before.shape == (2, 65, 128) and fc1.after.shape == (2, 65, 64)
    assert fc1.after.params < fc1.before.params
    text = result.layer_changes().table()
    assert "blocks.0.mlp.fc1" in text and "2x65x128 -> 2x65x64" in text
    data = json.loads(json.dumps({"before": before.to_dict(), "changes": before.compare(after).to_dict()}))
    assert data["before"]["macs"] == result.before.macs and data["before"]["batch_size"] == 2
    assert "MACs per sample" in before.table()
    assert result.before == gp.Counts(result.before.params, result.before.macs)  # layers take no part


def test_removed_layers_and_unused_parameters_have_rows():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.spare = nn.Linear(4, 3), nn.Linear(100, 100)

        def forward(self, x):
            return self.a(x)

    c = gp.count(Unused(), torch.randn(1, 4))
    assert c.layers.params == c.params == 15 + 10100
    assert c.layers["(not in the traced graph)"].params == 10100
    before = gp.count(nn.Linear(4, 3), torch.randn(1, 4)).layers
    change = before.compare(gp.metrics.LayerCounts())[0]
    assert change.after is None and "removed" in before.compare(gp.metrics.LayerCounts()).table()


# --- FlopCounterMode --------------------------------------------------------------------------------
def _flops(model, x) -> int:
    """torch's count for the whole batch, with attention and RNNs on their decomposed paths (the
    fused CPU kernels of SDPA, nn.MultiheadAttention's fast path and oneDNN's LSTM are not counted)."""
    with sdpa_kernel(SDPBackend.MATH), torch.backends.mkldnn.flags(enabled=False), \
            FlopCounterMode(display=False) as counter:
        model(*x)
    return counter.get_total_flops()


FLOPS = pytest.mark.filterwarnings("ignore:TF32 acceleration")  # torch.backends.mkldnn.flags says it


@FLOPS
@pytest.mark.parametrize("name", gp.zoo.list_models())
def test_macs_agree_with_torch_flop_counter_on_the_zoo(name):
    model, x = gp.zoo.create(name)
    assert 2 * gp.count(model, x, batch_size=1).macs == _flops(model, x)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        x = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        return self.mha(x, x, x)[0]


class Einsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.einsum("bik,bkj->bij", torch.einsum("bij,bkj->bik", h, h), h))


class Recurrent(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.rnn, self.fc = cls(16, 32, batch_first=True), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.rnn(x)[0])


@FLOPS
@pytest.mark.parametrize("make", [Attention, Einsum, lambda: Recurrent(nn.LSTM), lambda: Recurrent(nn.GRU)],
                         ids=["attention", "einsum", "lstm", "gru"])
def test_macs_agree_with_torch_flop_counter_on_attention_einsum_and_rnns(make):
    torch.manual_seed(0)
    model, x = make().eval(), (torch.randn(2, 5, 16),)
    assert 2 * gp.count(model, x, batch_size=1).macs == _flops(model, x)
