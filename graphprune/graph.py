"""Dependency graph: channel spaces of a traced model, coupled by op rules, grouped.

Every channel of every layer output is an *element*. Rules (``graphprune.rules``) walk
the traced graph once, in order, and record which elements must be removed together
(a residual add couples the two branches channel by channel; a BatchNorm's parameters
follow its input; a concat places its inputs' channels side by side). Union-find over
those couplings gives *channel classes*; classes that share a producer (one layer's
output channels) form a *group*, the unit a plan prunes.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
...                             torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
>>> dg = DependencyGraph.build(model, torch.randn(1, 3, 16, 16))
>>> [(g.size, g.prunable) for g in dg.groups]
[(8, True), (4, False)]
>>> sorted({m.param for m in dg.groups[0].members})
['0.bias', '0.weight', '1.bias', '1.running_mean', '1.running_var', '1.weight', '3.weight']
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.fx

from graphprune.components import components
from graphprune.errors import InputError
from graphprune.groups import Group, Member
from graphprune.labels import KIND_CODES, PINNED, PRODUCER, BuildContext, _aliases
from graphprune.removal import vanish_problems
from graphprune.rules.base import find_rule, iter_arrays, unlabelled  # noqa: F401  (importable from here too)
from graphprune.tracing import bind_inputs, code_fingerprints, named_state, trace
from graphprune.views.layers import LayerGraph, layers_text

__all__ = ["DependencyGraph", "Group", "Member", "BuildContext"]


def _check_view(view: str) -> None:
    if view not in ("groups", "layers"):
        raise InputError(f"view must be 'groups' or 'layers', got {view!r}")


def _uncovered(model: torch.nn.Module, dg: DependencyGraph) -> dict[str, str]:
    """Every parameter of ``model`` that no group holds, with the reason."""
    held = {m.param for g in dg.groups for m in g.members}
    canonical = {alias: first for first, alias in _aliases(model)}
    calls = {n.target: n for n in dg.gm.graph.nodes if n.op == "call_module"}
    used = {n.target for n in dg.gm.graph.nodes if n.op in ("call_module", "get_attr")}
    modules = dict(dg.gm.named_modules())
    out: dict[str, str] = {}
    for name, _ in model.named_parameters():
        name = canonical.get(name, name)
        if name in held or name in out:
            continue
        owner = name.rpartition(".")[0]
        holders = [p for p in (owner.split(".")[:i] for i in range(owner.count(".") + 1, -1, -1))]
        call = next((calls[".".join(p)] for p in holders if ".".join(p) in calls), None)
        if call is not None and find_rule(call, modules.get(call.target)) is None:
            out[name] = f"inside {type(modules[call.target]).__name__} module {call.target!r}, which has no rule"
        elif call is not None:
            out[name] = f"{type(modules[call.target]).__name__} module {call.target!r} keeps this tensor whole"
        elif not any(name == u or name.startswith(u + ".") for u in used) and \
                not any(u.startswith(owner + ".") or u == owner for u in used if owner):
            out[name] = "not used by the traced forward"
        else:
            out[name] = "none of its axes is a channel axis of a layer (kept whole)"
    return out


def _join(reasons: list[str]) -> str:
    """Reasons joined; those that differ only in the node they name are said once.

    >>> _join(["op (node 'a') pads", "op (node 'b') pads", "other"])
    "op pads (nodes 'a', 'b'); other"
    """
    merged: dict[tuple[str, str], list[str]] = {}
    for why in reasons:
        m = re.fullmatch(r"(.*?) \(node '([^']+)'\)(.*)", why, flags=re.DOTALL)
        key, node = ((m.group(1), m.group(3)), m.group(2)) if m else ((why, ""), "")
        merged.setdefault(key, []).append(node)
    said = []
    for (head, tail), nodes in merged.items():
        if len(nodes) == 1:
            said.append(f"{head} (node '{nodes[0]}'){tail}" if nodes[0] else head)
        else:
            names = ", ".join(f"'{n}'" for n in nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
            said.append(f"{head}{tail} (nodes {names})")
    return "; ".join(said[:3]) + (f"; and {len(said) - 3} more" if len(said) > 3 else "")


class DependencyGraph:
    """Groups of coupled channels of a model, and the traced graph they live in.

    Build it with ``DependencyGraph.build(model, example_inputs)``. The traced module
    shares its submodules with ``model``; nothing is copied or changed.
    """

    def __init__(self, gm: torch.fx.GraphModule, ctx: BuildContext) -> None:
        self.gm = gm
        self.inexact_marks = ctx._inexact
        self.node_info = ctx.node_info
        self.width_values = ctx.width_values
        self.width_axes = ctx.width_axes
        self.node_labels = ctx.node_labels
        self.member_labels = ctx.member_labels
        self.member_roles = ctx.member_roles
        self.member_operands = ctx.member_operands
        self.state_shapes = {k: tuple(v.shape) for k, v in ctx.state.items()}
        self.n_elements = ctx.n_elements
        self.roots = ctx.roots
        cls, kinds = ctx.finish()
        self._group_classes(cls, kinds)

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        example_inputs: Any,
        *,
        leaf_modules: Iterable[type | str] = (),
        concrete_args: dict | None = None,
        factor: str = "largest",
        grouped: str = "channels",
        check: bool = True,
    ) -> DependencyGraph:
        """Trace ``model`` on ``example_inputs`` and group its coupled channels.

        ``factor`` says what to prune where a reshape splits channels over several
        axes: ``"largest"`` (per-head dims of attention, within-group channels of a
        channel shuffle) or ``"heads"`` (whole attention heads). ``grouped`` says how
        grouped convolutions shrink: ``"channels"`` (default) removes the same
        positions from every conv group (``groups`` stays, each group narrows; the
        weight loses input and output columns), ``"groups"`` whole conv groups
        (``groups`` shrinks). Depthwise convs (one input channel per group) always
        lose whole groups.

        ``check=False`` is the fast mode: the traced graph is **not** compared with an
        eager run of the model (one forward pass fewer; the shapes still come from one
        real run of the graph). A torch.fx graph that computes something else than the
        model (Python that symbolic tracing records differently, see
        ``graphprune.fidelity``) then goes undetected, where the default check replaces
        it with the torch.export graph or refuses it. For a faithfully traced model the
        groups are the default's. Pair it with ``apply(..., check=False)`` (no check run
        of the slim model) and verify the slim model (``graphprune.verify``) before
        relying on it.

        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
        >>> fast = DependencyGraph.build(model, torch.randn(1, 3, 16, 16), check=False)
        >>> [(g.size, g.prunable) for g in fast.groups]
        [(8, True), (4, False)]
        """
        gm = trace(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args, check=check)
        ctx = BuildContext(gm, factor=factor, grouped=grouped)
        ctx.run()
        dg = cls(gm, ctx)
        dg.build_options = {"leaf_modules": [t if isinstance(t, str) else f"{t.__module__}:{t.__qualname__}"
                                             for t in leaf_modules],
                            "factor": factor, "grouped": grouped}
        dg.state_shapes = {k: tuple(v.shape) for k, v in named_state(model).items()}
        dg.code = code_fingerprints(model)  # apply refuses a model whose forward code differs
        dg.uncovered = _uncovered(model, dg)
        bound = bind_inputs(model, example_inputs)
        dg.example_names, dg.example_constants = bound.names, dict(bound.constants)
        dg.example = bound  # the module form is checked on these (run on fresh copies, never changed)
        inputs = bound.tensors
        dg.example_shapes = [tuple(x.shape) for x in inputs]
        dg.example_dtypes = [x.dtype for x in inputs]
        dg._mark_removable()
        return dg

    # --- grouping -------------------------------------------------------------------------
    def _group_classes(self, cls: np.ndarray, kinds: np.ndarray) -> None:
        n_cls = int(cls.max()) + 1 if cls.size else 0
        # ids (element, class, root, group) as int32 when they fit: these tables are one or
        # two ints per element, the largest memory of a build
        idx = np.int32 if max(len(cls), len(self.roots)) < np.iinfo(np.int32).max else np.int64
        # Classes that share a producer (one layer's outputs) belong to one group.
        is_producer = kinds == KIND_CODES[PRODUCER]
        root_of = np.repeat(np.arange(len(self.roots), dtype=idx), [r.size for r in self.roots])
        produced = np.flatnonzero(is_producer)  # ascending, so grouped by root
        _, first, which = np.unique(root_of[produced], return_index=True, return_inverse=True)
        s, d = cls[produced[first]][which.reshape(-1)], cls[produced]  # each to its root's first class
        del produced, first, which
        comp = components(n_cls, s, d)
        del s, d

        has_producer = np.zeros(n_cls, bool)
        has_producer[cls[is_producer]] = True
        first_elem = np.full(n_cls, np.iinfo(idx).max, dtype=idx)
        np.minimum.at(first_elem, cls, np.arange(len(cls), dtype=idx))
        # Order groups and their channels by the first element: a layer's own order.
        kept = np.flatnonzero(np.isin(comp, comp[has_producer]))
        order = kept[np.argsort(first_elem[kept], kind="stable")]
        del first_elem, kept
        group_of_cls = np.full(n_cls + 1, -1, dtype=idx)  # last slot: unlabelled
        chan_of_cls = np.full(n_cls + 1, -1, dtype=idx)
        # Group ids in order of first appearance along ``order``; channels numbered within.
        _, first, inverse = np.unique(comp[order], return_index=True, return_inverse=True)
        gid_of_comp = np.empty(len(first), dtype=np.int64)
        gid_of_comp[np.argsort(first, kind="stable")] = np.arange(len(first))
        gids = gid_of_comp[inverse.reshape(-1)]
        counts = np.bincount(gids, minlength=len(first))
        within = np.empty(len(order), dtype=np.int64)
        within[np.argsort(gids, kind="stable")] = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
        group_of_cls[order] = gids
        chan_of_cls[order] = within
        sizes = [int(n) for n in counts]
        del order, inverse, gids, within, comp

        pinned_reasons: dict[int, list[str]] = {}
        producers: dict[int, list[str]] = {}
        # Every (root, group) pair once, in root order then group id.
        root_has_producer = np.zeros(len(self.roots), bool)
        root_has_producer[root_of[is_producer]] = True
        del is_producer
        elem_gid = group_of_cls[cls]
        hit = elem_gid >= 0
        pair_root, pair_gid = root_of[hit], elem_gid[hit]
        del root_of, elem_gid, hit
        runs = np.ones(len(pair_root), bool)  # long runs share a pair: compress them before sorting
        runs[1:] = (pair_root[1:] != pair_root[:-1]) | (pair_gid[1:] != pair_gid[:-1])
        pair_key = pair_root[runs].astype(np.int64) * (len(sizes) + 1) + pair_gid[runs]
        del pair_root, pair_gid, runs
        pairs = np.unique(pair_key)
        for r, gid in zip((pairs // (len(sizes) + 1)).tolist(), (pairs % (len(sizes) + 1)).tolist()):
            root = self.roots[r]
            if root.kind == PINNED and root.reason not in pinned_reasons.setdefault(gid, []):
                pinned_reasons[gid].append(root.reason)
            if root_has_producer[r]:
                producers.setdefault(gid, []).append(root.origin)

        inexact: dict[int, list[str]] = {}
        for elems, why in self.inexact_marks:
            for gid in np.unique(group_of_cls[cls[elems]]):
                if gid >= 0 and why not in inexact.setdefault(int(gid), []):
                    inexact[int(gid)].append(why)

        members: dict[int, list[Member]] = {}
        # one tensor axis at a time (temporaries the size of one axis, not of all of them):
        # one run per group, positions ascending; most axes belong to a single group
        for (param, dim), labels in self.member_labels.items():
            c = cls[labels]
            gids = group_of_cls[c]
            if not gids.size or (gids[0] >= 0 and (gids == gids[0]).all()):
                parts = [(int(gids[0]), np.arange(len(gids), dtype=idx))] if gids.size else []
            else:
                hit = np.flatnonzero(gids >= 0).astype(idx)
                order = hit[np.argsort(gids[hit], kind="stable")]
                cuts = np.flatnonzero(np.diff(gids[order])) + 1
                parts = [(int(gids[run[0]]), run) for run in np.split(order, cuts) if run.size]
            for gid, pos in parts:
                members.setdefault(gid, []).append(Member(
                    param, dim, self.member_roles[(param, dim)], pos, chan_of_cls[c[pos]]))

        self.cls = np.append(cls, np.array([n_cls], dtype=cls.dtype))  # element -1 maps to the unlabelled slot
        self.group_of_cls = group_of_cls
        self.chan_of_cls = chan_of_cls
        self.groups: list[Group] = []
        for gid, size in enumerate(sizes):
            reasons = pinned_reasons.get(gid, [])
            self.groups.append(Group(
                id=gid, size=size, prunable=not reasons,
                reason=_join(reasons),
                members=sorted(members.get(gid, []), key=lambda m: (m.param, m.dim)),
                producers=tuple(dict.fromkeys(producers.get(gid, ()))),
                exact=gid not in inexact, inexact_reason=_join(inexact.get(gid, []))))

    # --- removal masks ----------------------------------------------------------------------
    def removed_classes(self, plan: Any) -> np.ndarray:
        """Boolean mask over channel classes that ``plan`` removes (last slot: unlabelled)."""
        # one flag per (group, channel), looked up by every class at once: linear in the
        # classes plus the removed channels (a scan of all classes per group was quadratic)
        sizes = np.fromiter((g.size for g in self.groups), dtype=np.int64, count=len(self.groups))
        offsets = np.cumsum(sizes) - sizes
        flags = np.zeros(int(sizes.sum()), bool)
        for gid, channels in plan.items():
            gid = int(gid)
            if not channels or not 0 <= gid < len(sizes):
                continue
            chans = np.fromiter(channels, dtype=np.int64)
            flags[offsets[gid] + chans[(chans >= 0) & (chans < sizes[gid])]] = True
        mask = np.zeros(len(self.group_of_cls), bool)
        labelled = np.flatnonzero(self.group_of_cls >= 0)
        mask[labelled] = flags[offsets[self.group_of_cls[labelled]] + self.chan_of_cls[labelled]]
        return mask

    def keep_mask(self, labels: np.ndarray, removed: np.ndarray) -> np.ndarray:
        """Which positions of a labelled axis survive the removed classes."""
        return ~removed[self.cls[labels]]

    def _mark_removable(self) -> None:
        # Removing a group whole empties exactly the axes whose every element is one of its
        # channels: one pass over the axes instead of a ``Removal`` per group.
        vanishing: dict[int, dict[str, torch.fx.Node]] = {}
        for node in self.gm.graph.nodes:
            for arr in iter_arrays(self.node_labels.get(node.name)):
                if arr.size:
                    gids = self.group_of_cls[self.cls[arr]]
                    if gids[0] >= 0 and (gids == gids[0]).all():
                        vanishing.setdefault(int(gids[0]), {})[node.name] = node
        for i, g in enumerate(self.groups):
            if not g.prunable:
                continue
            vanished = vanishing.get(g.id, {})
            # no vanishing axis at all: the channels live inside a layer (attention's inner
            # dims), which cannot become zero-width
            if vanished and not any(vanish_problems(node, vanished) for node in vanished.values()):
                self.groups[i] = dataclasses.replace(g, removable=True)

    # --- inspection ------------------------------------------------------------------------
    def check_model(self, model: torch.nn.Module) -> None:
        """Raise if ``model`` no longer has the parameter shapes this graph was built on."""
        now = {k: tuple(v.shape) for k, v in named_state(model).items()}
        for name, shape in self.state_shapes.items():
            if now.get(name) != shape:
                raise InputError(
                    f"the model changed after its dependency graph was built: {name!r} "
                    f"was {shape}, now {now.get(name)}; build the DependencyGraph again")

    def describe(self, width: int | None = None) -> str:
        """A table of groups: id, channels, prunable or why not, and the layers involved.

        The last column names the group's layers by their full module names: the layers
        that produce its channels, ``->`` the layers that read them, then (``also``) the
        modules that carry them along (normalisation layers). With ``width`` every cell is
        cut to that many characters; by default nothing is cut. ``to_json()`` has every
        parameter slice.
        """
        def cut(text: str) -> str:
            return text if width is None or len(text) <= width else text[: width - 3] + "..."

        order = {name: i for i, name in enumerate(self.state_shapes)}
        rows = [("group", "channels", "prunable", "layers: producers -> consumers; also")]
        for g in self.groups:
            if g.prunable:
                status = "yes" + (", removable" if g.removable else "")
                status += "" if g.exact else f", inexact: {g.inexact_reason}"
            else:
                status = f"no: {g.reason}"
            rows.append((str(g.id), str(g.size), cut(status), cut(layers_text(g, order))))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        lines.insert(1, "-" * min(max(len(line) for line in lines), 120))
        n_prunable = sum(g.prunable for g in self.groups)
        lines.append(f"{len(self.groups)} groups, {n_prunable} prunable, "
                     f"{sum(g.size for g in self.groups if g.prunable)} prunable channels, "
                     f"{sum(1 for g in self.groups if g.prunable and not g.exact)} inexact")
        return "\n".join(lines + self.coverage_lines())

    def coverage_lines(self) -> list[str]:
        """Lines naming every parameter no group holds, and why (no silent coverage holes)."""
        if not self.uncovered:
            return []
        out = [f"{len(self.uncovered)} parameters are in no group and keep their shape:"]
        by_reason: dict[str, list[str]] = {}
        for name, why in self.uncovered.items():
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
            out.append(f"  {shown}: {why}")
        return out

    def layer_graph(self) -> LayerGraph:
        """The data-flow graph of the model's layers, each with the groups it produces and reads
        (``graphprune.views.layers.LayerGraph``); what ``to_dot()``, ``--svg`` and the HTML view draw."""
        from graphprune.views.layers import layer_graph

        return layer_graph(self)

    def to_networkx(self, view: str = "groups") -> Any:
        """A networkx graph of the groups.

        ``view="groups"``: a MultiGraph, group nodes linked to the tensors they slice, one
        edge per axis. ``view="layers"``: a DiGraph of ``layer_graph()``, layers linked in
        data-flow order, each node with its ``kind``, ``op``, ``out_groups``, ``in_groups``
        and ``width``.
        """
        import networkx as nx

        if view == "layers":
            return self.layer_graph().to_networkx()
        _check_view(view)
        graph = nx.MultiGraph()
        for g in self.groups:
            graph.add_node(f"group {g.id}", kind="group", size=g.size, prunable=g.prunable,
                           reason=g.reason, producers=list(g.producers))
            for m in g.members:
                graph.add_node(m.param, kind="tensor", shape=self.state_shapes.get(m.param))
                graph.add_edge(f"group {g.id}", m.param, dim=m.dim, role=m.role,
                               positions=len(m.positions))
        return graph

    def to_dot(self, view: str = "groups") -> str:
        """Graphviz DOT text.

        ``view="groups"``: ``to_networkx()``, groups as boxes, tensors as ellipses.
        ``view="layers"``: the layer graph in data-flow order, top to bottom, each layer
        filled with the colour of the group it produces (grey: pinned), as the
        ``graphprune inspect --dot`` output.
        """
        if view == "layers":
            from graphprune.views.svg import layer_dot

            return layer_dot(self)
        _check_view(view)
        lines = ["graph dependency_groups {", "  rankdir=LR;"]
        for g in self.groups:
            color = "palegreen" if g.prunable else "lightgray"
            label = f"group {g.id}\\n{g.size} ch" + ("" if g.prunable else "\\npinned")
            lines.append(f'  "group {g.id}" [shape=box, style=filled, fillcolor={color}, label="{label}"];')
        seen = set()
        for g in self.groups:
            for m in g.members:
                if m.param not in seen:
                    seen.add(m.param)
                    lines.append(f'  "{m.param}" [shape=ellipse];')
                lines.append(f'  "group {g.id}" -- "{m.param}" [label="dim {m.dim} ({m.role})"];')
        lines.append("}")
        return "\n".join(lines)

    def to_json(self) -> str:
        """The groups as JSON (sizes, reasons, members), for tools and reports."""
        return json.dumps([g.to_dict() for g in self.groups], indent=1)

    def operand_members(self, group: Group, kind: str, operand: str) -> list[Member]:
        """Members of ``group`` that are operand ``operand`` of ops of rule kind ``kind``: e.g. the
        scales of its normalisation layers, ``dg.operand_members(g, rules.base.NORM, "weight")``."""
        return [m for m in group.members if self.member_operands.get((m.param, m.dim)) == (kind, operand)]

    def group(self, gid: int) -> Group:
        return self.groups[gid]
