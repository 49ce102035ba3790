"""The op table: one ``Rule`` per op family, looked up by module type, function or method.

A rule says everything graphprune knows about an op, in one record that every pass
reads (the JAX ``find_rule`` pattern; nothing outside ``graphprune.rules`` keeps op
lists of its own):

- ``build(ctx, node, module)``: the labelling facet. It reads the channel labels of the
  node's inputs, couples what must go together, and returns the labels of the output.
  Labels are per tensor dimension: ``None`` for a dimension that carries no channels
  (batch, spatial), else an int array with one *element* id per position (``-1`` for a
  position that is not a prunable channel).
- ``resize(module)`` / ``patch(rw, node)``: the rewrite facets (width attributes of a
  sliced module; literal widths in the slim graph).
- ``macs(shapes, node, module, rule)``: the counting facet, written over shapes only
  (``Shapes``), so that one function counts a traced model and estimates the slim
  model of a plan.
- ``operands``: where the op keeps its weight, bias, stride, groups, norm statistics,
  as data (argument positions for function and ATen forms, attribute names for
  modules), read by labelling, rewrite, counting, LEAN and the criteria alike.
- ``kind``: what other passes may assume about the op (``LAYER``: a weighted layer
  ``[out, in, *kernel]``; ``NORM``: a per-channel affine normalisation; ``CONCAT``: a
  concatenation, which can do without an emptied input).

Rules are registered in their op family's own file, with their module, functional
and ATen forms::

    @register(nn.ReLU, F.relu, torch.relu, "relu", *aten_ops("relu.default"))
    def pointwise(ctx, node, module):
        return ctx.labels(node.args[0])

>>> import torch, torch.nn as nn
>>> node = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3))).graph.find_nodes(op="call_module")[0]
>>> rule = find_rule(node, nn.Conv2d(3, 8, 3))
>>> rule.kind, rule.operands.weight, rule.operands.groups
('layer', 'weight', 'groups')
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.fx

__all__ = [
    "Rule", "Operands", "Shapes", "Multi", "Labels", "register", "find_rule", "find_module_rule",
    "has_own_module_rule", "layer_width", "operand", "operand_shape", "is_transposed", "aten_ops", "op_name",
    "target_name", "arg",
    "as_array", "norm_dim", "unlabelled", "iter_arrays", "is_inplace", "LAYER", "NORM", "CONCAT",
]

Labels = tuple  # tuple[np.ndarray | None, ...] for a tensor; Multi for tuples of tensors

LAYER, NORM, CONCAT = "layer", "norm", "concat"


class Multi(tuple):
    """Labels of a node that returns several tensors (split, chunk)."""


@dataclass(frozen=True)
class Operands:
    """Where an op keeps its operands: declared once per form, read by every pass.

    Each field is an argument position (function and ATen forms; the keyword of the
    field's name is looked up too) or an attribute name (module forms), or None when
    the op has no such operand. ``dim`` / ``keepdim``: the axis an op reduces or orders along
    and its keep-the-axis flag. ``transposed`` says the weight is ``[in, out/groups,
    *kernel]`` (True), or where a per-call flag says so (an int: ``aten.convolution``'s
    argument 6; read it with ``is_transposed``); ``width`` names the module attribute holding
    the output width of a layer that produces channels (``out_channels``, ``out_features``).
    """

    input: int | str | None = 0
    weight: int | str | None = None
    bias: int | str | None = None
    stride: int | str | None = None
    groups: int | str | None = None
    running_mean: int | str | None = None
    running_var: int | str | None = None
    eps: int | str | None = None
    training: int | str | None = None
    normalized_shape: int | str | None = None
    scale: int | str | None = None
    dim: int | str | None = None
    keepdim: int | str | None = None
    transposed: bool | int = False
    width: str | None = None


@dataclass(frozen=True)
class Rule:
    """Everything graphprune knows about one op family (see the module docstring)."""

    name: str
    build: Callable[..., Any]
    resize: Callable[[torch.nn.Module], None] | None = None
    patch: Callable[..., None] | None = None
    macs: Callable[..., int] | None = None
    operands: Operands = field(default_factory=Operands)
    kind: str = ""


class Shapes(Protocol):
    """Shapes a ``macs`` facet reads: of node arguments and of named parameters.

    ``graphprune.metrics`` answers with the traced shapes, ``graphprune.removal.Removal``
    with the slim shapes a plan would give.
    """

    def of(self, x: Any) -> Any: ...

    def param(self, name: str) -> tuple[int, ...] | None: ...


_MODULE_RULES: dict[type, Rule] = {}
_FUNCTION_RULES: dict[Any, Rule] = {}
_METHOD_RULES: dict[str, Rule] = {}
_NAMED_RULES: dict[str, Rule] = {}  # "package.module:function" of functions not imported here
_TAG_RULES: dict[torch.Tag, Rule] = {}  # ATen overloads by tag (torch.Tag.pointwise)


def register(*keys: Any, resize: Callable | None = None, patch: Callable | None = None,
             macs: Callable | None = None, operands: Operands | None = None, kind: str = ""):
    """Register the decorated build function for module types, functions or method names.

    Strings name tensor methods (``"relu"`` for ``x.relu()``), or, written
    ``"package.module:function"``, functions of packages graphprune does not import
    (``"torchvision.ops.stochastic_depth:stochastic_depth"``); types name ``nn.Module``
    classes (subclasses inherit the rule); a ``torch.Tag`` covers every ATen overload
    with that tag that has no rule of its own; anything else is a function target (torch
    functions, ``operator`` functions, ATen overloads). Users register rules for their
    own modules the same way.
    """

    def deco(build: Callable) -> Callable:
        rule = Rule(build.__name__, build, resize, patch, macs, operands or Operands(), kind)
        for key in keys:
            if isinstance(key, str) and ":" in key:
                _NAMED_RULES[key] = rule
            elif isinstance(key, torch.Tag):
                _TAG_RULES[key] = rule
            elif isinstance(key, str):
                _METHOD_RULES[key] = rule
            elif isinstance(key, type):
                _MODULE_RULES[key] = rule
            else:
                _FUNCTION_RULES[key] = rule
        return build

    return deco


def has_own_module_rule(cls: type) -> bool:
    """Whether a rule was registered for exactly this module class."""
    return cls in _MODULE_RULES


def find_module_rule(cls: type) -> Rule | None:
    """The rule for module class ``cls`` (or its nearest registered base class)."""
    for base in cls.__mro__:
        if base in _MODULE_RULES:
            return _MODULE_RULES[base]
    return None


def layer_width(module: torch.nn.Module) -> int | None:
    """Output width of a module whose rule declares one (conv, linear layers), else None."""
    rule = find_module_rule(type(module))
    width = rule.operands.width if rule is not None else None
    return getattr(module, width, None) if width else None


def find_rule(node: torch.fx.Node, module: torch.nn.Module | None) -> Rule | None:
    """The rule for ``node``, or None when no rule covers its op."""
    if node.op == "call_module":
        return find_module_rule(type(module))
    if node.op == "call_function":
        target = node.target
        rule = _FUNCTION_RULES.get(target)
        if rule is None and _NAMED_RULES:
            rule = _NAMED_RULES.get(f"{getattr(target, '__module__', '')}:{getattr(target, '__qualname__', '')}")
        if rule is None and isinstance(target, torch._ops.OpOverload):
            rule = next((_TAG_RULES[t] for t in target.tags if t in _TAG_RULES), None)
        return rule
    if node.op == "call_method":
        return _METHOD_RULES.get(node.target)
    return None


def aten_ops(*names: str) -> list:
    """ATen overloads that exist in this torch build (``"relu.default"`` -> ``aten.relu.default``)."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(torch.ops.aten, packet, None), overload or "default", None)
        if op is not None:
            found.append(op)
    return found


# --- operands -----------------------------------------------------------------------------
def operand(rule: Rule, node: torch.fx.Node, module: torch.nn.Module | None, name: str,
            default: Any = None) -> Any:
    """Operand ``name`` of a call as its rule declares it: a module attribute or an argument."""
    spec = getattr(rule.operands, name)
    if spec is None:
        return default
    if isinstance(spec, str):
        return getattr(module, spec, default) if module is not None else default
    return arg(node, spec, name, default)


def is_transposed(rule: Rule, node: torch.fx.Node) -> bool:
    """Whether a layer's weight is ``[in, out/groups, *kernel]``: declared (``True``/``False``),
    or read from the call's argument at the declared position (``aten.convolution``)."""
    spec = rule.operands.transposed
    if isinstance(spec, bool):
        return spec
    return bool(arg(node, spec, "transposed", False))


def operand_param(rule: Rule, node: torch.fx.Node, name: str) -> str | None:
    """Qualified name of the parameter behind tensor operand ``name``: ``conv1.weight`` for a
    module form, the ``get_attr`` target for a function form; None for computed tensors."""
    spec = getattr(rule.operands, name)
    if isinstance(spec, str):
        return f"{node.target}.{spec}" if node.op == "call_module" else None
    if spec is None:
        return None
    x = arg(node, spec, name)
    return x.target if isinstance(x, torch.fx.Node) and x.op == "get_attr" else None


def operand_shape(shapes: Shapes, rule: Rule, node: torch.fx.Node, name: str) -> Any:
    """Shape of tensor operand ``name`` as ``shapes`` sees it (traced or slim)."""
    spec = getattr(rule.operands, name)
    if isinstance(spec, str):
        return shapes.param(f"{node.target}.{spec}") if node.op == "call_module" else None
    if spec is None:
        return None
    return shapes.of(arg(node, spec, name))


# --- small helpers rules share ---------------------------------------------------------------
def op_name(node: torch.fx.Node, module: torch.nn.Module | None = None) -> str:
    """A readable name for the op of a node: module class, function or method."""
    if node.op == "call_module":
        return f"{type(module).__name__} module {node.target!r}"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        mod = getattr(node.target, "__module__", "") or ""
        return f"function {mod + '.' if mod else ''}{name} (node {node.name!r})"
    if node.op == "call_method":
        return f"method Tensor.{node.target} (node {node.name!r})"
    return f"{node.op} {node.target!r}"


def target_name(node: torch.fx.Node) -> str:
    """Short op name of a call: ``view`` for ``x.view``, ``torch.reshape`` or ``aten.view.default``."""
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    return getattr(t, "__name__", str(t))


def arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given positionally at ``index`` or as a keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def as_array(labels: np.ndarray | None, size: int) -> np.ndarray:
    """Labels of one dimension as an array, ``-1`` where the dimension is unlabelled."""
    return np.full(size, -1, dtype=np.int32) if labels is None else labels  # int64 labels widen it


def norm_dim(d: int, ndim: int) -> int:
    """A possibly negative axis index as a non-negative one."""
    return d + ndim if d < 0 else d


def unlabelled(shape: Any) -> Any:
    """Labels for an output that carries no channels."""
    if isinstance(shape, torch.Size):
        return tuple(None for _ in shape)
    if isinstance(shape, tuple):
        return Multi(unlabelled(s) for s in shape)
    return None


def iter_arrays(labels: Any) -> Iterator[np.ndarray]:
    """Every label array inside a nested labels structure."""
    if isinstance(labels, np.ndarray):
        yield labels
    elif isinstance(labels, tuple):
        for item in labels:
            yield from iter_arrays(item)


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}


def is_inplace(node: torch.fx.Node, module: torch.nn.Module | None) -> bool:
    """Whether ``node`` writes into one of its inputs: ``nn.ReLU(inplace=True)``, ``x.relu_()``,
    ``torch.relu_``, ``x += y``, ``x[i] = y``, ``F.relu(x, inplace=True)``, ``aten.add_``."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return getattr(module, "inplace", False) is True
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        return True
    if node.op not in ("call_method", "call_function"):
        return False
    name = target_name(node)
    return isinstance(name, str) and name.endswith("_") and not name.startswith("_")
