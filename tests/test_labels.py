"""graphprune.labels: what the labelling pass pins (no rule, outputs, parametrizations), constants."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import build, exact, group_of, x2d

import graphprune as gp


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
            y = torch.fft.fft(y, dim=1).real  # along the channels: no rule, and the probe sees mixing
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


def test_tied_layers_are_one_group_and_stay_tied():
    # regression: two convs sharing a weight, added, were pinned as "combined with a non-channel axis"
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(3, 8, 1)
            self.b.weight = self.a.weight
            self.h = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.h(self.a(x) + self.b(x * 2))

    model, x = Tied(), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert g.prunable and {m.param for m in g.members} == {"a.weight", "a.bias", "b.bias", "h.weight"}
    slim = exact(model, x, {g.id: [0, 3]}, dg=dg)
    assert slim.get_submodule("a").weight is slim.get_submodule("b").weight
    assert slim.get_submodule("b").weight.shape[0] == 6


def test_graphs_past_int32_element_ids_are_labelled_in_int64_with_the_same_groups(monkeypatch):
    import numpy as np

    import graphprune.labels as labels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True),
                          nn.Linear(16, 3)).eval()
    x = torch.randn(2, 5, 8)
    narrow = gp.DependencyGraph.build(model, x, factor="heads")
    assert narrow.cls.dtype == np.int32 and all(a.dtype == np.int32 for a in narrow.member_labels.values())
    monkeypatch.setattr(labels, "INT32_ELEMENTS", narrow.n_elements // 2)  # overflows half way through
    wide = gp.DependencyGraph.build(model, x, factor="heads")
    assert all(a.dtype == np.int64 for a in wide.member_labels.values())
    assert wide.n_elements == narrow.n_elements and wide.to_json() == narrow.to_json()
    assert [g.members for g in wide.groups] == [g.members for g in narrow.groups]
    assert np.array_equal(wide.cls, narrow.cls)
    scores = gp.score("random", model, narrow, seed=0)
    plan = gp.select(narrow, scores, 0.5)
    assert gp.select(wide, scores, 0.5) == plan
    slim_narrow, slim_wide = gp.apply(model, narrow, plan), gp.apply(model, wide, plan)
    assert torch.equal(slim_narrow(x), slim_wide(x))
