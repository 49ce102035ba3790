"""graphprune.module_form: the slim model in the user's own classes (apply(..., output="module"))."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphprune as gp

ZOO = [n for n in gp.zoo.list_models() if n not in ("msd", "mini_shufflenet_v2")]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_models_in_their_own_classes_compute_what_the_graph_computes(name):
    model, x = gp.zoo.create(name)
    dg = gp.DependencyGraph.build(model, x)
    plan = gp.select(dg, gp.score("random", model, dg, seed=0), 0.5)
    slim = gp.apply(model, dg, plan, output="module")
    graph = gp.apply(model, dg, plan)
    assert type(slim) is type(model) and slim is not model
    mine, theirs = dict(slim.named_parameters()), dict(graph.named_parameters())
    assert mine.keys() >= theirs.keys() and all(mine[k].shape == v.shape for k, v in theirs.items())
    with torch.no_grad():
        torch.testing.assert_close(slim(*x), graph(*x), rtol=1e-5, atol=1e-5)
    for m in slim.modules():  # width attributes agree with the tensors
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[0] == m.out_channels and m.weight.shape[1] * m.groups == m.in_channels
        if isinstance(m, nn.BatchNorm2d):
            assert m.num_features == m.weight.shape[0]
        if isinstance(m, nn.Linear):
            assert (m.out_features, m.in_features) == tuple(m.weight.shape)


def test_layers_the_plan_removes_whole_are_refused():
    model, x = gp.zoo.create("msd")
    dg = gp.DependencyGraph.build(model, x)
    plan = gp.select(dg, gp.score("random", model, dg, seed=0), 0.5)
    with pytest.raises(gp.RewriteError, match="removes whole layers"):
        gp.apply(model, dg, plan, output="module")


def test_calls_the_model_makes_itself_are_named_when_they_cannot_follow():
    # ShuffleNetV2 splits with x.chunk(2, 1): after pruning the halves differ, which its own code
    # cannot say; the error names the rewritten call and how to go on
    model, x = gp.zoo.create("mini_shufflenet_v2")
    dg = gp.DependencyGraph.build(model, x)
    plan = gp.select(dg, gp.score("random", model, dg, seed=0), 0.5)
    with pytest.raises(gp.RewriteError, match=r"rewrote these calls.*chunk|attributes="):
        gp.apply(model, dg, plan, output="module")


class HeadAttention(nn.Module):
    """Reads its head size from an attribute, as Hugging Face attention modules do."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, -1))


def test_width_attributes_the_model_reads_are_set_and_checked():
    model, x = nn.Sequential(nn.Linear(4, 16), HeadAttention(), nn.Linear(16, 3)).eval(), torch.randn(2, 5, 4)
    dg = gp.DependencyGraph.build(model, x)
    g = next(g for g in dg.groups if g.prunable and any(m.param == "1.qkv.weight" and m.dim == 0 for m in g.members))
    slim = gp.apply(model, dg, {g.id: [0, 3]}, output="module")
    assert slim[1].head_dim == 6 and slim[1].num_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(slim(x), gp.apply(model, dg, {g.id: [0, 3]})(x))
    assert model[1].head_dim == 8  # the user's model is untouched


def test_a_width_that_cannot_be_placed_is_refused_and_can_be_given():
    class Hidden(HeadAttention):  # the head size hides in an attribute whose name says nothing
        def __init__(self):
            super().__init__()
            self.k = self.head_dim

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.k).permute(2, 0, 3, 1, 4)
            a = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1)
            return self.proj((a @ v).transpose(1, 2).reshape(b, n, -1))

    model, x = nn.Sequential(nn.Linear(4, 16), Hidden(), nn.Linear(16, 3)).eval(), torch.randn(2, 5, 4)
    dg = gp.DependencyGraph.build(model, x)
    g = next(g for g in dg.groups if g.prunable and any(m.param == "1.qkv.weight" and m.dim == 0 for m in g.members))
    with pytest.raises(gp.RewriteError, match="attributes="):
        gp.apply(model, dg, {g.id: [0, 3]}, output="module")
    slim = gp.apply(model, dg, {g.id: [0, 3]}, output="module", attributes={"1.k": 6})
    assert slim[1].k == 6


def test_output_must_be_graph_or_module():
    model, x = gp.zoo.create("mlp")
    dg = gp.DependencyGraph.build(model, x)
    with pytest.raises(gp.InputError, match="output"):
        gp.apply(model, dg, {}, output="classes")
