"""graphprune.rules.index: integer indexing of the channel axis."""

from __future__ import annotations

import torch
import torch.nn as nn
from helpers import build, group_of, x2d

import graphprune as gp


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


def test_aten_select_follows_its_channel():
    # regression (export fallback): x[:, k] kept index k after earlier channels went
    class PickOne(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(3, 4, 1)
            self.h = nn.Conv2d(12, 4, 1)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            if y.shape[0] > 0:  # shape-dependent Python: torch.export fallback
                return self.h(y) + y[:, 10].unsqueeze(1)
            return y

    model, x = PickOne().eval(), x2d()
    dg = build(model, x)
    assert any(n.target is torch.ops.aten.select.int for n in dg.gm.graph.nodes)
    g = group_of(dg, "a.weight", 0)
    assert gp.verify(model, x, {g.id: [0, 1, 2]}, dg=dg) < 1e-5


def test_interleaved_rotary_pairs_go_together():
    # rotary embeddings rotate (2i, 2i+1) pairs through x[..., ::2] and x[..., 1::2]: a strided
    # slice over a whole channel axis makes channels go in blocks of its step (eva02's RoPE);
    # pruning one dim of a pair used to break the pairing (63 vs 64 in torch.stack)
    def rotate(x):
        return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)

    class Rope(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 16)
            self.k = nn.Linear(8, 16)
            self.o = nn.Linear(16, 8)
            t = torch.arange(5.0)[:, None] * torch.linspace(0.1, 1.0, 8).repeat_interleave(2)[None]
            self.register_buffer("sin", t.sin())
            self.register_buffer("cos", t.cos())

        def forward(self, x):
            q = self.q(x) * self.cos + rotate(self.q(x)) * self.sin
            k = self.k(x) * self.cos + rotate(self.k(x)) * self.sin
            return self.o((q @ k.transpose(-1, -2)).softmax(-1) @ q)

    model, x = Rope().eval(), torch.randn(2, 5, 8)
    dg = build(model, x)
    g = group_of(dg, "q.weight", 0)
    assert g.prunable and g.size == 8  # 8 pairs of the 16 rotated dims
    assert sorted(member_indices(g, "q.weight", [0, 3])) == [0, 1, 6, 7]
    assert gp.verify(model, x, {g.id: [0, 3, 5]}, dg=dg) < 1e-5


def member_indices(g, param, channels):
    return next(m for m in g.members if m.param == param and m.dim == 0).indices(channels)


def test_a_strided_slice_that_stops_short_pins():
    class Short(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.h = nn.Linear(3, 2)

        def forward(self, x):
            return self.h(self.a(x)[..., 1:6:2])

    model, x = Short().eval(), torch.randn(2, 4)
    g = group_of(build(model, x), "a.weight", 0)
    assert not g.prunable and "with a step" in g.reason
