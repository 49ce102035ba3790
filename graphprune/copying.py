"""A fast deep copy of the modules and tensors a traced graph uses.

``copy_as_graph_module(model, dg, name)`` returns a new GraphModule running ``dg``'s
traced graph over copies of exactly the modules, parameters and buffers that graph
uses. It behaves as ``copy.deepcopy`` (ties, hooks, parametrizations, shared modules,
non-persistent buffers survive), several times faster for ordinary modules: plain
values are shared, tensors are cloned once, and anything unusual falls back to
``deepcopy``. ``replace`` lets the caller hand in already-sliced tensors, so that the
rewrite copies each cut tensor once, at its slim size.

>>> import torch, graphprune as gp
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
>>> dg = gp.DependencyGraph.build(model, torch.randn(2, 4))
>>> copy = copy_as_graph_module(model, dg, "Copy")
>>> copy.get_submodule("0") is not model[0], torch.equal(copy.get_submodule("0").weight, model[0].weight)
(True, True)
"""

from __future__ import annotations

import collections
import copy
import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

if TYPE_CHECKING:
    from graphprune.graph import DependencyGraph

__all__ = ["copy_as_graph_module", "copy_targets", "copy_module", "copy_tensor", "empty_graph_module",
           "set_graph"]


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


def copy_tensor(t: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
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


def copy_module(module: torch.nn.Module, memo: dict[int, Any]) -> torch.nn.Module:
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
            state[key] = {k: None if c is None else copy_module(c, memo) for k, c in value.items()}
        elif key in ("_parameters", "_buffers"):
            state[key] = {k: None if t is None else copy_tensor(t, memo) for k, t in value.items()}
        elif _is_atom(value):
            state[key] = value
        elif type(value) in (dict, set, list, collections.OrderedDict) and not value:
            state[key] = type(value)()
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__setstate__(state)
    return new


def copy_targets(model: torch.nn.Module, dg: DependencyGraph, root: torch.nn.Module,
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
            value = copy_module(source, memo)
        else:
            value = copy_tensor(source, memo) if isinstance(source, torch.Tensor) else copy.deepcopy(source, memo)
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


def empty_graph_module(model: torch.nn.Module, name: str) -> torch.fx.GraphModule:
    """A GraphModule named ``name`` with ``model``'s training flag and nothing in it yet."""
    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph(), name)
    gm.training = model.training
    return gm


def set_graph(gm: torch.fx.GraphModule, graph: torch.fx.Graph) -> None:
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
    (``replace`` as in ``copy_targets``)."""
    gm = empty_graph_module(model, name)
    copy_targets(model, dg, gm, replace)
    set_graph(gm, copy.deepcopy(dg.gm.graph))
    return gm
