"""A layered drawing of a DAG (top to bottom), without Graphviz.

``layout(sizes, edges)`` places nodes of given widths on rows: a node's row is one below
its lowest predecessor (the longest path from an input); an edge that spans several rows
is routed through one bend point per row it crosses, and those points take part in the
ordering, so edges go around nodes instead of through them. Within a row, nodes are
ordered by the barycentre of their neighbours (sweeps down and up), then placed as close
to their neighbours as the row's order and spacing allow: each row's positions solve a
least-squares problem under ordering constraints (pool-adjacent-violators), so a chain
of layers is a straight line and a branch sits beside it.

>>> pos = layout([40, 40, 40, 40], [(0, 1), (0, 2), (1, 3), (2, 3)])
>>> [n.row for n in pos.nodes], pos.nodes[1].x < pos.nodes[2].x, pos.nodes[0].x == pos.nodes[3].x
([0, 1, 1, 2], True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Placed", "Drawing", "layout", "ROW", "GAP"]

ROW = 64  # distance between rows
GAP = 24  # horizontal space between neighbours in a row
_BEND = 8  # width a bend point takes in its row


@dataclass
class Placed:
    """A node's row and the x of its centre."""

    row: int
    x: float = 0.0


@dataclass
class Drawing:
    """Placed nodes, each edge's points from source to target (bends included), and the size."""

    nodes: list[Placed]
    routes: list[list[tuple[float, float]]] = field(default_factory=list)
    width: float = 0.0
    height: float = 0.0


def _rows(n: int, edges: Sequence[tuple[int, int]]) -> list[int]:
    preds: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        preds[b].append(a)
    row = [0] * n
    for v in range(n):  # nodes come in topological order (a traced graph's order)
        row[v] = max((row[u] + 1 for u in preds[v]), default=0)
    return row


def _place(desired: list[float], widths: list[float]) -> list[float]:
    """Positions closest to ``desired`` (least squares) keeping the order and the spacing."""
    offsets = [0.0]
    for a, b in zip(widths, widths[1:]):
        offsets.append(offsets[-1] + (a + b) / 2 + GAP)
    blocks: list[list[float]] = []  # [mean, count] of pooled shifted targets
    for d, off in zip(desired, offsets):
        blocks.append([d - off, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, c2 = blocks.pop()
            m1, c1 = blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    out: list[float] = []
    for mean, count in blocks:
        out.extend([mean] * int(count))
    return [y + off for y, off in zip(out, offsets)]


def layout(sizes: Sequence[float], edges: Sequence[tuple[int, int]], *, sweeps: int = 6) -> Drawing:
    """Place nodes of widths ``sizes`` (indices in topological order) joined by ``edges``."""
    n = len(sizes)
    rows = _rows(n, edges)
    row_of = list(rows)
    width = [float(s) for s in sizes]
    chains: list[list[int]] = []  # each edge as the vertices it passes, bends included
    for a, b in edges:
        chain = [a]
        for r in range(rows[a] + 1, rows[b]):
            row_of.append(r)
            width.append(_BEND)
            chain.append(len(row_of) - 1)
        chains.append([*chain, b])
    up: list[list[int]] = [[] for _ in row_of]
    down: list[list[int]] = [[] for _ in row_of]
    for chain in chains:
        for u, v in zip(chain, chain[1:]):
            down[u].append(v)
            up[v].append(u)
    n_rows = max(row_of, default=-1) + 1
    layers: list[list[int]] = [[] for _ in range(n_rows)]
    for v in range(len(row_of)):  # first appearance: the traced order, bends after their source
        layers[row_of[v]].append(v)
    pos = {v: float(i) for layer in layers for i, v in enumerate(layer)}

    def reorder(layer: list[int], nbrs: list[list[int]]) -> None:
        def key(v: int) -> float:
            return sum(pos[u] for u in nbrs[v]) / len(nbrs[v]) if nbrs[v] else pos[v]
        layer.sort(key=key)
        for i, v in enumerate(layer):
            pos[v] = float(i)

    for sweep in range(sweeps):
        for layer in (layers[1:] if sweep % 2 == 0 else reversed(layers[:-1])):
            reorder(layer, up if sweep % 2 == 0 else down)
    x: dict[int, float] = {}
    for layer in layers:  # left to right at minimal spacing, then pulled towards neighbours
        x.update(zip(layer, _place([0.0] * len(layer), [width[v] for v in layer])))
    for sweep in range(2 * sweeps):
        order = layers[1:] if sweep % 2 == 0 else list(reversed(layers[:-1]))
        for layer in order:
            desired = []
            for v in layer:
                nb = (up[v] if sweep % 2 == 0 else down[v]) + ([] if sweep < sweeps else up[v] + down[v])
                desired.append(sum(x[u] for u in nb) / len(nb) if nb else x[v])
            x.update(zip(layer, _place(desired, [width[v] for v in layer])))
    left = min((x[v] - width[v] / 2 for v in x), default=0.0)
    for v in x:
        x[v] -= left - GAP
    drawing = Drawing([Placed(rows[v], x[v]) for v in range(n)])
    drawing.routes = [[(x[v], row_of[v] * ROW) for v in chain] for chain in chains]
    drawing.width = max((x[v] + width[v] / 2 for v in x), default=0.0) + GAP
    drawing.height = n_rows * ROW
    return drawing
