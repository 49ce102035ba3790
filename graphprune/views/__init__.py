"""Views of a dependency graph for people: the layer graph as SVG, DOT and one HTML page.

- ``to_svg(dg, plan=None)``: the data-flow graph of the layers, groups coloured
  (``graphprune inspect --svg``);
- ``to_html(dg, plan=None, ...)`` / ``write_html(path, dg, ...)``: a self-contained page
  (inline SVG, CSS and script; nothing fetched) with the layer graph, the groups listed
  and selectable (a click, or ``#group=ID`` in the address), each group's layers,
  members, pinned reason, and per-layer widths before and after a plan
  (``graphprune inspect --html``, ``graphprune prune --report``);
- ``DependencyGraph.layer_graph()`` (``graphprune.views.layers``): what they draw.
"""

from __future__ import annotations

from graphprune.views.html import to_html, write_html
from graphprune.views.layers import Layer, LayerGraph, layer_graph
from graphprune.views.svg import layer_dot, to_svg

__all__ = ["to_svg", "to_html", "write_html", "layer_dot", "layer_graph", "Layer", "LayerGraph"]
