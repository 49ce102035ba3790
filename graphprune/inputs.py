"""Example inputs bound to a model's ``forward``: positional tensors, or keyword arguments.

``bind_inputs(model, example_inputs)`` accepts a tensor, a tuple of tensors, or a dict of
keyword arguments (as Hugging Face models are called) and returns ``BoundInputs``: the
tensors the traced graph takes, in ``forward``'s parameter order, the keyword names, and
the non-tensor values the graph fixes (``use_cache=False``). Every stage that runs a
model on example inputs goes through it, so a dict means the same thing everywhere.

>>> import torch
>>> m = torch.nn.Linear(3, 2)
>>> b = bind_inputs(m, {"input": torch.zeros(1, 3)})
>>> b.names, [tuple(t.shape) for t in b.tensors]
(('input',), [(1, 3)])
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from graphprune.errors import InputError

__all__ = ["BoundInputs", "bind_inputs", "normalize_inputs", "fixed_arguments", "fresh_inputs"]


@dataclass(frozen=True)
class BoundInputs:
    """Example inputs bound to a model's ``forward``.

    ``tensors`` are the traced graph's positional inputs, in ``forward``'s parameter order.
    Example inputs given as a dict are keyword arguments: ``names`` holds the keyword of
    each tensor, and ``constants`` the non-tensor ones (``use_cache=False``), which the
    graph fixes; the traced graph's ``forward`` takes exactly ``names``, so the slim model
    is called as the model was (``slim(**kwargs)``, or positionally).
    """

    tensors: tuple[torch.Tensor, ...]
    names: tuple[str, ...] | None = None
    constants: dict[str, Any] = field(default_factory=dict)

    def kwargs(self, tensors: Sequence[torch.Tensor] | None = None) -> dict[str, Any]:
        """The keyword arguments of a call (``tensors`` in place of the example's)."""
        return {**dict(zip(self.names or (), tensors if tensors is not None else self.tensors)), **self.constants}

    def run(self, model: torch.nn.Module, tensors: Sequence[torch.Tensor] | None = None) -> Any:
        """Call ``model`` the way these inputs were given: keywords for a dict, else positionally."""
        tensors = tuple(tensors if tensors is not None else self.tensors)
        return model(**self.kwargs(tensors)) if self.names is not None else model(*tensors)


def _check_tensor(x: Any, where: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{where} is a {type(x).__name__}, expected a tensor")
    return x


def bind_inputs(model: torch.nn.Module | None, example_inputs: Any) -> BoundInputs:
    """``example_inputs`` (a tensor, a tuple of tensors, or a dict of keyword arguments) bound
    to ``model.forward``; ``InputError`` names what does not fit. A ``forward`` that takes
    ``use_cache`` (Hugging Face models) and is not given it is bound with ``use_cache=False``:
    a key/value cache is state for generation, not an output whose widths must be kept."""
    bound = _bind(model, example_inputs)
    return _without_cache(model, bound) if model is not None else bound


def _without_cache(model: torch.nn.Module, bound: BoundInputs) -> BoundInputs:
    params = inspect.signature(model.forward).parameters
    use_cache = params.get("use_cache")
    if use_cache is None or use_cache.default is False or "use_cache" in bound.constants or \
            "use_cache" in (bound.names or ()):
        return bound
    names = bound.names
    if names is None:  # positional tensors: bind them to forward's leading parameters by name
        leading = [n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                               inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        if len(leading) < len(bound.tensors) or "use_cache" in leading[:len(bound.tensors)] or any(
                params[n].kind is inspect.Parameter.POSITIONAL_ONLY for n in leading[:len(bound.tensors)]):
            return bound
        names = tuple(leading[:len(bound.tensors)])
    return BoundInputs(bound.tensors, names, {**bound.constants, "use_cache": False})


def _bind(model: torch.nn.Module | None, example_inputs: Any) -> BoundInputs:
    if isinstance(example_inputs, Mapping):
        if not example_inputs:
            raise InputError("example_inputs is an empty dict; give the model's keyword arguments")
        items = dict(example_inputs)
        fixed = getattr(model, "meta", {}).get("graphprune_fixed", {}) if model is not None else {}
        for key in [k for k in items if k in fixed]:  # baked into this traced graph when it was made
            if not isinstance(items[key], torch.Tensor):
                if items.pop(key) != fixed[key]:
                    raise InputError(f"{type(model).__name__} was traced with {key}={fixed[key]!r} fixed "
                                     f"in its graph; it cannot run with another value")
        if model is not None:
            params = inspect.signature(model.forward).parameters
            order = {name: i for i, name in enumerate(params)}
            takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            unknown = [k for k in items if k not in order or params[k].kind in (
                inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
            if unknown and not takes_any:
                named = [n for n, p in params.items() if p.kind not in (
                    inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
                raise InputError(f"example_inputs names {unknown}, which {type(model).__name__}.forward does "
                                 f"not take; its parameters are {named}")
            items = dict(sorted(items.items(), key=lambda kv: order.get(kv[0], len(order))))
        names = tuple(k for k, v in items.items() if isinstance(v, torch.Tensor))
        if not names:
            raise InputError("example_inputs (a dict) holds no tensor; give at least one tensor argument")
        tensors = tuple(_check_tensor(items[k], f"example_inputs[{k!r}]") for k in names)
        return BoundInputs(tensors, names, {k: v for k, v in items.items() if k not in names})
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, Sequence) or isinstance(example_inputs, str) or not example_inputs:
        raise InputError(
            "example_inputs must be a tensor, a non-empty tuple of tensors or a dict of keyword "
            f"arguments, got {type(example_inputs).__name__}"
        )
    return BoundInputs(tuple(_check_tensor(x, f"example_inputs[{i}]") for i, x in enumerate(example_inputs)))


def normalize_inputs(example_inputs: Any, model: torch.nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """The tensors of ``example_inputs`` in the traced graph's order (see ``bind_inputs``), or
    raise ``InputError``."""
    return bind_inputs(model, example_inputs).tensors


def fixed_arguments(model: torch.nn.Module, bound: BoundInputs) -> dict[str, Any]:
    """For keyword inputs: every parameter of ``forward`` they do not give, at its default, and
    the non-tensor ones they give; fx bakes these in, so the graph takes exactly ``bound.names``."""
    if bound.names is None:
        return {}
    fixed = dict(bound.constants)
    for name, p in inspect.signature(model.forward).parameters.items():
        if name in bound.names or name in fixed or p.kind in (inspect.Parameter.VAR_POSITIONAL,
                                                              inspect.Parameter.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise InputError(f"example_inputs (a dict) do not give {name!r}, which "
                             f"{type(model).__name__}.forward needs")
        fixed[name] = p.default
    return fixed


def fresh_inputs(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Copies of ``inputs`` for one run (a forward may change its inputs in place)."""
    out = []
    for x in inputs:
        y = x.detach().clone()
        out.append(y.requires_grad_() if x.requires_grad else y)
    return tuple(out)
