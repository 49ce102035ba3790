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


class EosPool(nn.Module):
    """CLIP's text pooling: the hidden state at each row's argmax token, through torch.export."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.a = nn.Linear(8, 8)
        self.h = nn.Linear(8, 3)

    def forward(self, ids):
        y = self.a(self.embed(ids)).relu()
        if y.shape[0] > 0:  # shape-dependent Python: torch.export fallback
            return self.h(y[torch.arange(y.shape[0]), ids.argmax(-1)])
        return y


def test_aten_index_passes_channels_of_the_axes_it_does_not_read():
    model = EosPool().eval()
    ids = torch.tensor([[3, 9, 1, 4], [2, 5, 17, 0]])
    dg = build(model, ids)
    assert any(n.target is torch.ops.aten.index.Tensor for n in dg.gm.graph.nodes)
    g = group_of(dg, "a.weight", 0)
    assert g.prunable and g.size == 8
    plan = {g.id: [0, 3, 6]}
    for x in (ids, torch.tensor([[11, 0, 2, 19], [7, 7, 1, 2]])):  # other positions picked at run time
        assert gp.verify(model, x, plan, dg=dg) < 1e-5
    assert tuple(gp.apply(model, dg, plan).h.weight.shape) == (3, 5)


def test_aten_index_on_a_channel_axis_pins_it():
    class Gather(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(3, 8, 1)
            self.h = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            y, z = self.a(x), self.b(x)
            if y.shape[0] > 0:
                # channels picked by an index computed at run time: pinned
                return self.h(y[:, z.mean((0, 2, 3)).argsort()[:3]])
            return y

    model, x = Gather().eval(), x2d()
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert not g.prunable and "gathers channels with a tensor index" in g.reason
    assert group_of(dg, "b.weight", 0).prunable is False  # its values became positions


def test_aten_index_with_index_tensors_apart_puts_their_axes_first():
    class Apart(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv1d(3, 8, 1)
            self.h = nn.Linear(8, 2)

        def forward(self, x):
            y = self.a(x)  # [B, C, T]
            if y.shape[0] > 0:
                return self.h(y[torch.tensor([1, 0, 1]), :, torch.tensor([0, 4, 2])])  # [3, C]
            return y

    model, x = Apart().eval(), torch.randn(2, 3, 5)
    dg = build(model, x)
    g = group_of(dg, "a.weight", 0)
    assert g.prunable and any(m.param == "h.weight" and m.dim == 1 for m in g.members)
    assert gp.verify(model, x, {g.id: [1, 2, 7]}, dg=dg) < 1e-5


def test_advanced_layout_reads_integer_and_boolean_indices():
    from graphprune.rules.index import _advanced_layout

    s = torch.Size
    # x[i, j] on [B, T, C], i and j of shape [B]: one index axis, then C
    assert _advanced_layout(s([2, 5, 8]), [s([2]), s([2])], s([2, 8])) == ([0, 1], [None, 2])
    # x[:, i] with i [3, 4] on [B, T, C]: B, the index axes, C
    assert _advanced_layout(s([2, 5, 8]), [None, s([3, 4])], s([2, 3, 4, 8])) == ([1], [0, None, None, 2])
    # x[mask] with a boolean [B, T] mask on [B, T, C]: the true entries, then C
    assert _advanced_layout(s([2, 5, 8]), [s([2, 5])], s([7, 8])) == ([0, 1], [None, 2])
    # a layout that fits neither reading
    assert _advanced_layout(s([2, 5, 8]), [s([2])], s([9, 9, 9, 9])) is None


def test_aten_select_whose_result_nothing_reads_pins_nothing():
    # BART's encoder: embed_positions(inputs_embeds[:, :, -1]) reads only the shape, and
    # torch.export keeps the unused select; it used to pin the hidden size's last channel
    class ShapeOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.h = nn.Linear(8, 2)
            self.pos = nn.Embedding(10, 2)

        def forward(self, x):
            y = self.a(x)  # [B, T, C]
            if y.shape[0] > 0:
                last = y[:, :, -1]
                return self.h(y) + self.pos(torch.arange(last.shape[1]))
            return y

    model, x = ShapeOnly().eval(), torch.randn(2, 5, 4)
    dg = build(model, x)
    assert [len(n.users) for n in dg.gm.graph.nodes if n.target is torch.ops.aten.select.int] == [0]
    g = group_of(dg, "a.weight", 0)
    assert g.prunable and g.size == 8
    assert gp.verify(model, x, {g.id: [2, 7]}, dg=dg) < 1e-5  # the picked channel (7) goes too


def test_several_tensor_indices_in_a_torch_fx_graph_pass_the_other_axes():
    class Pool(EosPool):
        def forward(self, ids):
            y = self.a(self.embed(ids)).relu()
            return self.h(y[torch.arange(y.shape[0]), ids.argmax(-1)])

    model = Pool().eval()
    ids = torch.tensor([[3, 9, 1, 4], [2, 5, 17, 0]])
    dg = build(model, ids)
    assert not any(n.target is torch.ops.aten.index.Tensor for n in dg.gm.graph.nodes)  # fx: a getitem
    g = group_of(dg, "a.weight", 0)
    assert g.prunable and g.size == 8
    for x in (ids, torch.tensor([[11, 0, 2, 19], [7, 7, 1, 2]])):
        assert gp.verify(model, x, {g.id: [1, 4]}, dg=dg) < 1e-5
