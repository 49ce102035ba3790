"""graphprune.views: the layer graph, its layout, the SVG and DOT drawings, the HTML page (as text).

The page is checked in a real browser in tests/test_html.py.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune import views
from graphprune.views.layout import GAP, ROW, layout

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def resnet():
    model, x = gp.zoo.create("mini_resnet50")
    result = gp.prune(model, x, ratio=0.5)
    return result.graph, result.plan, result.model


def _layers(lg, kind="layer"):
    return [x.name for x in lg.layers if x.kind == kind]


def test_layer_graph_is_the_data_flow_of_the_layers(resnet):
    dg, _, _ = resnet
    lg = dg.layer_graph()
    names = _layers(lg)
    convs = [n for n, m in dg.gm.named_modules() if isinstance(m, nn.Conv2d)]
    assert names[0] == "conv1" and names[-1] == "fc" and set(convs) <= set(names)
    assert names.index("layer1.0.conv1") < names.index("layer1.0.conv2") < names.index("layer1.0.conv3")
    index = {x.name: i for i, x in enumerate(lg.layers)}
    edges = set(lg.edges)
    assert (index["layer1.0.conv1"], index["layer1.0.conv2"]) in edges  # through bn and relu
    # a bottleneck's output and its shortcut meet in an add, which feeds the next block
    add = next(j for (i, j) in lg.edges if i == index["layer1.0.conv3"])
    assert lg.layers[add].kind == "join" and lg.layers[add].op == "add"
    assert (index["layer1.0.downsample.0"], add) in edges and (add, index["layer1.1.conv1"]) in edges
    assert all(a < b for a, b in lg.edges)
    # BatchNorms are folded into the layer before them; every layer knows its groups
    conv1 = lg.layers[index["conv1"]]
    assert conv1.norms == ("bn1",) and conv1.width == 16 and conv1.out_groups == (0,)
    g0 = dg.groups[0]
    producers, consumers = lg.group_layers(0)
    assert set(producers) == {m.param.rsplit(".", 1)[0] for m in g0.members if m.role == "out"}
    assert set(consumers) == {m.param.rsplit(".", 1)[0] for m in g0.members if m.role == "in"}
    assert lg.layers[add].carries == lg.layers[index["layer1.0.conv3"]].out_groups  # the add's edges take its colour


def test_widths_after_a_plan(resnet):
    dg, plan, slim = resnet
    lg = dg.layer_graph()
    widths = lg.widths(plan)
    for name, (before, after) in widths.items():
        module = slim.get_submodule(name)
        assert (module.out_channels if hasattr(module, "out_channels") else module.out_features) == after
        assert dg.gm.get_submodule(name).weight.shape[0] == before
    assert lg.widths() == {k: (b, b) for k, (b, _) in widths.items()}


def test_sizes_read_off_a_tensor_are_not_data_flow():
    model, x = gp.zoo.create("mini_vit")  # reshape(B, N, 3, heads, C // heads) reads B, N, C off x
    lg = gp.DependencyGraph.build(model, x).layer_graph()
    assert {x.op for x in lg.layers if x.kind == "join"} == {"add"}


def test_functional_layers_are_named_by_their_weight():
    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 3, 3, 3))
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(torch.nn.functional.conv2d(x, self.w))

    lg = gp.DependencyGraph.build(F(), torch.randn(1, 3, 8, 8)).layer_graph()
    assert _layers(lg) == ["w", "head"]
    assert lg.widths({0: [0, 1]})["w"] == (8, 6)


def test_layout_keeps_order_spacing_and_straight_chains():
    # a diamond with a long skip edge: 0 -> 1 -> 2 -> 3, 0 -> 3
    sizes = [60, 80, 80, 60]
    d = layout(sizes, [(0, 1), (1, 2), (2, 3), (0, 3)])
    assert [n.row for n in d.nodes] == [0, 1, 2, 3]
    assert len(d.routes[3]) == 4  # the skip edge bends once in each row it crosses
    skip_x = [x for x, _ in d.routes[3][1:-1]]
    assert all(abs(x - d.nodes[1].x) >= (80 / 2 + GAP) - 1e-6 for x in skip_x)  # around the nodes, not through
    assert d.nodes[1].x == pytest.approx(d.nodes[2].x)  # a chain is straight
    assert d.height == 4 * ROW and d.width >= max(sizes)
    # siblings in one row never overlap
    d = layout([40, 100, 100, 100, 40], [(0, 1), (0, 2), (0, 3), (1, 4), (2, 4), (3, 4)])
    xs = sorted(n.x for n in d.nodes[1:4])
    assert all(b - a >= 100 + GAP - 1e-6 for a, b in zip(xs, xs[1:]))


def test_svg_draws_every_layer_in_data_flow_order(resnet):
    dg, plan, _ = resnet
    svg = views.to_svg(dg, plan, title="mini_resnet50")
    root = ET.fromstring(svg)  # well-formed XML
    lg = dg.layer_graph()
    nodes = root.findall(f".//{SVG}g")
    assert len(nodes) == len(lg.layers)
    assert len(root.findall(f".//{SVG}path[@class='edge']")) == len(lg.edges)
    names = [g.get("data-name") for g in nodes if "layer" in g.get("class").split()]
    assert names == _layers(lg)
    ys = {g.get("data-name"): float(g.find(f"{SVG}rect").get("y")) for g in nodes if g.find(f"{SVG}rect") is not None}
    assert ys["conv1"] < ys["layer1.0.conv1"] < ys["layer4.2.conv3"] < ys["fc"]  # top to bottom
    width, height = float(root.get("width")), float(root.get("height"))
    assert width < 1000 and height / len(lg.layers) < 80  # a column a reader scrolls, boxes at full size
    sizes = [int(s) for s in re.findall(r"font-size:(\d+)px", root.find(f"{SVG}style").text)]
    assert sizes and min(sizes) >= 10  # readable at 100 %
    assert "16 → 8" in svg  # widths after the plan
    # prunable groups get distinct colours; pinned ones grey
    fills = {}
    for g in nodes:
        rect = g.find(f"{SVG}rect")
        if rect is not None and g.get("data-out"):
            fills.setdefault(int(g.get("data-out").split()[0]), set()).add(rect.get("fill"))
    assert all(len(f) == 1 for f in fills.values())
    prunable = [gid for gid in fills if dg.groups[gid].prunable]
    assert len({next(iter(fills[g])) for g in prunable[:10]}) == 10
    assert fills[dg.layer_graph().layers[-2].out_groups[0]] == {"#e4e4e4"}  # fc: reaches the output


def test_layer_dot_and_networkx(resnet):
    dg, _, _ = resnet
    dot = dg.to_dot(view="layers")
    lg = dg.layer_graph()
    assert dot.startswith("digraph layers {") and dot.rstrip().endswith("}")
    assert dot.count(" -> ") == len(lg.edges) and "layer1.0.conv1\\nConv2d" in dot
    g = dg.to_networkx(view="layers")
    assert g.number_of_nodes() == len(lg.layers) and g.number_of_edges() == len(lg.edges)
    assert g.nodes["conv1"]["out_groups"] == (0,) and g.has_edge("conv1", "layer1.0.conv1")
    assert dg.to_dot().startswith("graph dependency_groups")  # the default view is unchanged
    with pytest.raises(gp.InputError, match="view must be"):
        dg.to_dot(view="nosuch")


def test_html_is_one_self_contained_page(resnet):
    dg, plan, _ = resnet
    page = views.to_html(dg, plan, title="mini_resnet50")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"<link|<img|src=|@import|url\((?!#)", page)  # nothing fetched
    assert re.findall(r"https?://[^\"' )]+", page) == ["http://www.w3.org/2000/svg"]  # a namespace, not fetched
    assert page.count('<li class="group') == len(dg.groups)
    for g in dg.groups:
        assert f'data-group="{g.id}"' in page
    pinned = next(g for g in dg.groups if not g.prunable)
    assert pinned.reason in page  # why a group is pinned
    assert "layer4.2.conv3" in page and "plan removes" in page
    assert page.count("<tr><td>") >= len(dg.layer_graph().widths())  # the widths table


def test_html_without_plan_and_small_models():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    page = views.to_html(gp.DependencyGraph.build(model, torch.randn(1, 4)))
    assert page.count('<li class="group') == 2 and "plan removes" not in page


def test_inputs_that_are_none_or_flags_are_not_drawn():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)

        def forward(self, x, attn_mask=None, is_causal=False):
            q, k, v = self.qkv(x).chunk(3, -1)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
            return self.proj(y)

    model = Attn().eval()
    dg = gp.DependencyGraph.build(model, torch.randn(2, 5, 8))
    assert [n.name for n in dg.gm.graph.nodes if n.op == "placeholder"] == ["x", "attn_mask", "is_causal"]
    lg = dg.layer_graph()
    assert [x.name for x in lg.layers if x.kind == "input"] == ["x"]
    assert not [x for x in lg.layers if x.kind == "join"]  # q, k, v come from one layer
