"""The layer graph of a dependency graph: layers in data-flow order, each with its groups.

``layer_graph(dg)`` walks the traced graph once and keeps what a reader looks for: the
inputs, every weighted layer (the rules' ``LAYER`` kind: convolutions, linear layers,
attention, embeddings), the joins where branches meet (a residual ``add``, a ``cat``,
an SE gate's ``mul``) and the outputs. Every other op (activations, pooling, reshapes)
is passed through, so an edge ``a -> b`` means that ``b`` reads what ``a`` computed. A
normalisation layer right after a layer is folded into it (``Layer.norms``).

Each layer knows the groups whose channels it produces (``out_groups``: its output
rows) and reads (``in_groups``: its input columns), and its output width; ``widths(plan)``
gives the widths a plan leaves. ``DependencyGraph.layer_graph()`` is the public entry.

>>> import torch, graphprune as gp
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
...                             torch.nn.Conv2d(8, 4, 1))
>>> lg = gp.DependencyGraph.build(model, torch.randn(1, 3, 16, 16)).layer_graph()
>>> [(x.name, x.kind, x.out_groups, x.in_groups, x.norms) for x in lg.layers]
[('input_1', 'input', (), (), ()), ('0', 'layer', (0,), (), ('1',)), ('3', 'layer', (1,), (0,), ()), ('output', 'output', (), (), ())]
>>> lg.edges, lg.widths({0: [0, 1, 2]})
([(0, 1), (1, 2), (2, 3)], {'0': (8, 5), '3': (4, 4)})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from graphprune.rules.base import LAYER, NORM, find_rule, operand_param, target_name

__all__ = ["Layer", "LayerGraph", "layer_graph", "layers_text"]


@dataclass(frozen=True)
class Layer:
    """One node of the layer graph.

    ``kind`` is ``input``, ``layer``, ``join`` or ``output``; ``op`` the module class or
    function (``Conv2d``, ``add``); ``params`` the layer's own parameters, ``norms`` the
    normalisation modules folded into it; ``width`` its output channels (layers only);
    ``carries`` (joins) the groups of the channels it combines.
    """

    name: str
    kind: str
    op: str
    out_groups: tuple[int, ...] = ()
    in_groups: tuple[int, ...] = ()
    width: int | None = None
    params: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()
    carries: tuple[int, ...] = ()


@dataclass
class LayerGraph:
    """Layers in the traced graph's order and data-flow edges ``(from, to)`` between their indices."""

    layers: list[Layer]
    edges: list[tuple[int, int]]
    _out_members: dict[str, list[Any]] = field(default_factory=dict, repr=False)

    def widths(self, plan: Mapping[int, Sequence[int]] | None = None) -> dict[str, tuple[int, int]]:
        """``{layer name: (width before, width after plan)}`` for every layer with a known width."""
        plan = plan or {}
        out: dict[str, tuple[int, int]] = {}
        for layer in self.layers:
            if layer.kind != "layer" or layer.width is None:
                continue
            removed = 0
            for gid, member in self._out_members.get(layer.name, ()):
                removed += len(member.indices(plan.get(gid, ())))
            out[layer.name] = (layer.width, layer.width - removed)
        return out

    def to_networkx(self) -> Any:
        """A networkx DiGraph: layers by name with their fields as attributes, data-flow edges."""
        import networkx as nx

        digraph = nx.DiGraph()
        for layer in self.layers:
            digraph.add_node(layer.name, **{k: v for k, v in layer.__dict__.items() if k != "name"})
        digraph.add_edges_from((self.layers[a].name, self.layers[b].name) for a, b in self.edges)
        return digraph

    def group_layers(self, gid: int) -> tuple[list[str], list[str]]:
        """Names of the layers that produce group ``gid``'s channels, and of those that read them."""
        return ([x.name for x in self.layers if gid in x.out_groups],
                [x.name for x in self.layers if gid in x.in_groups])


_STATE_ATTRS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def layers_text(g: Any, order: Mapping[str, int]) -> str:
    """Group ``g``'s layers as ``producers -> consumers; also others`` (``describe()``'s last
    column): module names (a parameter's own name where it is not a module's weight, bias or
    statistics), each list in the order of ``order`` (parameter name -> position)."""
    by_role: dict[str, dict[str, int]] = {"out": {}, "in": {}, "pass": {}}
    for m in g.members:
        owner, _, attr = m.param.rpartition(".")
        name = owner if owner and attr in _STATE_ATTRS else m.param
        by_role.get(m.role, by_role["pass"]).setdefault(name, order.get(m.param, len(order)))
    for name in list(by_role["pass"]):  # a layer listed as producer or consumer is not listed again
        if name in by_role["out"] or name in by_role["in"]:
            del by_role["pass"][name]
    names = {role: ", ".join(sorted(d, key=d.__getitem__)) for role, d in by_role.items()}
    text = f"{names['out'] or '(none)'} -> {names['in'] or '(none)'}"
    return text + (f"; also {names['pass']}" if names["pass"] else "")


def _is_data(node: torch.fx.Node) -> bool:
    """Whether ``node`` computes tensors: not sizes read off a tensor, nor an input that is
    ``None`` or a flag (``attn_mask=None``, ``is_causal=False``), which are no data flow."""
    if "shape" not in node.meta:
        return True  # not recorded: count it
    shape = node.meta["shape"]
    if isinstance(shape, torch.Size):
        return True
    return isinstance(shape, (tuple, list)) and any(isinstance(s, torch.Size) for s in shape)


def _module_name(param: str) -> str:
    return param.rpartition(".")[0] or param


def layer_graph(dg: Any) -> LayerGraph:
    """The ``LayerGraph`` of a ``DependencyGraph`` (see the module docstring)."""
    gm: torch.fx.GraphModule = dg.gm
    roles: dict[str, list[tuple[int, str, Any]]] = {}
    for g in dg.groups:
        for m in g.members:
            roles.setdefault(m.param, []).append((g.id, m.role, m))
    layers: list[Layer] = []
    edges: set[tuple[int, int]] = set()
    out_members: dict[str, list[Any]] = {}
    sources: dict[torch.fx.Node, frozenset[int]] = {}
    norms: dict[int, list[str]] = {}

    def add(layer: Layer, node: torch.fx.Node, srcs: frozenset[int]) -> None:
        index = len(layers)
        layers.append(layer)
        edges.update((s, index) for s in srcs)
        sources[node] = frozenset((index,))

    for node in gm.graph.nodes:
        ins = [sources.get(n, frozenset()) for n in node.all_input_nodes if _is_data(n)]
        srcs = frozenset().union(*ins)
        if node.op == "placeholder":
            if _is_data(node):
                add(Layer(node.name, "input", "input"), node, frozenset())
            continue
        if node.op == "output":
            add(Layer("output", "output", "output"), node, srcs)
            continue
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        rule = find_rule(node, module) if node.op.startswith("call_") else None
        kind = rule.kind if rule is not None else ""
        if kind == LAYER:
            weight = operand_param(rule, node, "weight")
            if module is not None:
                name = str(node.target)
                params = tuple(f"{name}.{p}" for p, _ in module.named_parameters())
                op = type(module).__name__
            else:
                name = _module_name(weight) if weight else node.name
                params = tuple(p for p in (weight, operand_param(rule, node, "bias")) if p)
                op = target_name(node)
            outs, reads, width = [], [], None
            for p in params:
                for gid, role, member in roles.get(p, ()):
                    if role == "out":
                        outs.append(gid)
                        if p == (weight or params[0]):
                            out_members.setdefault(name, []).append((gid, member))
                            width = dg.state_shapes.get(p, (None,) * (member.dim + 1))[member.dim]
                    elif role == "in":
                        reads.append(gid)
            add(Layer(name, "layer", op, tuple(dict.fromkeys(outs)), tuple(dict.fromkeys(reads)), width, params),
                node, srcs)
        elif kind == NORM and len(srcs) == 1 and layers[next(iter(srcs))].kind == "layer":
            norms.setdefault(next(iter(srcs)), []).append(str(node.target) if module is not None else node.name)
            sources[node] = srcs
        elif node.op.startswith("call_") and len({s for s in ins if s}) >= 2:
            carries = [g for s in sorted(srcs) for g in (layers[s].out_groups or layers[s].carries)]
            add(Layer(node.name, "join", target_name(node) if module is None else type(module).__name__,
                      carries=tuple(dict.fromkeys(carries))), node, srcs)
        else:
            sources[node] = srcs
    for index, names in norms.items():
        layers[index] = Layer(**{**layers[index].__dict__, "norms": tuple(names)})
    return LayerGraph(layers, sorted(edges), out_members)
