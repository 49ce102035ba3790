"""graphprune.graph: inspecting a dependency graph (describe, networkx, DOT, JSON)."""

from __future__ import annotations

import json
import re

import networkx as nx
import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import Block

import graphprune as gp

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


def test_every_parameter_is_in_a_group_or_named_with_a_reason():
    # no silent coverage holes: a layer without a rule, an unused layer, a scalar all show up
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.cell = nn.GRUCell(6, 6)  # no rule: its parameters are in no group
            self.unused = nn.Linear(3, 3)
            self.h = nn.Linear(6, 2)
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return self.h(self.cell(self.a(x))) * self.scale

    dg = gp.DependencyGraph.build(Net().eval(), torch.randn(2, 4))
    held = {m.param for g in dg.groups for m in g.members}
    assert held | set(dg.uncovered) == {n for n, _ in Net().named_parameters()}
    assert "no rule" in dg.uncovered["cell.weight_hh"] and "not used" in dg.uncovered["unused.weight"]
    text = dg.describe()
    assert "in no group" in text and "cell.weight_ih" in text and "GRUCell module 'cell'" in text


def test_removed_classes_flags_exactly_the_planned_channels_of_each_group():
    model, x = gp.zoo.create("mobilenet_v2")
    dg = gp.DependencyGraph.build(model, x)
    big = max(dg.groups, key=lambda g: g.size)
    plans = [{}, {big.id: [0, big.size - 1]}, {g.id: list(range(0, g.size, 3)) for g in dg.groups},
             {big.id: [-1, big.size, 1], len(dg.groups) + 5: [0]}]  # out of range: nothing
    for plan in plans:
        mask = dg.removed_classes(plan)
        want = np.zeros(len(dg.group_of_cls), bool)  # the definition, one group at a time
        for gid, channels in plan.items():
            want |= (dg.group_of_cls == gid) & np.isin(dg.chan_of_cls, [c for c in channels if c >= 0])
        assert (mask == want).all()
    assert dg.removed_classes(plans[1]).sum() == 2 * (dg.group_of_cls == big.id).sum() / big.size
