"""graphprune.rules.linear: Linear on N-d inputs, matmul with a parameter."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import build, exact, group_of, keys

import graphprune as gp


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


class PadMatmulNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.w = nn.Parameter(torch.randn(8, 6))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        y = F.pad(F.relu(self.a(x)), (1, 1, 1, 1)).mean((2, 3))   # spatial padding only
        return self.head(y @ self.w)


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


class TinyLM(nn.Module):
    """Embedding -> residual MLP -> output Linear, optionally tied to the embedding."""

    def __init__(self, tied: bool):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 50, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h)


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_columns_are_channels_of_the_residual_stream(tied):
    # regression: nn.Embedding had no rule, so every residual stream it fed was pinned
    model, ids = TinyLM(tied).eval(), torch.randint(0, 50, (2, 7))
    dg = build(model, ids)
    g = group_of(dg, "emb.weight", 1)
    assert g.prunable and g.exact and g.size == 16
    head = "emb.weight" if tied else "head.weight"
    assert (head, 1) in keys(g) and ("fc2.weight", 0) in keys(g)
    slim = exact(model, ids, {g.id: [0, 5, 9]}, dg=dg)
    assert slim.get_submodule("emb").embedding_dim == 13
    assert (slim.get_submodule("emb").weight is slim.get_submodule("head").weight) == tied


def test_addmm_with_a_parameter_is_a_layer():
    # Hugging Face's Conv1D (GPT-2): addmm(bias, x.view(-1, in), weight[in, out])
    class Conv1D(nn.Module):
        def __init__(self, nx, nf):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
            self.bias = nn.Parameter(torch.randn(nf) * 0.1)

        def forward(self, x):
            return torch.addmm(self.bias, x, self.weight)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Conv1D(6, 12)
            self.b = Conv1D(12, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model, x = Net().eval(), torch.randn(5, 6)
    dg = build(model, x)
    g = group_of(dg, "a.weight", 1)
    assert keys(g) == {("a.weight", 1), ("a.bias", 0), ("b.weight", 0)}
    exact(model, x, {g.id: [2, 3, 11]}, dg=dg, zero={"b.weight": (0, [2, 3, 11])})
