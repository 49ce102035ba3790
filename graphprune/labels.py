"""The labelling pass: rules walk the traced graph once and record channel couplings.

Every channel of every tensor axis is an *element*; elements belong to *roots* (a
producer's output channels, a parameter's axis, a pinned block). ``BuildContext.run``
visits the nodes in order and calls each node's rule (``graphprune.rules``), which
reads its inputs' labels through the context, couples elements that must go together,
pins what cannot go, marks channels inexact, and returns its output labels.
``finish()`` resolves multi-axis factors and gives every element its *channel class*
(connected components of the couplings); ``graphprune.graph`` turns classes into groups.

What the pass leaves: ``node_labels[name]`` (per output axis, None or an int array of
element ids), ``member_labels[(param, dim)]`` and ``member_roles`` for every parameter
axis a rule touched, ``member_operands`` (which operand of which kind of op a parameter
axis is), ``node_info`` (facts rules leave for their rewrite patches):

>>> import torch, graphprune as gp
>>> gm = gp.trace(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()), torch.randn(2, 4))
>>> ctx = BuildContext(gm)
>>> ctx.run()
>>> {name: [None if a is None else a.tolist() for a in lab] for name, lab in ctx.node_labels.items() if lab}
{'input_1': [None, None], '_0': [None, [0, 1, 2]], '_1': [None, [0, 1, 2]]}
>>> ctx.member_roles[("0.weight", 0)], ctx.member_operands[("0.weight", 0)]
('out', ('layer', 'weight'))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
from torch.nn.utils import parametrize

from graphprune import rules as _rules  # noqa: F401  (registers the built-in rules)
from graphprune.components import components
from graphprune.errors import InputError, warn_user
from graphprune.probe import channelwise
from graphprune.rules.base import Multi, Rule, as_array, find_rule, iter_arrays, op_name, operand, unlabelled
from graphprune.tracing import named_state

__all__ = ["BuildContext", "PRODUCER", "PARAM", "PINNED", "KIND_CODES", "ROLE_OUT", "ROLE_IN", "ROLE_PASS"]

INT32_ELEMENTS = 2**31 - 1
"""Element ids are int32 while a graph has at most this many elements (half the memory of
int64 labels, couplings and class tables); a larger graph is labelled again with int64."""

PRODUCER, PARAM, PINNED = "producer", "param", "pinned"
KIND_CODES = {PRODUCER: 0, PARAM: 1, PINNED: 2}  # element kinds are held as small ints
ROLE_OUT, ROLE_IN, ROLE_PASS = "out", "in", "pass"


class _Wider(Exception):
    """The graph has more elements than int32 labels can number (``run`` starts over in int64)."""


@dataclass
class _Root:
    kind: str
    origin: str
    reason: str
    start: int
    size: int


class BuildContext:
    """What rules see: labels of nodes, parameters as labelled axes, and couplings."""

    def __init__(self, gm: torch.fx.GraphModule, factor: str = "largest", grouped: str = "channels") -> None:
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
        # tied tensors (one Parameter under several names) are labelled under their first name
        self.canonical = {alias: name for name, alias in _aliases(gm)}
        self.width_values: set[str] = set()  # int nodes whose value is a width (x.size(1), C // heads)
        self.width_axes: dict[str, list[int]] = {}  # shape tuples (x.shape): which entries are widths
        self.roots: list[_Root] = []
        self.n_elements = 0
        self._edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.member_labels: dict[tuple[str, int], np.ndarray] = {}
        self.member_roles: dict[tuple[str, int], str] = {}
        self.node_labels: dict[str, Any] = {}
        self.node_info: dict[str, dict[str, Any]] = {}  # extra per-node facts for patches
        self.member_operands: dict[tuple[str, int], tuple[str, str]] = {}  # -> (rule kind, operand)
        self.node = None  # the node whose rule is running, for messages
        self.module: torch.nn.Module | None = None  # its module (call_module nodes)
        self.rule: Rule | None = None  # its rule
        self._produced: list[np.ndarray] = []
        self._role_marks: list[tuple[np.ndarray, str]] = []
        self.label_dtype: type = np.int32  # element ids; np.int64 once int32 would overflow

    # --- elements ---------------------------------------------------------------
    def _new_root(self, kind: str, size: int, origin: str, reason: str = "") -> np.ndarray:
        start = self.n_elements
        if self.label_dtype == np.int32 and start + size > INT32_ELEMENTS:
            raise _Wider
        self.roots.append(_Root(kind, origin, reason, start, size))
        self.n_elements += size
        return np.arange(start, start + size, dtype=self.label_dtype)

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
        name = self.canonical.get(name, name)
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
        """The parameter name behind a ``get_attr`` node (its first name, if tied), else None."""
        if isinstance(x, torch.fx.Node) and x.op == "get_attr":
            name = self.canonical.get(x.target, x.target)
            return name if name in self.state else None
        return None

    def operand(self, name: str, default: Any = None) -> Any:
        """Operand ``name`` of the running node, where its rule's ``Operands`` say it is."""
        return operand(self.rule, self.node, self.module, name, default)

    def operand_param(self, name: str, dim: int, role: str) -> np.ndarray | None:
        """Labels of axis ``dim`` of the module tensor behind operand ``name`` (module forms),
        registered as a member with ``role``; None when the module has no such tensor."""
        attr = getattr(self.rule.operands, name)
        labels = self.module_param(self.node.target, attr, dim, role)
        if labels is not None:
            self.member_operands[(f"{self.node.target}.{attr}", dim)] = (self.rule.kind, name)
        return labels

    def note_operand(self, x: Any, name: str) -> None:
        """Record that parameter argument ``x`` (a ``get_attr`` node) is operand ``name`` of the
        running node, on every axis this graph labels."""
        param = self.attr_name(x)
        if param is not None:
            for dim in range(len(self.state[param].shape)):
                if (param, dim) in self.member_labels:
                    self.member_operands[(param, dim)] = (self.rule.kind, name)

    def weight_labels(self, x: Any, name: str = "weight") -> list:
        """Labels of tensor argument ``x`` (operand ``name``) with every axis labelled, size-1
        axes included."""
        labels = list(self.labels(x) or ())
        param = self.attr_name(x)
        if param is not None:
            labels = [lab if lab is not None else self.param(param, d, ROLE_PASS) for d, lab in enumerate(labels)]
            self.note_operand(x, name)
        return labels

    def mark_width(self, node: torch.fx.Node) -> None:
        """Record that ``node``'s value is a number computed from the width of a channel axis.

        The slim graph gives such a number its original value (what the masked original
        computes); the reshape rules' patches write slim widths into the sizes of axes
        that carry channels.
        """
        self.width_values.add(node.name)

    def is_width(self, x: Any) -> bool:
        """Whether argument ``x`` is a number computed from a channel axis' width."""
        return isinstance(x, torch.fx.Node) and x.name in self.width_values

    def describe_node(self) -> str:
        node = self.node
        mod = self.modules.get(node.target) if node.op == "call_module" else None
        return op_name(node, mod)

    # --- the walk -------------------------------------------------------------------
    def run(self) -> None:
        """Label every node in graph order (int32 element ids; int64 for graphs too large for them)."""
        try:
            self._walk()
        except _Wider:  # more than INT32_ELEMENTS elements: start over with int64 ids
            self.__init__(self.gm, factor=self.factor_mode, grouped=self.grouped_mode)
            self.label_dtype = np.int64
            self._walk()

    def _walk(self) -> None:
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
        self.module, self.rule = module, rule
        if rule is None:
            probed = channelwise(self, node, module)  # channel-wise when run: the labels pass
            if probed is not None:
                self.node_info[node.name] = {"probed": True}
                return probed
            return self._no_rule(node, module)
        try:
            return rule.build(self, node, module)
        except _Wider:
            raise
        except Exception as exc:  # an unusual call the rule does not follow: pin, never guess
            warn_user(f"rule {rule.name!r} could not follow {op_name(node, module)}: "
                      f"{type(exc).__name__}: {exc}; its channels are kept")
            return self._no_rule(node, module, f"rule {rule.name!r} failed on {op_name(node, module)}")

    def _get_attr(self, node: torch.fx.Node) -> Any:
        shape = self.shape(node)
        if not isinstance(shape, torch.Size):
            return None
        name = self.attr_name(node)
        if name is not None:
            # A size-1 axis broadcasts (class tokens, [C, 1, 1] scales): not a channel axis.
            return tuple(self.param(name, d, ROLE_PASS) if n > 1 else None
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
        if len(self._edges) > 1:  # the couplings as one pair of arrays from here (no second copy)
            # int32 whenever the ids fit (a graph past INT32_ELEMENTS holds int64 ids)
            dtype = np.int32 if n <= INT32_ELEMENTS else np.int64
            self._edges = [(np.concatenate([e[0] for e in self._edges], dtype=dtype),
                            np.concatenate([e[1] for e in self._edges], dtype=dtype))]
        if not self._edges:
            return components(n, np.zeros(0, np.int32), np.zeros(0, np.int32))
        return components(n, *self._edges[0])

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


def _aliases(gm: torch.nn.Module) -> list[tuple[str, str]]:
    """``(first name, other name)`` of every tensor held under more than one name."""
    first: dict[int, str] = {}
    out = []
    for prefix, m in gm.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for table in (m._parameters, m._buffers):
            for key, t in table.items():
                if t is None:
                    continue
                name = dot + key
                if id(t) not in first:
                    first[id(t)] = name
                elif first[id(t)] != name:
                    out.append((first[id(t)], name))
    return out

