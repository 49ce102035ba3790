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
import warnings
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch.nn.utils import parametrize

from graphprune import rules as _rules  # noqa: F401  (registers the built-in rules)
from graphprune.errors import InputError
from graphprune.rules.base import Multi, as_array, find_rule, op_name
from graphprune.tracing import named_state, normalize_inputs, trace

__all__ = ["DependencyGraph", "Group", "Member", "BuildContext"]

PRODUCER, PARAM, PINNED = "producer", "param", "pinned"
KIND_CODES = {PRODUCER: 0, PARAM: 1, PINNED: 2}  # element kinds are held as small ints
CAT_TARGETS = (torch.cat, torch.concat, torch.concatenate, torch.ops.aten.cat.default)
ROLE_OUT, ROLE_IN, ROLE_PASS = "out", "in", "pass"


@dataclass(frozen=True, eq=False)
class Member:
    """A slice of one parameter or buffer that a group's channels own.

    ``param`` is the qualified name in the original model, ``dim`` the sliced axis,
    ``role`` one of ``out`` (a producer's output rows), ``in`` (a consumer's input
    columns) or ``pass`` (per-channel state such as BatchNorm's). ``positions`` (along
    ``dim``, ascending) and ``channels`` (the group channel at each position) are
    int64 arrays of equal length; treat them as read-only.
    """

    param: str
    dim: int
    role: str
    positions: np.ndarray
    channels: np.ndarray

    def indices(self, channels: Iterable[int]) -> list[int]:
        """Positions along ``dim`` that the given group channels occupy, ascending."""
        wanted = np.fromiter((int(c) for c in channels), dtype=np.int64)
        return self.positions[np.isin(self.channels, wanted)].tolist()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Member):
            return NotImplemented
        return (self.param, self.dim, self.role) == (other.param, other.dim, other.role) and \
            np.array_equal(self.positions, other.positions) and np.array_equal(self.channels, other.channels)

    def __hash__(self) -> int:
        return hash((self.param, self.dim, self.role, self.positions.tobytes(), self.channels.tobytes()))

    def to_dict(self) -> dict[str, Any]:
        return {"param": self.param, "dim": self.dim, "role": self.role,
                "positions": len(self.positions)}


@dataclass(frozen=True)
class Group:
    """Channels that must be pruned together, and every tensor slice they own."""

    id: int
    size: int
    prunable: bool
    reason: str
    members: list[Member] = field(default_factory=list)
    producers: tuple[str, ...] = ()
    removable: bool = False
    exact: bool = True
    inexact_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "size": self.size, "prunable": self.prunable,
                "reason": self.reason, "removable": self.removable, "exact": self.exact,
                "inexact_reason": self.inexact_reason,
                "producers": list(self.producers),
                "members": [m.to_dict() for m in self.members]}


@dataclass
class _Root:
    kind: str
    origin: str
    reason: str
    start: int
    size: int


class BuildContext:
    """What rules see: labels of nodes, parameters as labelled axes, and couplings."""

    def __init__(self, gm: torch.fx.GraphModule, factor: str = "largest", grouped: str = "groups") -> None:
        if factor not in ("largest", "heads"):
            raise InputError(f"factor must be 'largest' or 'heads', got {factor!r}")
        if grouped not in ("groups", "channels"):
            raise InputError(f"grouped must be 'groups' or 'channels', got {grouped!r}")
        self.grouped_mode = grouped
        self._head_axes: list[np.ndarray] = []
        self.factor_mode = factor
        self._relations: list[tuple[np.ndarray, list[np.ndarray], str, int | None]] = []
        self._inexact: list[tuple[np.ndarray, str]] = []
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.state = named_state(gm)
        self.roots: list[_Root] = []
        self.n_elements = 0
        self._edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.member_labels: dict[tuple[str, int], np.ndarray] = {}
        self.member_roles: dict[tuple[str, int], str] = {}
        self.node_labels: dict[str, Any] = {}
        self.node_info: dict[str, dict[str, Any]] = {}  # extra per-node facts for patches
        self.node = None  # the node whose rule is running, for messages
        self._produced: list[np.ndarray] = []
        self._role_marks: list[tuple[np.ndarray, str]] = []

    # --- elements ---------------------------------------------------------------
    def _new_root(self, kind: str, size: int, origin: str, reason: str = "") -> np.ndarray:
        start = self.n_elements
        self.roots.append(_Root(kind, origin, reason, start, size))
        self.n_elements += size
        return np.arange(start, start + size, dtype=np.int64)

    def produce(self, size: int, origin: str | None = None) -> np.ndarray:
        """Fresh output channels of a layer (a conv's or linear's output rows)."""
        return self._new_root(PRODUCER, size, origin or self.node.name)

    def mark_produced(self, labels: np.ndarray | None) -> None:
        """Declare ``labels`` (a weight axis) to be a layer's output channels."""
        if labels is not None:
            self._produced.append(labels[labels >= 0])

    def set_role(self, x: Any, dim: int, role: str) -> None:
        """Record that axis ``dim`` of weight argument ``x`` is a layer's ``role`` axis.

        ``x`` may be a parameter (get_attr) or computed from parameters
        (``self.w * self.mask``): the parameters whose labels reach that axis get the role.
        """
        name = self.attr_name(x)
        if name is not None and (name, dim) in self.member_roles:
            self.member_roles[(name, dim)] = role
            return
        labels = self.labels(x)
        if isinstance(labels, tuple) and dim < len(labels) and labels[dim] is not None:
            self._role_marks.append((labels[dim], role))

    def factorize(self, composite: np.ndarray, free: int | None = None) -> list[np.ndarray]:
        """Split a multi-axis block of channels into one label array per axis.

        ``composite[i, j, ...]`` is removed exactly when the factor labels of its axes
        say so. A slimmed reshape needs a product of kept indices, so at the end one
        factor per block is left free to prune and the others are kept whole: ``free``
        forces which one; otherwise the build's ``factor`` mode picks it (``largest``
        prunes the per-head dim of attention and within-group channels of a shuffle,
        ``outer`` prunes whole heads).
        """
        factors = [self._new_root(PARAM, n, self.node.name) for n in composite.shape]
        self._relations.append((composite, factors, self.node.name, free))
        return factors

    def compose(self, factors: Sequence[np.ndarray]) -> np.ndarray:
        """Labels of the axis obtained by merging several labelled axes (their product)."""
        shape = [len(f) for f in factors]
        composite = self._new_root(PARAM, int(np.prod(shape)), self.node.name).reshape(shape)
        self._relations.append((composite, list(factors), self.node.name, None))
        return composite

    def mark_heads(self, labels: np.ndarray | None) -> None:
        """Record an axis that attention treats as a batch of heads (for ``factor='heads'``)."""
        if labels is not None:
            self._head_axes.append(labels[labels >= 0])

    def inexact(self, labels: np.ndarray | None, reason: str) -> None:
        """Mark channels whose removal changes other channels' values (normalisation)."""
        if labels is not None and (labels >= 0).any():
            self._inexact.append((labels[labels >= 0], reason))

    def pin(self, labels: np.ndarray | None, reason: str) -> None:
        """Make every element in ``labels`` unprunable, for ``reason``."""
        if labels is None:
            return
        sel = labels[labels >= 0]
        if sel.size:
            self._edges.append((sel, self._new_root(PINNED, sel.size, self.node.name, reason)))

    def pin_all(self, labels: Any, reason: str) -> None:
        """Pin every labelled element in a nested labels structure."""
        for arr in iter_arrays(labels):
            self.pin(arr, reason)

    def couple(self, arrays: Sequence[np.ndarray | None], size: int, reason: str) -> np.ndarray | None:
        """Tie arrays of labels position by position; return the coupled labels.

        A labelled position tied to an unlabelled one (``-1`` or a ``None`` dimension)
        is pinned with ``reason``: its partner is not a prunable channel.
        """
        if all(a is None for a in arrays):
            return None
        out = None
        for a in arrays:
            a = as_array(a, size)
            if out is None:
                out = a.copy()
                continue
            both = (out >= 0) & (a >= 0)
            if both.any():
                self._edges.append((out[both], a[both]))
            self.pin(out[(out >= 0) & (a < 0)], reason)
            self.pin(a[(a >= 0) & (out < 0)], reason)
            out = np.where(out >= 0, out, a)
        return out

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie two equally long label arrays; unlabelled positions pin their partner."""
        self.couple([a, b], len(a), f"coupled to a non-channel axis by {self.describe_node()}")

    # --- nodes and parameters -----------------------------------------------------
    def labels(self, x: Any) -> Any:
        """Labels of an argument: a Node's labels, or None for constants."""
        if isinstance(x, torch.fx.Node):
            return self.node_labels.get(x.name)
        if isinstance(x, (list, tuple)):
            return Multi(self.labels(v) for v in x)
        if isinstance(x, dict):
            return Multi(self.labels(v) for v in x.values())
        return None

    def shape(self, x: Any) -> Any:
        """The recorded output shape of a node (``torch.Size`` for tensors)."""
        return x.meta.get("shape") if isinstance(x, torch.fx.Node) else None

    def param(self, name: str, dim: int, role: str) -> np.ndarray:
        """Labels of axis ``dim`` of parameter or buffer ``name``, registered as a member."""
        key = (name, dim)
        if key not in self.member_labels:
            size = self.state[name].shape[dim]
            self.member_labels[key] = self._new_root(PARAM, size, name)
            self.member_roles[key] = role
        elif role != ROLE_PASS:
            self.member_roles[key] = role
        if role == ROLE_OUT:
            self.mark_produced(self.member_labels[key])
        return self.member_labels[key]

    def module_param(self, module_name: str, attr: str, dim: int, role: str) -> np.ndarray | None:
        """Like ``param`` for ``module.attr``; None when the module has no such tensor."""
        name = f"{module_name}.{attr}" if module_name else attr
        if name in self.state:
            return self.param(name, dim, role)
        module = self.modules.get(module_name)
        if module is not None and parametrize.is_parametrized(module, attr):
            # torch.nn.utils.parametrize computes the tensor from others (weight norm,
            # spectral norm, ...): which of their slices a channel owns is not known here
            kinds = ", ".join(type(p).__name__ for p in module.parametrizations[attr])
            labels = self._new_root(PARAM, getattr(module, attr).shape[dim], name)
            if role == ROLE_OUT:  # still a group, so that describe() says why it stays
                self.mark_produced(labels)
            self.pin(labels, f"{name} is parametrized ({kinds}); remove the parametrization "
                             "(torch.nn.utils.parametrize.remove_parametrizations) to prune it")
            return labels
        return None

    def attr_name(self, x: Any) -> str | None:
        """The parameter name behind a ``get_attr`` node, else None."""
        if isinstance(x, torch.fx.Node) and x.op == "get_attr" and x.target in self.state:
            return x.target
        return None

    def describe_node(self) -> str:
        node = self.node
        mod = self.modules.get(node.target) if node.op == "call_module" else None
        return op_name(node, mod)

    # --- the walk -------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.node = node
            self.node_labels[node.name] = self._visit(node)

    def _visit(self, node: torch.fx.Node) -> Any:
        if node.op == "placeholder":
            shape = self.shape(node)
            return tuple(None for _ in shape) if isinstance(shape, torch.Size) else None
        if node.op == "get_attr":
            return self._get_attr(node)
        if node.op == "output":
            self.pin_all(self.labels(node.args[0]), "reaches a model output")
            return None
        module = self.modules.get(node.target) if node.op == "call_module" else None
        rule = find_rule(node, module)
        if rule is None:
            return self._no_rule(node, module)
        try:
            return rule.build(self, node, module)
        except Exception as exc:  # an unusual call the rule does not follow: pin, never guess
            warnings.warn(f"rule {rule.name!r} could not follow {op_name(node, module)}: "
                          f"{type(exc).__name__}: {exc}; its channels are kept", stacklevel=2)
            return self._no_rule(node, module, f"rule {rule.name!r} failed on {op_name(node, module)}")

    def _get_attr(self, node: torch.fx.Node) -> Any:
        shape = self.shape(node)
        if not isinstance(shape, torch.Size):
            return None
        if node.target in self.state:
            # A size-1 axis broadcasts (class tokens, [C, 1, 1] scales): not a channel axis.
            return tuple(self.param(node.target, d, ROLE_PASS) if n > 1 else None
                         for d, n in enumerate(shape))
        return tuple(self._new_root(PINNED, n, node.name, f"constant tensor {node.target!r}")
                     for n in shape)

    def _no_rule(self, node: torch.fx.Node, module: torch.nn.Module | None, reason: str = "") -> Any:
        reason = reason or f"no rule for {op_name(node, module)}"
        for a in node.all_input_nodes:
            self.pin_all(self.labels(a), reason)
        shape = self.shape(node)
        return unlabelled(shape)

    # --- result ---------------------------------------------------------------------
    def _components(self) -> np.ndarray:
        n = self.n_elements
        if self._edges:
            a = np.concatenate([e[0] for e in self._edges])
            b = np.concatenate([e[1] for e in self._edges])
        else:
            a = b = np.zeros(0, dtype=np.int64)
        adj = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
        return connected_components(adj, directed=False)[1]

    def _kinds(self) -> np.ndarray:
        """Kind of every element's root as a ``KIND_CODES`` code; produced params become producers."""
        kinds = np.repeat(np.array([KIND_CODES[r.kind] for r in self.roots], dtype=np.int8),
                          [r.size for r in self.roots]) if self.roots else np.zeros(0, np.int8)
        if self._produced:
            produced = np.concatenate(self._produced)
            kinds[produced[kinds[produced] == KIND_CODES[PARAM]]] = KIND_CODES[PRODUCER]
        return kinds

    def _resolve_factors(self, kinds: np.ndarray) -> None:
        """Leave one factor of every split block free; keep the others whole."""
        if not self._relations:
            return
        cls = self._components()
        pinned = np.zeros(int(cls.max()) + 1, bool)
        pinned[cls[kinds == KIND_CODES[PINNED]]] = True
        status: dict[int, bool] = {}
        nodes = {n.name: n for n in self.gm.graph.nodes}
        heads = np.zeros(len(pinned), bool)
        if self._head_axes:
            heads[cls[np.concatenate(self._head_axes)]] = True
        for composite, factors, origin, forced in self._relations:
            live = [k for k, f in enumerate(factors) if len(f) > 1]
            cand = [k for k in live if (factors[k] >= 0).all() and not pinned[cls[factors[k]]].any()
                    and status.get(int(cls[factors[k][0]])) is not False]
            if forced is not None:
                cand = [k for k in cand if k == forced]
            chosen = next((k for k in cand if status.get(int(cls[factors[k][0]]))), None)
            if chosen is None and cand:
                head_cand = [k for k in cand if heads[cls[factors[k]]].any()]
                if self.factor_mode == "heads" and head_cand:
                    chosen = head_cand[0]
                else:
                    chosen = max(cand, key=lambda k: (len(factors[k]), k))
            reason = (f"kept whole: {origin} splits channels into axes "
                      f"{list(composite.shape)} and only one of them can be pruned")
            self.node = nodes[origin]
            for k in live:
                if k != chosen:
                    status[int(cls[factors[k][0]])] = False
                    self.pin(factors[k], reason)
            if chosen is None:
                self.pin(composite.reshape(-1), reason)
                continue
            status[int(cls[factors[chosen][0]])] = True
            moved = np.moveaxis(composite, chosen, 0).reshape(len(factors[chosen]), -1)
            rep = np.repeat(factors[chosen], moved.shape[1])
            self.couple([moved.reshape(-1), rep], rep.size, reason)

    def _apply_role_marks(self) -> None:
        for marked, role in self._role_marks:
            marked = set(marked[marked >= 0].tolist())
            for key, labels in self.member_labels.items():
                if self.member_roles[key] == ROLE_PASS and marked.intersection(labels.tolist()):
                    self.member_roles[key] = role

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Channel class of every element, and the kind of every element's root."""
        self._apply_role_marks()
        if self._relations:
            self._resolve_factors(self._kinds())  # pins add elements: kinds are taken again
        return self._components(), self._kinds()


def _join(reasons: list[str]) -> str:
    return "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")


def unlabelled(shape: Any) -> Any:
    """Labels for an output that carries no channels."""
    if isinstance(shape, torch.Size):
        return tuple(None for _ in shape)
    if isinstance(shape, tuple):
        return Multi(unlabelled(s) for s in shape)
    return None


def iter_arrays(labels: Any):
    """Every label array inside a nested labels structure."""
    if isinstance(labels, np.ndarray):
        yield labels
    elif isinstance(labels, tuple):
        for item in labels:
            yield from iter_arrays(item)


class DependencyGraph:
    """Groups of coupled channels of a model, and the traced graph they live in.

    Build it with ``DependencyGraph.build(model, example_inputs)``. The traced module
    shares its submodules with ``model``; nothing is copied or changed.
    """

    def __init__(self, gm: torch.fx.GraphModule, ctx: BuildContext) -> None:
        self.gm = gm
        self.inexact_marks = ctx._inexact
        self.node_info = ctx.node_info
        self.node_labels = ctx.node_labels
        self.member_labels = ctx.member_labels
        self.member_roles = ctx.member_roles
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
        grouped: str = "groups",
    ) -> DependencyGraph:
        """Trace ``model`` on ``example_inputs`` and group its coupled channels.

        ``factor`` says what to prune where a reshape splits channels over several
        axes: ``"largest"`` (per-head dims of attention, within-group channels of a
        channel shuffle) or ``"heads"`` (whole attention heads). ``grouped`` says how
        grouped convolutions shrink: ``"groups"`` removes whole conv groups,
        ``"channels"`` the same channels from every group (depthwise convs always
        lose whole groups).
        """
        gm = trace(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
        ctx = BuildContext(gm, factor=factor, grouped=grouped)
        ctx.run()
        dg = cls(gm, ctx)
        dg.build_options = {"leaf_modules": [t if isinstance(t, str) else f"{t.__module__}:{t.__qualname__}"
                                             for t in leaf_modules],
                            "factor": factor, "grouped": grouped}
        dg.state_shapes = {k: tuple(v.shape) for k, v in named_state(model).items()}
        inputs = normalize_inputs(example_inputs)
        dg.example_shapes = [tuple(x.shape) for x in inputs]
        dg.example_dtypes = [x.dtype for x in inputs]
        dg._mark_removable()
        return dg

    # --- grouping -------------------------------------------------------------------------
    def _group_classes(self, cls: np.ndarray, kinds: np.ndarray) -> None:
        n_cls = int(cls.max()) + 1 if cls.size else 0
        # Classes that share a producer (one layer's outputs) belong to one group.
        is_producer = kinds == KIND_CODES[PRODUCER]
        root_of = np.repeat(np.arange(len(self.roots)), [r.size for r in self.roots])
        produced = np.flatnonzero(is_producer)  # ascending, so grouped by root
        _, first, which = np.unique(root_of[produced], return_index=True, return_inverse=True)
        s, d = cls[produced[first]][which.reshape(-1)], cls[produced]  # each to its root's first class
        adj = coo_matrix((np.ones(len(s), dtype=np.int8), (s, d)), shape=(n_cls, n_cls))
        _, comp = connected_components(adj, directed=False)

        has_producer = np.zeros(n_cls, bool)
        has_producer[cls[is_producer]] = True
        first_elem = np.full(n_cls, np.iinfo(np.int64).max)
        np.minimum.at(first_elem, cls, np.arange(len(cls)))
        # Order groups and their channels by the first element: a layer's own order.
        kept = np.flatnonzero(np.isin(comp, comp[has_producer]))
        order = kept[np.argsort(first_elem[kept], kind="stable")]
        group_of_cls = np.full(n_cls + 1, -1, dtype=np.int64)  # last slot: unlabelled
        chan_of_cls = np.full(n_cls + 1, -1, dtype=np.int64)
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

        pinned_reasons: dict[int, list[str]] = {}
        producers: dict[int, list[str]] = {}
        # Every (root, group) pair once, in root order then group id.
        elem_gid = group_of_cls[cls]
        root_has_producer = np.zeros(len(self.roots), bool)
        root_has_producer[root_of[is_producer]] = True
        hit = elem_gid >= 0
        pair_key = root_of[hit] * (len(sizes) + 1) + elem_gid[hit]
        runs = np.ones(len(pair_key), bool)  # long runs share a key: compress them before sorting
        runs[1:] = pair_key[1:] != pair_key[:-1]
        pairs = np.unique(pair_key[runs])
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
        keys = list(self.member_labels)
        if keys:  # all tensor axes at once: one run per (axis, group), positions ascending
            lengths = [len(a) for a in self.member_labels.values()]
            flat = np.concatenate(list(self.member_labels.values()))
            seg = np.repeat(np.arange(len(keys)), lengths)
            pos = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            c = cls[flat]
            gids = group_of_cls[c]
            hit = gids >= 0
            seg, gids, pos, c = seg[hit], gids[hit], pos[hit], c[hit]
            order = np.argsort(seg * (len(sizes) + 1) + gids, kind="stable")  # pos ascends already
            seg, gids, pos, chans = seg[order], gids[order], pos[order], chan_of_cls[c[order]]
            cuts = [0, *(np.flatnonzero((np.diff(seg) != 0) | (np.diff(gids) != 0)) + 1).tolist(), len(seg)]
            starts = np.asarray(cuts[:-1], dtype=np.int64)
            starts = starts[starts < len(seg)]
            for a, b, k, gid in zip(cuts, cuts[1:], seg[starts].tolist(), gids[starts].tolist()):
                param, dim = keys[k]
                members.setdefault(gid, []).append(Member(
                    param, dim, self.member_roles[(param, dim)], pos[a:b], chans[a:b]))

        self.cls = np.append(cls, n_cls)  # element -1 maps to the unlabelled slot
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
        mask = np.zeros(len(self.group_of_cls), bool)
        for gid, channels in plan.items():
            if not channels:
                continue
            sel = (self.group_of_cls == gid) & np.isin(self.chan_of_cls, list(channels))
            mask |= sel
        return mask

    def keep_mask(self, labels: np.ndarray, removed: np.ndarray) -> np.ndarray:
        """Which positions of a labelled axis survive the removed classes."""
        return ~removed[self.cls[labels]]

    def vanish_blockers(self, removed: np.ndarray) -> tuple[set[str], list[str]]:
        """Nodes whose output loses every channel of an axis, and why that breaks the graph.

        A layer may vanish only if what reads its output is itself vanishing or a
        ``torch.cat`` that keeps other inputs.
        """
        vanished: set[str] = set()
        for node in self.gm.graph.nodes:
            labels = self.node_labels.get(node.name)
            for arr in iter_arrays(labels):
                if arr.size and not self.keep_mask(arr, removed).any():
                    vanished.add(node.name)
                    break
        problems = [p for node in self.gm.graph.nodes if node.name in vanished
                    for p in self._vanish_problems(node, vanished)]
        return vanished, problems

    @staticmethod
    def _vanish_problems(node: torch.fx.Node, vanished: Container[str]) -> list[str]:
        """Users of a vanished ``node`` that cannot do without it."""
        return [f"{node.name!r} feeds {user.name!r} ({user.op} {getattr(user.target, '__name__', user.target)})"
                for user in node.users
                if user.name not in vanished and not (user.op == "call_function" and user.target in CAT_TARGETS)]

    def _mark_removable(self) -> None:
        # Removing a group whole empties exactly the axes whose every element is one of its
        # channels: one pass over the axes instead of ``vanish_blockers`` per group.
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
            if vanished and not any(self._vanish_problems(node, vanished) for node in vanished.values()):
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

    def describe(self, width: int = 60) -> str:
        """A table of groups: id, channels, prunable or why not, members.

        Long reasons and member lists are cut to ``width`` characters; ``to_json()``
        has everything.
        """
        def cut(text: str) -> str:
            return text if len(text) <= width else text[: width - 3] + "..."

        rows = [("group", "channels", "prunable", "members")]
        for g in self.groups:
            if g.prunable:
                status = "yes" + (", removable" if g.removable else "")
                status += "" if g.exact else f", inexact: {g.inexact_reason}"
            else:
                status = f"no: {g.reason}"
            mem = ", ".join(f"{m.param}[{m.dim}]" for m in g.members)
            rows.append((str(g.id), str(g.size), cut(status), cut(mem)))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        lines.insert(1, "-" * max(len(line) for line in lines))
        n_prunable = sum(g.prunable for g in self.groups)
        lines.append(f"{len(self.groups)} groups, {n_prunable} prunable, "
                     f"{sum(g.size for g in self.groups if g.prunable)} prunable channels, "
                     f"{sum(1 for g in self.groups if g.prunable and not g.exact)} inexact")
        return "\n".join(lines)

    def to_networkx(self):
        """A networkx MultiGraph: group nodes linked to the tensors they slice, one edge per axis."""
        import networkx as nx

        graph = nx.MultiGraph()
        for g in self.groups:
            graph.add_node(f"group {g.id}", kind="group", size=g.size, prunable=g.prunable,
                           reason=g.reason, producers=list(g.producers))
            for m in g.members:
                graph.add_node(m.param, kind="tensor", shape=self.state_shapes.get(m.param))
                graph.add_edge(f"group {g.id}", m.param, dim=m.dim, role=m.role,
                               positions=len(m.positions))
        return graph

    def to_dot(self) -> str:
        """Graphviz DOT text of ``to_networkx()``: groups as boxes, tensors as ellipses."""
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

    def group(self, gid: int) -> Group:
        return self.groups[gid]


from graphprune.rules import aten as _aten  # noqa: E402, F401  (needs this module)
from graphprune.rules import attention as _attention  # noqa: E402, F401  (needs this module)
