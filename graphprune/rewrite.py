"""Rewrite a model into a slimmed ``torch.fx.GraphModule`` that follows a plan.

``apply`` copies the modules and tensors the traced graph uses (``graphprune.copying``),
slices every parameter and buffer along the axes the plan's groups own (``Removal``),
then walks the graph once asking each node's rule (``graphprune.rules``) to update
width attributes (``resize``: ``in_channels``, ``groups``, ``num_features`` ...) and
literal widths in the graph (``patch``: ``view`` sizes, ``split`` sections, slice
bounds, functional ``groups=``); it drops layers whose every channel went (from the
concatenations that read them) and checks that the result runs with the original
output shapes. The user's model is never touched.

>>> import torch, graphprune as gp
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
>>> dg = gp.DependencyGraph.build(model, torch.randn(1, 3, 16, 16))
>>> slim = apply(model, dg, {0: [0, 1, 2]})
>>> slim.get_submodule("0").out_channels, slim.get_submodule("2").in_channels, model[0].out_channels
(5, 5, 8)
"""

from __future__ import annotations

import copy
from collections.abc import Container
from typing import Any

import numpy as np
import torch
import torch.fx

from graphprune.copying import copy_as_graph_module, copy_targets, empty_graph_module, set_graph
from graphprune.errors import InputError, PlanError, RewriteError
from graphprune.graph import DependencyGraph
from graphprune.module_form import own_classes
from graphprune.plan import Plan
from graphprune.removal import Removal
from graphprune.rules.base import CONCAT, Rule, find_rule, is_inplace, iter_arrays, operand
from graphprune.shapes import shape_of
from graphprune.tracing import check_same_code, eval_mode, named_state, on_meta_device

__all__ = ["apply", "RewriteContext", "iter_arrays", "copy_as_graph_module"]


class RewriteContext:
    """What rule patches see while rewriting: old and new shapes, labels, node edits."""

    def __init__(self, removal: Removal, modules: dict, slim: torch.fx.GraphModule) -> None:
        self.dg = removal.dg
        self.removal = removal
        self.removed = removal.removed
        self.modules = modules
        self.slim = slim
        self.rule: Rule | None = None  # the rule of the node being patched

    def module(self, node: torch.fx.Node) -> torch.nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def info(self, node: torch.fx.Node) -> dict[str, Any]:
        return self.dg.node_info.get(node.name, {})

    def replace_module(self, node: torch.fx.Node, new: torch.nn.Module) -> None:
        """Swap the module a ``call_module`` node calls (for layers rebuilt in slim form)."""
        parent_name, _, attr = node.target.rpartition(".")
        parent = self.slim.get_submodule(parent_name) if parent_name else self.slim
        setattr(parent, attr, new)
        self.modules[node.target] = new

    def labels(self, node: torch.fx.Node) -> Any:
        return self.dg.node_labels.get(node.name)

    def keep(self, labels: np.ndarray) -> np.ndarray:
        return self.removal.keep(labels)

    def old_shape(self, node: torch.fx.Node) -> Any:
        return node.meta.get("shape")

    def new_shape(self, node: torch.fx.Node) -> Any:
        return self.removal.of(node)

    def operand(self, node: torch.fx.Node, name: str, default: Any = None) -> Any:
        """Operand ``name`` of ``node``, where its rule's ``Operands`` say it is."""
        return operand(self.rule, node, self.module(node), name, default)

    def set_operand(self, node: torch.fx.Node, name: str, value: Any) -> None:
        """Set argument operand ``name`` of ``node`` (positional or keyword, as the rule declares)."""
        self.set_arg(node, getattr(self.rule.operands, name), name, value)

    def set_arg(self, node: torch.fx.Node, index: int, name: str, value: Any) -> None:
        if len(node.args) > index:
            args = list(node.args)
            args[index] = value
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, name: value}

    def set_args(self, node: torch.fx.Node, args: tuple) -> None:
        node.args = args

    def replace(self, node: torch.fx.Node, target: Any, args: tuple, kwargs: dict) -> None:
        node.op, node.target, node.args, node.kwargs = "call_function", target, args, kwargs


def _assign(root: torch.nn.Module, names: list[str], value: torch.Tensor) -> None:
    """Install ``value`` under every name in ``names`` (one tensor: ties stay ties)."""
    first_owner, _, first_attr = names[0].rpartition(".")
    old = getattr(root.get_submodule(first_owner) if first_owner else root, first_attr)
    if isinstance(old, torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = root.get_submodule(owner_name) if owner_name else root
        if attr in owner._parameters:
            owner._parameters[attr] = value
        elif attr in owner._buffers:
            owner._buffers[attr] = value
        else:
            setattr(owner, attr, value)


def _sliced(t: torch.Tensor, dims: dict[int, np.ndarray]) -> torch.Tensor:
    """A new tensor holding the kept positions of ``t`` (never a view of it)."""
    with torch.no_grad():
        t = t.detach()
        for dim, idx in dims.items():
            t = t.index_select(dim, torch.as_tensor(idx, dtype=torch.long, device=t.device))
    return t


def _presliced(model: torch.nn.Module, cuts: dict[str, dict[int, np.ndarray]]
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(original, sliced copy)`` of the cut tensors that ``model`` holds under one name only.

    The model copy takes these instead of full copies; a tensor shared under several
    names (tied weights) is copied whole and sliced afterwards, as before.
    """
    uses: dict[int, int] = {}
    state: dict[str, torch.Tensor] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        uses[id(t)] = uses.get(id(t), 0) + 1
        state[name] = t
    return {name: (state[name], _sliced(state[name], dims)) for name, dims in cuts.items()
            if name in state and type(state[name]) in (torch.Tensor, torch.nn.Parameter)
            and uses[id(state[name])] == 1}


def _slice_state(slim: torch.nn.Module, cuts: dict[str, dict[int, np.ndarray]],
                 done: Container[str] = ()) -> set[str]:
    """Slice parameters and buffers (those in ``done`` already are); return the changed modules.
    A tensor held under several names (tied weights) is sliced once and stays tied."""
    state = named_state(slim)
    names: dict[int, list[str]] = {}
    for name, t in [*slim.named_parameters(remove_duplicate=False), *slim.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(name)
    changed = set()
    for param, dims in cuts.items():
        if param not in state:
            continue
        aliases = names.get(id(state[param]), [param])
        if param not in done:
            _assign(slim, aliases, _sliced(state[param], dims))
        changed.update(a.rpartition(".")[0] for a in aliases)
    return changed


def _freeze_widths(graph: torch.fx.Graph, dg: DependencyGraph) -> None:
    """Numbers computed from channel widths (``x.size(1)``, ``C ** -0.5``, ``C // heads``) keep
    their original values, as the masked original computes them. Sizes of axes that carry
    channels are then set to the slim widths by the reshape rules' patches, which run after
    this; every other size stays what it was."""
    widths = dg.width_values
    if not widths:
        return
    for node in graph.nodes:
        if node.name in widths or node.op not in ("call_function", "call_method", "call_module"):
            continue
        used = {a: a.meta["shape"] for a in node.all_input_nodes if a.name in widths}
        if not used:
            continue
        node.args = torch.fx.node.map_arg(node.args, lambda a, used=used: used.get(a, a))
        node.kwargs = torch.fx.node.map_arg(node.kwargs, lambda a, used=used: used.get(a, a))
    for node in reversed(list(graph.nodes)):  # size queries nothing reads any more
        if not node.users and (node.name in widths or node.name in dg.width_axes):
            graph.erase_node(node)


def _drop_vanished(graph: torch.fx.Graph, vanished: set[str], modules: dict[str, torch.nn.Module]) -> None:
    """Remove layers that lost every channel; the concatenations that read them shrink."""
    for node in graph.nodes:
        if node.name in vanished or node.op != "call_function":
            continue
        rule = find_rule(node, None)
        if rule is not None and rule.kind == CONCAT and isinstance(node.args[0], (list, tuple)) and any(
                isinstance(t, torch.fx.Node) and t.name in vanished for t in node.args[0]):
            kept = [t for t in node.args[0] if not (isinstance(t, torch.fx.Node) and t.name in vanished)]
            node.args = (kept,) + tuple(node.args[1:])
    for node in reversed(list(graph.nodes)):
        if node.name in vanished:
            graph.erase_node(node)
    if vanished:
        graph.eliminate_dead_code(is_impure_node=lambda n: _has_effect(n, modules))


def _has_effect(node: torch.fx.Node, modules: dict[str, torch.nn.Module]) -> bool:
    """Whether dead-code elimination must keep ``node`` although nothing reads its output:
    fx's impure nodes, and in-place operations, which change a tensor that other nodes read."""
    module = modules.get(node.target) if node.op == "call_module" else None
    if node.op == "call_module":  # fx's own purity check needs a GraphModule; the graph has none yet
        if getattr(module, "_is_impure", False) is True:
            return True
    elif node.is_impure():
        return True
    return is_inplace(node, module)


def apply(model: torch.nn.Module, dg: DependencyGraph, plan: Plan | dict, *, check: bool = True,
          output: str = "graph", attributes: dict[str, Any] | None = None) -> torch.nn.Module:
    """A new GraphModule computing ``model`` with the plan's channels physically removed.

    ``output="module"`` returns instead a copy of ``model`` in its own classes (its
    methods and config: ``generate()``, ``save_pretrained()``), checked against the
    GraphModule (see ``graphprune.module_form``); ``attributes`` gives widths its code
    reads that cannot be inferred (``{"blocks.0.attn.head_dim": 8}``).

    ``model`` must be the module ``dg`` was built from, or one with the same code and
    parameter shapes (a fine-tuned copy): another forward is refused with ``InputError``
    (a fingerprint of every submodule's code, recorded when ``dg`` was built). It is not
    mutated. With ``check`` the slim
    module is run once on zeros shaped like the example inputs to confirm it keeps the
    original output shapes.
    """
    if output not in ("graph", "module"):
        raise InputError(f"output must be 'graph' (a GraphModule) or 'module' (the model's own classes), got {output!r}")
    plan = plan if isinstance(plan, Plan) else Plan(plan)
    plan.validate(dg)
    dg.check_model(model)
    if getattr(dg, "code", None) is not None:
        check_same_code(model, dg.code)
    removal = Removal(dg, plan)
    vanished, problems = removal.vanished, removal.problems
    if problems:
        raise PlanError("the plan empties layers whose outputs are still needed: "
                        + "; ".join(problems[:5]) + ". Keep at least one channel in those groups")

    cuts = removal.cuts()
    presliced = _presliced(model, cuts)
    slim = empty_graph_module(model, type(model).__name__ + "Slim")
    copy_targets(model, dg, slim, replace=presliced)
    graph = copy.deepcopy(dg.gm.graph)
    changed = _slice_state(slim, cuts, done=presliced)
    # a module is touched when it or a submodule of it holds a sliced tensor
    touched_modules = {".".join(c.split(".")[:i]) for c in changed for i in range(1, c.count(".") + 2)}
    modules = dict(slim.named_modules())
    rw = RewriteContext(removal, modules, slim)
    edits: list[str] = []  # calls whose arguments the slim graph changed (the module form cannot)
    try:
        _freeze_widths(graph, dg)
        for node in list(graph.nodes):
            if node.name in vanished or node.op in ("placeholder", "output", "get_attr"):
                continue
            module = modules.get(node.target) if node.op == "call_module" else None
            rule = find_rule(node, module)
            if rule is None:
                continue
            rw.rule = rule
            touched = module is not None and node.target in touched_modules
            if rule.resize is not None and touched:
                rule.resize(module)
            if rule.patch is not None:
                before = (node.op, node.target, node.args, node.kwargs)
                rule.patch(rw, node)
                if module is None and before != (node.op, node.target, node.args, node.kwargs):
                    edits.append(f"{node.name} ({getattr(before[1], '__name__', before[1])})")
        _drop_vanished(graph, vanished, modules)
        graph.lint()
        set_graph(slim, graph)  # code is generated once, for the final graph
        if vanished:
            slim.delete_all_unused_submodules()
    except (PlanError, RewriteError):
        raise
    except Exception as exc:  # a rule's patch failed: report the node, not the internals
        raise RewriteError(f"could not rewrite the graph for this plan: {type(exc).__name__}: {exc}") from exc
    meta, step = getattr(model, "meta", None), {"plan": plan.to_json(), "build": dict(getattr(dg, "build_options", {}))}
    prev = meta.get("graphprune") if isinstance(meta, dict) and isinstance(meta.get("graphprune"), dict) else {}
    if "graphprune_fixed" in dg.gm.meta:  # keyword arguments the traced graph fixed (use_cache=False)
        slim.meta["graphprune_fixed"] = dict(dg.gm.meta["graphprune_fixed"])
    slim.meta["graphprune"] = {**copy.deepcopy({k: prev[k] for k in ("origin", "inputs") if k in prev}), **step,
                               "plans": [*prev.get("plans", ()), step["plan"]],  # a slim input's chain goes on
                               "builds": [*prev.get("builds", ()), step["build"]]}
    if check or output == "module":
        _check_runs(slim, dg)
    if output == "module":
        return own_classes(model, dg, removal, slim, slice_state=_slice_state, rewrite_context=RewriteContext,
                           attributes=attributes, graph_edits=edits)
    return slim


def _check_runs(slim: torch.fx.GraphModule, dg: DependencyGraph) -> None:
    device = "meta" if on_meta_device(slim) else "cpu"  # a structure-only model runs on meta tensors
    inputs = [torch.zeros(s, dtype=d, device=device) for s, d in zip(dg.example_shapes, dg.example_dtypes)]
    out_node = next(n for n in dg.gm.graph.nodes if n.op == "output")
    expected = shape_of_meta(out_node.args[0])
    try:
        with torch.no_grad(), eval_mode(slim):
            got = shape_of(slim(*inputs))
    except Exception as exc:
        raise RewriteError(f"the slimmed model fails to run: {type(exc).__name__}: {exc}") from exc
    if _flat(got) != _flat(expected):
        raise RewriteError(f"the slimmed model's output shapes {got} differ from the original's {expected}")


def shape_of_meta(arg: Any) -> Any:
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("shape")
    if isinstance(arg, (tuple, list)):
        return tuple(shape_of_meta(a) for a in arg)
    if isinstance(arg, dict):
        return tuple(shape_of_meta(a) for a in arg.values())
    return arg


def _flat(s: Any) -> list:
    if isinstance(s, torch.Size):
        return [tuple(s)]
    if isinstance(s, (tuple, list)):
        return [x for item in s for x in _flat(item)]
    return [s]
