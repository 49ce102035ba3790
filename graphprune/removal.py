"""What a plan removes from a dependency graph, computed once and asked by every stage.

``Removal(dg, plan)`` answers, without building anything: which positions of a
labelled axis survive (``keep``), the slim shape of any node (``of``) or parameter
(``param``), which parameter axes lose which positions (``cuts``), and which layers
lose every channel (``vanished``) and whether that breaks the graph (``problems``).
The rewrite slices by it, the estimator counts with it (it is a ``rules.base.Shapes``),
LEAN re-indexes kernel masks with it, and ``repair`` mends plans that would empty an
axis that must keep a channel.

>>> import torch, graphprune as gp
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
>>> dg = gp.DependencyGraph.build(model, torch.randn(1, 3, 16, 16))
>>> removal = Removal(dg, {0: [1, 2, 5]})
>>> conv = next(n for n in dg.gm.graph.nodes if n.target == "0")
>>> removal.of(conv), removal.param("2.weight")
((1, 5, 14, 14), (4, 5, 1, 1))
>>> {name: {d: idx.tolist() for d, idx in dims.items()} for name, dims in removal.cuts().items()}
{'0.weight': {0: [0, 3, 4, 6, 7]}, '0.bias': {0: [0, 3, 4, 6, 7]}, '2.weight': {1: [0, 3, 4, 6, 7]}}
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx

from graphprune.plan import Plan
from graphprune.rules.base import CONCAT, Multi, find_rule, iter_arrays

if TYPE_CHECKING:
    from graphprune.graph import DependencyGraph

__all__ = ["Removal", "EmptiedAxes", "repair", "vanish_problems"]


def _reads_empty_input(user: torch.fx.Node) -> bool:
    """Whether ``user`` still works when one of its inputs has lost every channel (a concat)."""
    if user.op != "call_function":
        return False
    rule = find_rule(user, None)
    return rule is not None and rule.kind == CONCAT


def vanish_problems(node: torch.fx.Node, vanished: Container[str]) -> list[str]:
    """Users of a vanished ``node`` that cannot do without it (all but vanishing ones and concats)."""
    return [f"{node.name!r} feeds {user.name!r} ({user.op} {getattr(user.target, '__name__', user.target)})"
            for user in node.users if user.name not in vanished and not _reads_empty_input(user)]


class Removal:
    """The effect of ``plan`` on ``dg``: keep masks, slim shapes, cut tensors, emptied layers."""

    def __init__(self, dg: DependencyGraph, plan: Plan | Mapping[int, Any]) -> None:
        self.dg = dg
        self.plan = plan if isinstance(plan, Plan) else Plan(plan)
        self.removed = dg.removed_classes(self.plan)

    def keep(self, labels: np.ndarray) -> np.ndarray:
        """Which positions of a labelled axis survive."""
        return self.dg.keep_mask(labels, self.removed)

    def slim_shape(self, shape: Any, labels: Any) -> Any:
        """``shape`` (a ``torch.Size`` or nested tuples of them) with labelled axes narrowed."""
        if isinstance(shape, torch.Size):
            if type(labels) is not tuple:
                return tuple(shape)
            labels = labels + (None,) * (len(shape) - len(labels))
            return tuple(int(self.keep(lab).sum()) if lab is not None else s for s, lab in zip(shape, labels))
        if isinstance(shape, tuple) and isinstance(labels, Multi):
            return tuple(self.slim_shape(s, lab) for s, lab in zip(shape, labels))
        return shape

    def of(self, x: Any) -> Any:
        """The slim shape of node ``x``'s output (None for constants)."""
        if not isinstance(x, torch.fx.Node):
            return None
        return self.slim_shape(x.meta.get("shape"), self.dg.node_labels.get(x.name))

    def param(self, name: str) -> tuple[int, ...] | None:
        """The slim shape of parameter or buffer ``name`` of the original model."""
        shape = self.dg.state_shapes.get(name)
        if shape is None:
            return None
        labels = self.dg.member_labels
        return tuple(int(self.keep(labels[(name, d)]).sum()) if (name, d) in labels else s
                     for d, s in enumerate(shape))

    def cuts(self) -> dict[str, dict[int, np.ndarray]]:
        """Kept positions of every parameter/buffer axis that loses channels."""
        cuts: dict[str, dict[int, np.ndarray]] = {}
        for (param, dim), labels in self.dg.member_labels.items():
            keep = self.keep(labels)
            if not keep.all():
                cuts.setdefault(param, {})[dim] = np.flatnonzero(keep)
        return cuts

    @cached_property
    def _vanish(self) -> tuple[set[str], list[str]]:
        vanished: set[str] = set()
        nodes = list(self.dg.gm.graph.nodes)
        for node in nodes:
            if any(arr.size and not self.keep(arr).any() for arr in iter_arrays(self.dg.node_labels.get(node.name))):
                vanished.add(node.name)
        problems = [p for node in nodes if node.name in vanished for p in vanish_problems(node, vanished)]
        return vanished, problems

    @property
    def vanished(self) -> set[str]:
        """Nodes whose output loses every channel of an axis (layers that disappear)."""
        return self._vanish[0]

    @property
    def problems(self) -> list[str]:
        """Why the vanished layers break the graph (readers that need them); empty if they do not."""
        return self._vanish[1]


class EmptiedAxes:
    """Every labelled axis of every node, flattened, to tell in one pass whether a plan empties one."""

    def __init__(self, dg: DependencyGraph) -> None:
        self.dg = dg
        # the channel classes of every axis (what a plan removes), each distinct sequence once:
        # most axes repeat another's (views, pass-through ops, a residual stream), and an axis
        # empties exactly when another with the same classes does
        seen_views: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
        seen: set[bytes] = set()
        parts = []
        for node in dg.gm.graph.nodes:
            for arr in iter_arrays(dg.node_labels.get(node.name)):
                view = (arr.__array_interface__["data"][0], arr.shape, arr.strides)
                if not arr.size or view in seen_views:
                    continue
                seen_views.add(view)
                classes = dg.cls[arr].reshape(-1)
                key = classes.tobytes()
                if key not in seen:
                    seen.add(key)
                    parts.append(classes)
        self.classes = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        self.starts = np.cumsum([0] + [len(a) for a in parts[:-1]]) if parts else np.zeros(0, np.int64)
        self.n = len(parts)

    def any_empty(self, removed: np.ndarray) -> bool:
        if not self.n:
            return False
        return not bool(np.logical_or.reduceat(~removed[self.classes], self.starts).all())


def repair(dg: DependencyGraph, plan: Plan, scores: Mapping[int, np.ndarray],
           axes: EmptiedAxes | None = None) -> Plan:
    """Give back the best-scored channels of any tensor axis the plan would empty.

    A group that keeps channels can still empty an axis where it is split (a
    ``chunk`` of a channel-shuffled tensor); such a plan cannot be rewritten unless the
    emptied layer only feeds concatenations.
    """
    if axes is not None and not axes.any_empty(dg.removed_classes(plan)):
        return plan
    removed_sets = {gid: set(ch) for gid, ch in plan.items()}
    nodes = {n.name: n for n in dg.gm.graph.nodes}
    for _ in range(10_000):
        removal = Removal(dg, {g: sorted(c) for g, c in removed_sets.items()})
        vanished = removal.vanished
        if not removal.problems:
            break
        restored = False
        for name in vanished:
            node = nodes[name]
            if all(u.name in vanished or _reads_empty_input(u) for u in node.users):
                continue
            for arr in iter_arrays(dg.node_labels.get(name)):
                if not arr.size or removal.keep(arr).any():
                    continue
                cls = dg.cls[arr]
                best = max(((float(scores[g][c]) if g in scores else 0.0, int(g), int(c))
                            for g, c in zip(dg.group_of_cls[cls], dg.chan_of_cls[cls])
                            if g >= 0 and int(c) in removed_sets.get(int(g), ())), default=None)
                if best is not None:
                    removed_sets[best[1]].discard(best[2])
                    restored = True
                    break
            if restored:
                break
        if not restored:
            break
    return Plan({g: sorted(c) for g, c in removed_sets.items()})
