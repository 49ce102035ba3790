"""One self-contained HTML page of a model's groups: ``to_html(dg, plan)``, ``write_html``.

The page holds everything inline (SVG, CSS, a short script; no network, no external
files): the layer graph (``graphprune.views.svg``) on the left; on the right the groups,
one ``<li class="group" data-group="ID">`` each with its colour, size and status. A click
on a group (or on a layer, or ``#group=ID`` in the address) selects it: its producing
layers are outlined in bold, the layers reading it in dashes, everything else fades,
and its details open (producers, consumers, other members, why it is pinned or
inexact, every parameter slice, widths before and after the plan). Below, a table
gives every layer's width before and after the plan. ``body[data-selected]`` names the
selected group and ``body[data-highlighted]`` how many layers it lit up.

>>> import torch, graphprune as gp
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> page = to_html(gp.DependencyGraph.build(model, torch.randn(1, 4)), title="mlp")
>>> page.count('<li class="group'), "http" in page.replace('http://www.w3.org/2000/svg', '')
(2, False)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from graphprune.views.svg import DEFS, STYLE, draw, group_colour

__all__ = ["to_html", "write_html"]

_CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;color:#1a1a1a;background:#fafafa}
header{padding:10px 16px;border-bottom:1px solid #ddd;background:#fff}
header h1{font-size:18px;margin:0 0 4px}
header p{margin:0;color:#444}
main{display:grid;grid-template-columns:minmax(0,1fr) 440px;height:calc(100vh - 64px)}
#graph{overflow:auto;background:#fff;border-right:1px solid #ddd;text-align:center}
#side{overflow:auto;padding:8px 12px;position:relative}
#filter{width:100%;padding:6px 8px;margin:4px 0 8px;border:1px solid #bbb;border-radius:4px}
ol#groups{list-style:none;margin:0;padding:0}
.group{border:1px solid #ddd;border-radius:6px;margin:0 0 6px;padding:6px 8px;background:#fff;cursor:pointer}
.group:hover{border-color:#888}
.group.selected{border:2px solid #222;cursor:default}
.group .head{display:flex;gap:8px;align-items:baseline}
.swatch{display:inline-block;width:14px;height:14px;border-radius:3px;border:1px solid #0004;flex:none}
.group .status{color:#555;font-size:12px}
.group.pinned .status{color:#8a3b12}
.detail{display:none;margin-top:6px;font-size:13px}
.group.selected .detail{display:block}
.detail dt{font-weight:600;margin-top:4px}.detail dd{margin:0 0 0 12px;word-break:break-word}
table{border-collapse:collapse;font-size:12px}
td,th{padding:2px 6px;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:8px;background:#4a7bd0;vertical-align:middle}
#widths{padding:8px 16px 24px}
svg.layers .node{cursor:pointer}
svg.layers.dimmed .node:not(.sel-out):not(.sel-in):not(.sel-join){opacity:.22}
svg.layers.dimmed .edge:not(.sel){opacity:.12}
svg.layers .node.sel-out rect,svg.layers .node.sel-out circle{stroke:#000;stroke-width:3.5}
svg.layers .node.sel-in rect,svg.layers .node.sel-in circle{stroke:#000;stroke-width:2.5;stroke-dasharray:5 3}
svg.layers .edge.sel{stroke-width:3}
"""

_JS = """
(function () {
  var svg = document.querySelector('svg.layers');
  function has(list, gid) { return (list || '').split(' ').indexOf(String(gid)) >= 0; }
  function select(gid, scroll) {
    document.querySelectorAll('.group.selected').forEach(function (e) { e.classList.remove('selected'); });
    document.querySelectorAll('.node').forEach(function (n) { n.classList.remove('sel-out', 'sel-in', 'sel-join'); });
    document.querySelectorAll('.edge.sel').forEach(function (e) { e.classList.remove('sel'); });
    var li = document.querySelector('.group[data-group="' + gid + '"]');
    if (!li) { document.body.dataset.selected = ''; svg.classList.remove('dimmed'); return; }
    li.classList.add('selected');
    svg.classList.add('dimmed');
    var first = null, lit = 0;
    document.querySelectorAll('.node').forEach(function (n) {
      if (has(n.dataset.out, gid)) { n.classList.add('sel-out'); first = first || n; lit++; }
      else if (has(n.dataset.in, gid)) { n.classList.add('sel-in'); lit++; }
      else if (has(n.dataset.carries, gid)) { n.classList.add('sel-join'); }
    });
    document.querySelectorAll('.edge[data-group="' + gid + '"]').forEach(function (e) { e.classList.add('sel'); });
    document.body.dataset.selected = String(gid);
    document.body.dataset.highlighted = String(lit);
    var pane = document.getElementById('graph'), side = document.getElementById('side');
    if (scroll && first) {  // scroll the panes, not the page
      var box = first.getBBox();
      pane.scrollTop = Math.max(0, box.y - pane.clientHeight / 2);
      pane.scrollLeft = Math.max(0, box.x + box.width / 2 - pane.clientWidth / 2);
    }
    if (li.offsetTop < side.scrollTop || li.offsetTop > side.scrollTop + side.clientHeight - 80) {
      side.scrollTop = Math.max(0, li.offsetTop - 60);
    }
  }
  document.querySelectorAll('.group').forEach(function (li) {
    li.addEventListener('click', function () {
      select(li.dataset.group, true);
      try { history.replaceState(null, '', '#group=' + li.dataset.group); } catch (e) { /* file: URLs */ }
    });
  });
  document.querySelectorAll('.node').forEach(function (n) {
    n.addEventListener('click', function () {
      var gid = (n.dataset.out || '').split(' ')[0];
      var li = gid && document.querySelector('.group[data-group="' + gid + '"]');
      if (li) { li.click(); }
    });
  });
  var filter = document.getElementById('filter');
  filter.addEventListener('input', function () {
    var q = filter.value.toLowerCase();
    document.querySelectorAll('.group').forEach(function (li) {
      li.style.display = !q || li.dataset.layers.indexOf(q) >= 0 ? '' : 'none';
    });
  });
  function fromHash() {
    var m = location.hash.match(/group=(\\d+)/);
    var li = m && document.querySelector('.group[data-group="' + m[1] + '"]');
    if (li) { li.click(); }
  }
  window.addEventListener('hashchange', fromHash);
  fromHash();
  document.body.dataset.ready = '1';
})();
"""


def _names(names: Sequence[str]) -> str:
    return escape(", ".join(names)) if names else "<i>none</i>"


def _module(param: str) -> str:
    owner, _, attr = param.rpartition(".")
    return owner if owner and attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked") \
        else param


def _group_item(dg: Any, g: Any, lg: Any, plan: Mapping[int, Sequence[int]] | None,
                widths: Mapping[str, tuple[int, int]]) -> str:
    fill, stroke = group_colour(g.id, g.prunable)
    producers, consumers = lg.group_layers(g.id)
    others = list(dict.fromkeys(_module(m.param) for m in g.members if m.role not in ("out", "in")))
    others = [o for o in others if o not in producers and o not in consumers]
    removed = len(plan.get(g.id, ())) if plan is not None else None
    if g.prunable:
        status = "prunable" + (", removable" if g.removable else "")
        status += "" if g.exact else " (inexact)"
    else:
        status = "pinned"
    if removed is not None:
        status += f"; plan removes {removed} of {g.size}"
    rows = [f"<dt>produced by</dt><dd>{_names(producers)}</dd>",
            f"<dt>read by</dt><dd>{_names(consumers)}</dd>"]
    if others:
        rows.append(f"<dt>also</dt><dd>{_names(others)}</dd>")
    if not g.prunable:
        rows.append(f'<dt>pinned because</dt><dd class="reason">{escape(g.reason)}</dd>')
    if not g.exact:
        rows.append(f'<dt>inexact because</dt><dd class="reason">{escape(g.inexact_reason)}</dd>')
    layer_rows = "".join(f"<tr><td>{escape(n)}</td><td class=n>{widths[n][0]}</td><td class=n>{widths[n][1]}</td></tr>"
                         for n in producers if n in widths)
    if layer_rows:
        rows.append("<dt>widths</dt><dd><table><tr><th>layer</th><th>before</th><th>after</th></tr>"
                    f"{layer_rows}</table></dd>")
    member_rows = "".join(f"<tr><td>{escape(m.param)}</td><td class=n>{m.dim}</td><td>{m.role}</td>"
                          f"<td class=n>{len(m.positions)}</td></tr>" for m in g.members)
    rows.append(f"<dt>members</dt><dd><details><summary>{len(g.members)} parameter slices</summary><table>"
                f"<tr><th>tensor</th><th>dim</th><th>role</th><th>positions</th></tr>{member_rows}</table>"
                "</details></dd>")
    search = " ".join([*producers, *consumers, *others]).lower()
    return (f'<li class="group {"prunable" if g.prunable else "pinned"}" data-group="{g.id}" '
            f'data-layers="{escape(search)}" tabindex="0"><div class="head">'
            f'<span class="swatch" style="background:{fill};border-color:{stroke}"></span>'
            f"<b>group {g.id}</b><span>{g.size} ch</span>"
            f'<span class="status">{escape(status)}</span></div>'
            f'<dl class="detail">{"".join(rows)}</dl></li>')


def _widths_table(lg: Any, widths: Mapping[str, tuple[int, int]], planned: bool) -> str:
    rows = []
    for layer in lg.layers:
        if layer.name not in widths:
            continue
        before, after = widths[layer.name]
        kept = after / before if before else 1.0
        groups = ",".join(map(str, layer.out_groups))
        rows.append(f"<tr><td>{escape(layer.name)}</td><td>{escape(layer.op)}</td><td class=n>{groups}</td>"
                    f"<td class=n>{before}</td><td class=n>{after}</td><td class=n>{kept:.0%} "
                    f'<span class="bar" style="width:{60 * kept:.0f}px"></span></td></tr>')
    title = "Layer widths before and after the plan" if planned else "Layer widths"
    return (f'<section id="widths"><h2>{title}</h2><table><tr><th>layer</th><th>op</th><th>group</th>'
            f"<th>before</th><th>after</th><th>kept</th></tr>{''.join(rows)}</table></section>")


def to_html(dg: Any, plan: Mapping[int, Sequence[int]] | None = None, *, title: str = "",
            before: Any = None, after: Any = None) -> str:
    """The page for ``dg`` (see the module docstring). ``plan`` adds widths after it;
    ``before`` (and ``after``; ``gp.Counts``) add parameters and MACs to the header."""
    lg = dg.layer_graph()
    elements, drawing = draw(dg, lg, plan)
    widths = lg.widths(plan)
    w, h = max(drawing.width, 200), drawing.height + 24
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" class="layers" width="{w:.0f}" height="{h:.0f}" '
           f'viewBox="0 0 {w:.0f} {h:.0f}">{DEFS}{"".join(elements)}</svg>')
    n_prunable = sum(g.prunable for g in dg.groups)
    summary = (f"{len(dg.groups)} groups, {n_prunable} prunable, "
               f"{sum(g.size for g in dg.groups if g.prunable):,} prunable channels, "
               f"{sum(x.kind == 'layer' for x in lg.layers)} layers")
    if plan is not None:
        summary += f"; the plan removes {sum(len(v) for v in plan.values()):,} channels"
    if before is not None and after is not None:
        summary += (f"; parameters {before.params:,} → {after.params:,}, MACs {before.macs:,} → {after.macs:,}")
    elif before is not None:
        summary += f"; {before.params:,} parameters, {before.macs:,} MACs"
    items = "".join(_group_item(dg, g, lg, plan, widths) for g in dg.groups)
    name = escape(title or "model")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>graphprune: {name}</title><style>{_CSS}{STYLE}</style></head>"
            f'<body data-selected="" data-highlighted="0"><header><h1>{name}: dependency groups</h1>'
            f"<p>{escape(summary)}. Click a group or a layer (or open #group=ID) to see its layers.</p></header>"
            f'<main><section id="graph">{svg}</section><aside id="side">'
            '<input id="filter" type="search" placeholder="filter groups by layer name">'
            f'<ol id="groups">{items}</ol></aside></main>{_widths_table(lg, widths, plan is not None)}'
            f"<script>{_JS}</script></body></html>\n")


def write_html(path: str | os.PathLike, dg: Any, plan: Mapping[int, Sequence[int]] | None = None, **kw: Any) -> Path:
    """Write ``to_html(dg, plan, **kw)`` to ``path``; return the path."""
    path = Path(path)
    path.write_text(to_html(dg, plan, **kw), encoding="utf-8")
    return path
