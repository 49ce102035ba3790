"""Inspecting a dependency graph (describe, networkx, DOT, JSON) and what tracing records."""

from __future__ import annotations

import json
import re

import networkx as nx
import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp


class Block(nn.Module):
    """Residual block, a concat and a pinned branch: groups of several kinds."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        y = y + self.a(y)
        z = torch.cat([self.b(y), torch.cumsum(self.c(y), 1)], dim=1)
        return self.head(z.mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


@pytest.fixture(scope="module")
def dg():
    return gp.DependencyGraph.build(Block().eval(), X)


def test_groups_of_the_fixture_model_are_varied(dg):
    # the inspection tests below need prunable and unprunable groups
    assert any(g.prunable for g in dg.groups) and any(not g.prunable for g in dg.groups)
    assert [g.id for g in dg.groups] == list(range(len(dg.groups)))


def test_describe_has_one_row_per_group(dg):
    text = dg.describe()
    assert isinstance(text, str)
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\d+)\s+(\d+)\s+(.*)$", line)
        if m:
            rows.setdefault(int(m.group(1)), []).append((int(m.group(2)), m.group(3)))
    assert sorted(rows) == [g.id for g in dg.groups]
    for g in dg.groups:
        [(size, rest)] = rows[g.id]
        assert size == g.size
        if g.prunable:
            assert "yes" in rest
        else:
            assert g.reason and g.reason[:40] in rest


def test_to_networkx(dg):
    graph = dg.to_networkx()
    assert isinstance(graph, nx.Graph)
    groups = [n for n, d in graph.nodes(data=True) if d.get("kind") == "group"]
    tensors = {n for n, d in graph.nodes(data=True) if d.get("kind") == "tensor"}
    assert len(groups) == len(dg.groups)
    params = {m.param for g in dg.groups for m in g.members}
    assert params <= tensors
    sizes = sorted(graph.nodes[n]["size"] for n in groups)
    assert sizes == sorted(g.size for g in dg.groups)
    # every member is an edge from its group's node to its tensor, with the sliced axis
    for g in dg.groups:
        node = _group_node(graph, g)
        assert graph.nodes[node]["prunable"] == g.prunable
        for m in g.members:
            assert m.param in graph[node]
            assert _edge_dims(graph, node, m.param) <= {mm.dim for mm in g.members if mm.param == m.param}


def _group_node(graph, g):
    params = {m.param for m in g.members}
    found = [n for n, d in graph.nodes(data=True) if d.get("kind") == "group"
             and d["size"] == g.size and set(graph.neighbors(n)) == params]
    assert len(found) == 1, g.id
    return found[0]


def _edge_dims(graph, u, v):
    data = graph.get_edge_data(u, v)
    items = data.values() if graph.is_multigraph() else [data]
    dims = set()
    for d in items:
        dims |= set(d["dims"]) if "dims" in d else {d["dim"]}
    return dims


def test_to_networkx_keeps_every_axis_a_group_owns(dg):
    graph = dg.to_networkx()
    g = next(g for g in dg.groups if {("a.weight", 0), ("a.weight", 1)} <= {(m.param, m.dim) for m in g.members})
    assert _edge_dims(graph, _group_node(graph, g), "a.weight") == {0, 1}


def test_to_dot(dg):
    dot = dg.to_dot()
    assert dot.lstrip().startswith(("graph", "digraph", "strict"))
    assert dot.count("{") == dot.count("}") >= 1
    assert dot.rstrip().endswith("}")
    assert dot.count('"') % 2 == 0
    for g in dg.groups:
        assert re.search(rf"group\s*{g.id}\b", dot)
    for param in {m.param for g in dg.groups for m in g.members}:
        assert param in dot


def test_to_json(dg):
    data = json.loads(dg.to_json())
    assert isinstance(data, list) and len(data) == len(dg.groups)
    for item, g in zip(data, dg.groups, strict=True):
        assert (item["id"], item["size"], item["prunable"]) == (g.id, g.size, g.prunable)
        assert {m["param"] for m in item["members"]} == {m.param for m in g.members}


def _interpret(gm, *inputs):
    """Run gm node by node and record each node's value, independently of gp.trace."""
    seen = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            seen[n.name] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return seen


def test_trace_records_every_call_node_shape():
    model = Block().eval()
    gm = gp.trace(model, X)
    assert isinstance(gm, torch.fx.GraphModule)
    values = _interpret(gm, X)
    calls = [n for n in gm.graph.nodes if n.op.startswith("call_")]
    assert len(calls) >= 10
    for n in calls:
        assert "shape" in n.meta, n.name
        if isinstance(values[n.name], torch.Tensor):
            assert tuple(n.meta["shape"]) == tuple(values[n.name].shape), n.name
    with torch.no_grad():
        assert torch.equal(gm(X), model(X))


@pytest.mark.parametrize("entry", ["trace", "build", "count"])
def test_tracing_in_train_mode_keeps_running_stats(entry):
    model = Block().train()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    call = {"trace": gp.trace, "build": gp.DependencyGraph.build, "count": gp.count}[entry]
    call(model, X)
    assert model.training and model.bn.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k
    # the check can fail: a plain forward in train mode does move the statistics
    model(X)
    assert not torch.equal(model.bn.running_mean, snap["bn.running_mean"])
    assert model.bn.num_batches_tracked.item() == snap["bn.num_batches_tracked"].item() + 1


class WithConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.a(x - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))


def test_trace_adds_no_attributes_to_the_user_model():
    model = WithConstant().eval()
    before = set(vars(model))
    gp.trace(model, X)
    gp.DependencyGraph.build(model, X)
    assert set(vars(model)) == before


@pytest.mark.parametrize("name", ["resnet20", "vit_mha", "densenet", "mobilenet_v3"])
def test_named_state_is_torchs_parameters_then_buffers(name):
    from graphprune.tracing import named_state

    model, _ = gp.zoo.create(name)
    tied = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 3))
    tied[2].weight = tied[0].weight  # a tied weight appears once, under its first name
    for m in (model, tied):
        want = dict(m.named_parameters())
        want.update(dict(m.named_buffers()))
        got = named_state(m)
        assert list(got) == list(want) and all(got[k] is want[k] for k in want)
    assert "2.weight" not in named_state(tied)
