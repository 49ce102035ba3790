"""graphprune.rules.recurrent: LSTM, GRU and RNN hidden units."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import build, exact, group_of, keys

import graphprune as gp
from graphprune.metrics import estimate


class Seq(nn.Module):
    def __init__(self, cls, **options):
        super().__init__()
        self.emb = nn.Linear(5, 4)
        self.rnn = cls(4, 6, batch_first=True, **options)
        self.head = nn.Linear(6 * (2 if options.get("bidirectional") else 1), 3)

    def forward(self, x):
        out, _ = self.rnn(self.emb(x))
        return self.head(out[:, -1])


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("options", [{}, {"num_layers": 2, "bidirectional": True}], ids=["one", "deep-bi"])
def test_hidden_units_are_one_group_across_layers_and_directions(cls, options):
    # regression: the module had no rule, so its parameters (most of the model) were in no group
    model, x = Seq(cls, **options).eval(), torch.randn(2, 7, 5)
    dg = build(model, x)
    g = group_of(dg, "rnn.weight_hh_l0", 0)
    assert g.prunable and g.exact and g.size == 6
    if options:
        assert {("rnn.weight_hh_l1_reverse", 1), ("rnn.weight_ih_l1", 1)} <= keys(g)
    slim = exact(model, x, {g.id: [0, 4]}, dg=dg)
    assert slim.get_submodule("rnn").hidden_size == 4
    assert estimate(dg, {g.id: [0, 4]}) == gp.count(slim, x)
    own = gp.apply(model, dg, {g.id: [0, 4]}, output="module")
    assert own.rnn.hidden_size == 4 and type(own.rnn) is cls


def test_input_features_of_a_recurrent_layer_go_with_their_producer():
    model, x = Seq(nn.LSTM).eval(), torch.randn(2, 7, 5)
    dg = build(model, x)
    g = group_of(dg, "emb.weight", 0)
    assert ("rnn.weight_ih_l0", 1) in keys(g)
    slim = exact(model, x, {g.id: [1]}, dg=dg)
    assert slim.get_submodule("rnn").input_size == 3


def test_projections_pin():
    model = nn.Sequential(nn.Linear(5, 4), nn.LSTM(4, 6, proj_size=2, batch_first=True))
    dg = build(model, torch.randn(2, 7, 5))
    assert not group_of(dg, "0.weight", 0).prunable
