"""graphprune.rules.join: cat offsets, cat then add, split and chunk (with slices of the pieces)."""

from __future__ import annotations

import torch
import torch.nn as nn
from helpers import build, exact, group_of, member, x2d


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.h = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.h(torch.cat([self.a(x), self.b(x)], dim=1))


def test_cat_offsets():
    model, x = Concat(), x2d()
    dg = build(model, x)
    ga, gb = group_of(dg, "a.weight", 0), group_of(dg, "b.weight", 0)
    assert ga.id != gb.id and (ga.size, gb.size) == (4, 6)
    assert ga.prunable and gb.prunable
    # the consumer's input axis is split between the two groups at offset 4
    assert member(ga, "h.weight", 1).indices(range(4)) == [0, 1, 2, 3]
    assert member(gb, "h.weight", 1).indices(range(6)) == [4, 5, 6, 7, 8, 9]
    assert member(gb, "h.weight", 1).indices([2]) == [4 + 2]
    assert member(ga, "h.weight", 1).indices([2]) == [2]
    slim = exact(model, x, {gb.id: [2]}, dg=dg, zero={"h.weight": (1, [6])})
    assert slim.h.in_channels == 9
    slim = exact(model, x, {ga.id: [0], gb.id: [2, 5]}, dg=dg, zero={"h.weight": (1, [0, 6, 9])})
    assert slim.h.in_channels == 7


class ConcatAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(3, 10, 3, padding=1)
        self.h = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.h(torch.cat([self.a(x), self.b(x)], dim=1) + self.c(x))


def test_cat_then_add_is_one_group():
    model, x = ConcatAdd(), x2d()
    dg = build(model, x)
    g = group_of(dg, "c.weight", 0)
    assert group_of(dg, "a.weight", 0).id == g.id == group_of(dg, "b.weight", 0).id
    assert g.size == 10 and g.prunable
    assert member(g, "a.weight", 0).indices([2, 5]) == [2]
    assert member(g, "b.weight", 0).indices([2, 5]) == [1]
    assert member(g, "c.weight", 0).indices([2, 5]) == [2, 5]
    assert member(g, "h.weight", 1).indices([2, 5]) == [2, 5]
    slim = exact(model, x, {g.id: [2, 5]}, dg=dg, zero={"h.weight": (1, [2, 5])})
    assert (slim.a.out_channels, slim.b.out_channels, slim.c.out_channels) == (3, 5, 8)


class Splits(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.h1 = nn.Conv2d(4, 2, 1)
        self.h2 = nn.Conv2d(4, 2, 1)
        self.h3 = nn.Conv2d(2, 2, 1)
        self.h4 = nn.Conv2d(3, 2, 1)
        self.h5 = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        y = self.a(x)
        p, _ = torch.split(y, 4, dim=1)
        _, q = y.chunk(2, 1)
        r = y[:, 2:4]
        s = y[:, 5:]
        t, _ = torch.chunk(y, 2, dim=1)
        return self.h1(p) + self.h2(q) + self.h3(r) + self.h4(s) + self.h5(t[:, -3:])


def test_split_chunk_and_slices_rewrite_sizes():
    model, x = Splits(), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert g.size == 8 and g.prunable
    assert member(g, "h1.weight", 1).indices(range(8)) == [0, 1, 2, 3]
    assert member(g, "h2.weight", 1).indices([5]) == [1]
    assert member(g, "h3.weight", 1).indices([3]) == [1]
    assert member(g, "h4.weight", 1).indices([5, 6, 7]) == [0, 1, 2]
    assert member(g, "h5.weight", 1).indices([1, 2, 3]) == [0, 1, 2]
    removed = [0, 3, 6]
    slim = exact(model, x, {g.id: removed}, dg=dg,
                 zero={"h1.weight": (1, [0, 3]), "h2.weight": (1, [2]), "h3.weight": (1, [1]),
                       "h4.weight": (1, [1]), "h5.weight": (1, [2])})
    # surviving channels per piece: split 0..3 -> {1,2}; chunk 4..7 -> {4,5,7};
    # [2:4] -> {2}; [5:] -> {5,7}; chunk 0..3 then [-3:] -> {1,2}
    assert [slim.get_submodule(f"h{i}").in_channels for i in range(1, 6)] == [2, 3, 1, 2, 2]


def test_cat_of_a_slice_of_chunks():
    # regression: even the empty plan raised RewriteError ('Node' object is not iterable)
    class CatChunks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.h = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.h(torch.cat(self.a(x).chunk(4, 1)[1:3], 1))

    model, x = CatChunks(), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    exact(model, x, {}, dg=dg)
    exact(model, x, {g.id: [0, 2, 5]}, dg=dg, zero={"h.weight": (1, [0, 3])})
