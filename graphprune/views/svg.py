"""The layer graph drawn as SVG (no Graphviz needed) and as Graphviz DOT.

Layers run top to bottom in data-flow order; each layer box is filled with the colour
of the group whose channels it produces (grey: a pinned group) and says its op, its
output width (``64 -> 32`` after a plan) and that group's id. Joins (``add``, ``cat``,
``mul``) are small circles; edges take the colour of the channels they carry. Boxes are
``<g class="node" data-out="3" data-in="1 2">`` elements, which the HTML view selects.

>>> import torch, graphprune as gp
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> dg = gp.DependencyGraph.build(model, torch.randn(1, 4))
>>> svg = to_svg(dg, {0: [0, 1, 2, 3]})
>>> svg.startswith("<svg"), svg.count('class="node layer'), "8 → 4" in svg
(True, 2, True)
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from graphprune.views.layers import Layer, LayerGraph
from graphprune.views.layout import ROW, Drawing, layout

__all__ = ["to_svg", "layer_dot", "draw", "group_colour", "node_width", "CHAR", "BOX_H", "DEFS", "STYLE"]

CHAR = 6.6  # width of one character at the 11px label font (monospace-ish estimate)
BOX_H = 36
_JOIN = 22
_PINNED = ("#e4e4e4", "#8a8a8a")
_TOP = 12


def group_colour(gid: int, prunable: bool = True) -> tuple[str, str]:
    """Fill and stroke colour of group ``gid`` (golden-angle hues; pinned groups grey)."""
    if not prunable:
        return _PINNED
    hue = (gid * 0.381966) % 1.0

    def hexa(lightness: float, saturation: float) -> str:
        r, g, b = colorsys.hls_to_rgb(hue, lightness, saturation)
        return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"

    return hexa(0.84, 0.75), hexa(0.36, 0.7)


def _second_line(layer: Layer, widths: Mapping[str, tuple[int, int]], planned: bool) -> str:
    if layer.kind != "layer":
        return ""
    parts = [layer.op]
    if layer.name in widths:
        before, after = widths[layer.name]
        parts.append(f"{before} → {after}" if planned else f"{before} ch")
    if layer.out_groups:
        parts.append("g" + ",".join(map(str, layer.out_groups)))
    return " · ".join(parts)


def node_width(layer: Layer, second: str) -> float:
    """Width of a layer's box, from its longer label line."""
    if layer.kind == "join":
        return _JOIN
    return max(len(layer.name), len(second), 4) * CHAR + 16


def _colours(dg: Any, layer: Layer) -> tuple[str, str]:
    if layer.kind in ("input", "output"):
        return "#ffffff", "#555555"
    if not layer.out_groups:
        return "#f4f4f4", "#9a9a9a"
    g = dg.groups[layer.out_groups[0]]
    return group_colour(g.id, g.prunable)


def _path(points: Sequence[tuple[float, float]]) -> str:
    d = [f"M{points[0][0]:.1f},{points[0][1]:.1f}"]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        mid = (y1 - y0) / 2
        d.append(f"C{x0:.1f},{y0 + mid:.1f} {x1:.1f},{y1 - mid:.1f} {x1:.1f},{y1:.1f}")
    return " ".join(d)


def _tooltip(dg: Any, layer: Layer, widths: Mapping[str, tuple[int, int]]) -> str:
    lines = [f"{layer.name} ({layer.op})"]
    if layer.name in widths:
        lines.append("width {} -> {}".format(*widths[layer.name]))
    if layer.out_groups:
        lines.append("produces group " + ", ".join(map(str, layer.out_groups)))
    if layer.in_groups:
        lines.append("reads group " + ", ".join(map(str, layer.in_groups)))
    if layer.norms:
        lines.append("followed by " + ", ".join(layer.norms))
    return "\n".join(lines)


def draw(dg: Any, lg: LayerGraph, plan: Mapping[int, Sequence[int]] | None) -> tuple[list[str], Drawing]:
    """The SVG elements (edges first, then nodes) and the drawing they were placed by."""
    widths = lg.widths(plan)
    seconds = [_second_line(x, widths, plan is not None) for x in lg.layers]
    drawing = layout([node_width(x, s) for x, s in zip(lg.layers, seconds)], lg.edges)
    half = [(_JOIN if x.kind == "join" else BOX_H) / 2 for x in lg.layers]
    out: list[str] = []
    for (a, b), route in zip(lg.edges, drawing.routes):
        pts = [(px, py + _TOP + BOX_H / 2) for px, py in route]
        pts[0] = (pts[0][0], pts[0][1] + half[a])
        pts[-1] = (pts[-1][0], pts[-1][1] - half[b] - 3)
        carried = lg.layers[a].out_groups or lg.layers[a].carries
        gid = carried[0] if carried else -1
        colour = group_colour(gid, dg.groups[gid].prunable)[1] if gid >= 0 else "#9a9a9a"
        out.append(f'<path class="edge" data-group="{gid}" data-from="{a}" data-to="{b}" d="{_path(pts)}" '
                   f'stroke="{colour}" marker-end="url(#arrow)"/>')
    for i, (layer, second, placed) in enumerate(zip(lg.layers, seconds, drawing.nodes)):
        cx, cy = placed.x, placed.row * ROW + _TOP + BOX_H / 2
        fill, stroke = _colours(dg, layer)
        attrs = (f'class="node {layer.kind}" id="layer-{i}" data-name="{escape(layer.name)}" '
                 f'data-out="{" ".join(map(str, layer.out_groups))}" data-in="{" ".join(map(str, layer.in_groups))}"')
        if layer.carries:
            attrs += f' data-carries="{" ".join(map(str, layer.carries))}"'
        tip = f"<title>{escape(_tooltip(dg, layer, widths))}</title>"
        if layer.kind == "join":
            out.append(f'<g {attrs}>{tip}<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{_JOIN / 2}" fill="#ffffff" '
                       f'stroke="#555555"/><text x="{cx:.1f}" y="{cy + 4:.1f}" class="op">'
                       f'{escape(_join_symbol(layer.op))}</text></g>')
            continue
        w = node_width(layer, second)
        rx = BOX_H / 2 if layer.kind in ("input", "output") else 5
        body = (f'<rect x="{cx - w / 2:.1f}" y="{cy - BOX_H / 2:.1f}" width="{w:.1f}" height="{BOX_H}" rx="{rx}" '
                f'fill="{fill}" stroke="{stroke}"/>')
        if second:
            body += (f'<text x="{cx:.1f}" y="{cy - 3:.1f}" class="name">{escape(layer.name)}</text>'
                     f'<text x="{cx:.1f}" y="{cy + 12:.1f}" class="info">{escape(second)}</text>')
        else:
            body += f'<text x="{cx:.1f}" y="{cy + 4:.1f}" class="name">{escape(layer.name)}</text>'
        out.append(f"<g {attrs}>{tip}{body}</g>")
    return out, drawing


def _join_symbol(op: str) -> str:
    return {"add": "+", "iadd": "+", "sub": "−", "mul": "×", "imul": "×", "cat": "⧺", "concat": "⧺",
            "matmul": "@", "bmm": "@"}.get(op, op[:2])


#: the arrow head every edge ends with
DEFS = ('<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'markerUnits="userSpaceOnUse" orient="auto-start-reverse"><path d="M0,0L10,5L0,10z" fill="#777"/>'
        '</marker></defs>')
STYLE = (".edge{fill:none;stroke-width:1.4}"
         ".node text{font-family:'DejaVu Sans Mono',Menlo,Consolas,monospace;text-anchor:middle}"
         ".node .name{font-size:11px;fill:#111}.node .info{font-size:10px;fill:#333}"
         ".node .op{font-size:12px;fill:#222}.node rect,.node circle{stroke-width:1.2}")


def to_svg(dg: Any, plan: Mapping[int, Sequence[int]] | None = None, *, title: str = "") -> str:
    """The layer graph of ``dg`` as a standalone SVG document (widths after ``plan`` if given)."""
    lg = dg.layer_graph()
    elements, drawing = draw(dg, lg, plan)
    w, h = max(drawing.width, 200), drawing.height + 2 * _TOP
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="layers" width="{w:.0f}" height="{h:.0f}" '
            f'viewBox="0 0 {w:.0f} {h:.0f}">')
    parts = [head, f"<title>{escape(title or 'graphprune layer graph')}</title>", f"<style>{STYLE}</style>", DEFS,
             f'<rect width="{w:.0f}" height="{h:.0f}" fill="#ffffff"/>', *elements, "</svg>"]
    return "\n".join(parts)


def layer_dot(dg: Any) -> str:
    """Graphviz DOT text of the layer graph (top to bottom, layers filled with their group's colour)."""
    lg = dg.layer_graph()
    widths = lg.widths()
    lines = ["digraph layers {", "  rankdir=TB;", '  node [fontname="monospace", fontsize=10];']
    for i, layer in enumerate(lg.layers):
        fill, stroke = _colours(dg, layer)
        second = _second_line(layer, widths, False)
        label = layer.name + (f"\\n{second}" if second else "")
        shape = {"join": "circle", "input": "oval", "output": "oval"}.get(layer.kind, "box")
        if layer.kind == "join":
            label = _join_symbol(layer.op)
        label = label.replace('"', '\\"')
        lines.append(f'  n{i} [label="{label}", shape={shape}, style="filled,rounded", fillcolor="{fill}", '
                     f'color="{stroke}", tooltip="{layer.name}"];')
    for a, b in lg.edges:
        carried = lg.layers[a].out_groups or lg.layers[a].carries
        colour = group_colour(carried[0], dg.groups[carried[0]].prunable)[1] if carried else "#9a9a9a"
        lines.append(f'  n{a} -> n{b} [color="{colour}"];')
    lines.append("}")
    return "\n".join(lines)
