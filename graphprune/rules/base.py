"""The rule registry and the context rules work in.

A *rule* says how channels flow through one op family. It reads the channel labels of
the node's inputs, couples what must go together, and returns the labels of the
node's output. Labels are per tensor dimension: ``None`` for a dimension that carries
no channels (batch, spatial), else an int array with one *element* id per position
(``-1`` for a position that is not a prunable channel, such as a model-input channel
concatenated in). Elements belong to *roots*: a producer's output channels, a
parameter's dimension, or a pinned (unprunable) block.

Rules are registered for module types, functions and method names::

    @register(nn.ReLU, F.relu, torch.relu, "relu")
    def pointwise(ctx, node, module):
        return ctx.labels(node.args[0])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx

Labels = tuple  # tuple[np.ndarray | None, ...] for a tensor; Multi for tuples of tensors


class Multi(tuple):
    """Labels of a node that returns several tensors (split, chunk)."""


@dataclass(frozen=True)
class Rule:
    """How one op family moves channels.

    ``build(ctx, node, module)`` returns the output labels. ``resize(module)`` updates
    a module's width attributes after its parameters were sliced. ``patch(ctx, node)``
    rewrites literal width arguments of a node in the slim graph.
    """

    name: str
    build: Callable[..., Any]
    resize: Callable[[torch.nn.Module], None] | None = None
    patch: Callable[..., None] | None = None


_MODULE_RULES: dict[type, Rule] = {}
_FUNCTION_RULES: dict[Any, Rule] = {}
_METHOD_RULES: dict[str, Rule] = {}


def register(*keys: Any, resize: Callable | None = None, patch: Callable | None = None):
    """Register the decorated build function for module types, functions or method names.

    Strings name tensor methods (``"relu"`` for ``x.relu()``); types name ``nn.Module``
    classes (subclasses inherit the rule); anything else is a function target. Users
    register rules for their own modules the same way.
    """

    def deco(build: Callable) -> Callable:
        rule = Rule(build.__name__, build, resize, patch)
        for key in keys:
            if isinstance(key, str):
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


def find_rule(node: torch.fx.Node, module: torch.nn.Module | None) -> Rule | None:
    """The rule for ``node``, or None when no rule covers its op."""
    if node.op == "call_module":
        for cls in type(module).__mro__:
            if cls in _MODULE_RULES:
                return _MODULE_RULES[cls]
        return None
    if node.op == "call_function":
        return _FUNCTION_RULES.get(node.target)
    if node.op == "call_method":
        return _METHOD_RULES.get(node.target)
    return None


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
    return np.full(size, -1, dtype=np.int64) if labels is None else labels
