"""Rewrite a model into a slimmed ``torch.fx.GraphModule`` that follows a plan.

``apply`` copies the model, slices every parameter and buffer along the axes the plan's
groups own, updates width attributes of the modules (``in_channels``, ``groups``,
``num_features`` ...), rewrites literal widths in the graph (``view`` sizes, ``split``
sections, slice bounds, functional ``groups=``), drops layers whose every channel went
(from the ``torch.cat`` that read them), and checks the result runs with the original
output shapes. The user's model is never touched.
"""

from __future__ import annotations

import collections
import copy
import functools
import operator
from collections.abc import Container
from typing import Any

import numpy as np
import torch
import torch.fx

from graphprune.errors import PlanError, RewriteError
from graphprune.graph import CAT_TARGETS, DependencyGraph, iter_arrays
from graphprune.plan import Plan
from graphprune.rules.base import Multi, find_rule
from graphprune.tracing import eval_mode, named_state, shape_of

__all__ = ["apply"]


class RewriteContext:
    """What rule patches see while rewriting: old and new shapes, labels, node edits."""

    def __init__(self, dg: DependencyGraph, removed: np.ndarray, modules: dict) -> None:
        self.dg = dg
        self.removed = removed
        self.modules = modules

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
        return self.dg.keep_mask(labels, self.removed)

    def old_shape(self, node: torch.fx.Node) -> Any:
        return node.meta.get("shape")

    def new_shape(self, node: torch.fx.Node) -> Any:
        return self._new(self.old_shape(node), self.labels(node))

    def _new(self, shape: Any, labels: Any) -> Any:
        if isinstance(shape, torch.Size):
            if labels is None:
                return tuple(shape)
            return tuple(int(self.keep(lab).sum()) if lab is not None else s
                         for s, lab in zip(shape, labels))
        if isinstance(shape, tuple) and isinstance(labels, Multi):
            return tuple(self._new(s, lab) for s, lab in zip(shape, labels))
        return shape

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


def _assign(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)


def _get_attr(root: torch.nn.Module, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


_ATOMS = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)


def _is_atom(value: Any) -> bool:
    return isinstance(value, _ATOMS) or (type(value) is tuple and all(isinstance(v, _ATOMS) for v in value))


@functools.cache
def _plain_copyable(cls: type) -> bool:
    """Whether ``copy.deepcopy`` of a ``cls`` instance is ``cls.__setstate__`` of a deep copy
    of its ``__dict__`` (no copy protocol of its own)."""
    return ("__deepcopy__" not in dir(cls) and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__ and cls.__getstate__ is torch.nn.Module.__getstate__)


def _copy_tensor(t: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
    """``copy.deepcopy(t, memo)``; a plain clone for ordinary tensors and parameters."""
    if id(t) in memo:
        return memo[id(t)]
    if (type(t) not in (torch.Tensor, torch.nn.Parameter) or t.__dict__ or t._base is not None
            or t.is_sparse or t.grad is not None):
        return copy.deepcopy(t, memo)  # views, subclasses, tensors with attributes or gradients
    with torch.no_grad():
        new = t.clone(memory_format=torch.preserve_format)
    if type(t) is torch.nn.Parameter:
        new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
    else:
        new.requires_grad_(t.requires_grad)
    memo[id(t)] = new
    return new


def _copy_module(module: torch.nn.Module, memo: dict[int, Any]) -> torch.nn.Module:
    """``copy.deepcopy(module, memo)``, several times faster for ordinary modules.

    Plain values (numbers, strings, tuples of them) are shared, empty hook tables are
    made anew, tensors and submodules are copied through ``memo`` (so ties survive);
    anything else, and modules with their own copy protocol, go through ``deepcopy``.
    """
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if not _plain_copyable(cls):
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state: dict[str, Any] = {}
    for key, value in module.__dict__.items():
        if key == "_modules":
            state[key] = {k: None if c is None else _copy_module(c, memo) for k, c in value.items()}
        elif key in ("_parameters", "_buffers"):
            state[key] = {k: None if t is None else _copy_tensor(t, memo) for k, t in value.items()}
        elif _is_atom(value):
            state[key] = value
        elif type(value) in (dict, set, list, collections.OrderedDict) and not value:
            state[key] = type(value)()
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__setstate__(state)
    return new


def _copy_targets(model: torch.nn.Module, dg: DependencyGraph, root: torch.nn.Module,
                  replace: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Install into ``root`` deep copies of every module and tensor ``dg``'s graph uses.

    ``replace`` maps names of parameters and buffers to ``(original, new)``: the copy
    holds ``new`` instead of a copy of the original (so sliced weights are copied once,
    at their new size). One memo serves the whole copy, so shared modules and tied
    weights stay shared. Containers on the way to a used module become plain
    ``nn.Module``s, as in ``torch.fx.GraphModule``; entries go straight into the
    ``_modules``/``_parameters``/``_buffers`` tables (the checks of ``Module.__setattr__``
    hold by construction and cost more than the copy).
    """
    memo: dict[int, Any] = {}
    if replace:
        for old, new in replace.values():
            if isinstance(old, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
            if old.__dict__:
                new.__dict__.update(copy.deepcopy(old.__dict__, memo))
            memo[id(old)] = new
    # in graph order, as GraphModule installs them: parameters keep the order they had
    targets = dict.fromkeys(n.target for n in dg.gm.graph.nodes if n.op in ("call_module", "get_attr"))
    for target in targets:
        try:
            source = _get_attr(model, target)
        except AttributeError:  # constants that tracing created live on the traced module only
            source = _get_attr(dg.gm, target)
        if isinstance(source, torch.nn.Module):
            value = _copy_module(source, memo)
        else:
            value = _copy_tensor(source, memo) if isinstance(source, torch.Tensor) else copy.deepcopy(source, memo)
        *path, field = target.split(".")
        owner = root
        for part in path:
            if owner._modules.get(part) is None:
                owner._modules[part] = torch.nn.Module()
            owner = owner._modules[part]
        if getattr(owner, field, None) is value:
            continue
        if isinstance(value, torch.nn.Module):
            owner._modules[field] = value
        elif isinstance(value, torch.nn.Parameter):
            owner._parameters[field] = value
        elif isinstance(value, torch.Tensor):
            owner.register_buffer(field, value)
        else:
            setattr(owner, field, value)


def _empty_graph_module(model: torch.nn.Module, name: str) -> torch.fx.GraphModule:
    """A GraphModule named ``name`` with ``model``'s training flag and nothing in it yet."""
    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph(), name)
    gm.training = model.training
    return gm


def _set_graph(gm: torch.fx.GraphModule, graph: torch.fx.Graph) -> None:
    """Give ``gm`` its graph (one code generation), as ``GraphModule.__init__`` would."""
    gm.graph = graph
    if graph._tracer_cls and "<locals>" not in graph._tracer_cls.__qualname__:
        gm._tracer_cls = graph._tracer_cls
    if graph._tracer_extras:
        gm._tracer_extras = graph._tracer_extras


def copy_as_graph_module(model: torch.nn.Module, dg: DependencyGraph, name: str,
                         replace: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
                         ) -> torch.fx.GraphModule:
    """A deep copy of ``model`` as a GraphModule running ``dg``'s traced graph
    (``replace`` as in ``_copy_targets``)."""
    gm = _empty_graph_module(model, name)
    _copy_targets(model, dg, gm, replace)
    _set_graph(gm, copy.deepcopy(dg.gm.graph))
    return gm


def _cuts(dg: DependencyGraph, removed: np.ndarray) -> dict[str, dict[int, np.ndarray]]:
    """Kept positions of every parameter/buffer axis that loses channels."""
    cuts: dict[str, dict[int, np.ndarray]] = {}
    for (param, dim), labels in dg.member_labels.items():
        keep = dg.keep_mask(labels, removed)
        if not keep.all():
            cuts.setdefault(param, {})[dim] = np.flatnonzero(keep)
    return cuts


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
    """Slice parameters and buffers (those in ``done`` already are); return the changed modules."""
    state = named_state(slim)
    changed = set()
    for param, dims in cuts.items():
        if param not in state:
            continue
        if param not in done:
            _assign(slim, param, _sliced(state[param], dims))
        changed.add(param.rpartition(".")[0])
    return changed


def _drop_vanished(graph: torch.fx.Graph, vanished: set[str], modules: dict[str, torch.nn.Module]) -> None:
    """Remove layers that lost every channel; the concatenations that read them shrink."""
    for node in graph.nodes:
        if node.name in vanished or node.op != "call_function":
            continue
        if node.target in CAT_TARGETS and any(
                isinstance(t, torch.fx.Node) and t.name in vanished for t in node.args[0]):
            kept = [t for t in node.args[0] if not (isinstance(t, torch.fx.Node) and t.name in vanished)]
            node.args = (kept,) + tuple(node.args[1:])
    for node in reversed(list(graph.nodes)):
        if node.name in vanished:
            graph.erase_node(node)
    if vanished:
        graph.eliminate_dead_code(is_impure_node=lambda n: _has_effect(n, modules))


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul}


def _has_effect(node: torch.fx.Node, modules: dict[str, torch.nn.Module]) -> bool:
    """Whether dead-code elimination must keep ``node`` although nothing reads its output:
    fx's impure nodes, and in-place operations (``nn.ReLU(inplace=True)``, ``x.relu_()``,
    ``torch.relu_``, ``x += y``), which change a tensor that other nodes read."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":  # fx's own purity check needs a GraphModule; the graph has none yet
        module = modules.get(node.target)
        return getattr(module, "_is_impure", False) is True or getattr(module, "inplace", False) is True
    if node.is_impure():
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        return True
    return node.op in ("call_method", "call_function") and isinstance(name, str) \
        and name.endswith("_") and not name.endswith("__")


def apply(model: torch.nn.Module, dg: DependencyGraph, plan: Plan | dict, *, check: bool = True) -> torch.fx.GraphModule:
    """A new GraphModule computing ``model`` with the plan's channels physically removed.

    ``model`` must be the module ``dg`` was built from (or one with the same
    architecture and parameter shapes); it is not mutated. With ``check`` the slim
    module is run once on zeros shaped like the example inputs to confirm it keeps the
    original output shapes.
    """
    plan = plan if isinstance(plan, Plan) else Plan(plan)
    plan.validate(dg)
    dg.check_model(model)
    removed = dg.removed_classes(plan)
    vanished, problems = dg.vanish_blockers(removed)
    if problems:
        raise PlanError("the plan empties layers whose outputs are still needed: "
                        + "; ".join(problems[:5]) + ". Keep at least one channel in those groups")

    cuts = _cuts(dg, removed)
    presliced = _presliced(model, cuts)
    slim = _empty_graph_module(model, type(model).__name__ + "Slim")
    _copy_targets(model, dg, slim, replace=presliced)
    graph = copy.deepcopy(dg.gm.graph)
    changed = _slice_state(slim, cuts, done=presliced)
    # a module is touched when it or a submodule of it holds a sliced tensor
    touched_modules = {".".join(c.split(".")[:i]) for c in changed for i in range(1, c.count(".") + 2)}
    modules = dict(slim.named_modules())
    rw = RewriteContext(dg, removed, modules)
    rw.slim = slim
    try:
        for node in list(graph.nodes):
            if node.name in vanished or node.op in ("placeholder", "output", "get_attr"):
                continue
            module = modules.get(node.target) if node.op == "call_module" else None
            rule = find_rule(node, module)
            if rule is None:
                continue
            touched = module is not None and node.target in touched_modules
            if rule.resize is not None and touched:
                rule.resize(module)
            if rule.patch is not None:
                rule.patch(rw, node)
        _drop_vanished(graph, vanished, modules)
        graph.lint()
        _set_graph(slim, graph)  # code is generated once, for the final graph
        if vanished:
            slim.delete_all_unused_submodules()
    except (PlanError, RewriteError):
        raise
    except Exception as exc:  # a rule's patch failed: report the node, not the internals
        raise RewriteError(f"could not rewrite the graph for this plan: {type(exc).__name__}: {exc}") from exc
    meta, step = getattr(model, "meta", None), {"plan": plan.to_json(), "build": dict(getattr(dg, "build_options", {}))}
    prev = meta.get("graphprune") if isinstance(meta, dict) and isinstance(meta.get("graphprune"), dict) else {}
    slim.meta["graphprune"] = {**copy.deepcopy({k: prev[k] for k in ("origin", "inputs") if k in prev}), **step,
                               "plans": [*prev.get("plans", ()), step["plan"]],  # a slim input's chain goes on
                               "builds": [*prev.get("builds", ()), step["build"]]}
    if check:
        _check_runs(slim, dg)
    return slim


def _check_runs(slim: torch.fx.GraphModule, dg: DependencyGraph) -> None:
    inputs = [torch.zeros(s, dtype=d) for s, d in zip(dg.example_shapes, dg.example_dtypes)]
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


__all__ += ["RewriteContext", "iter_arrays"]
