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
