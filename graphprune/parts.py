"""Prune a model that cannot be traced whole, part by part.

A detection model whose top-level ``forward`` runs data-dependent Python (proposal
filtering, ``len`` of a traced value, loops over boxes) becomes one graph neither by
torch.fx nor by torch.export. Its heavy parts usually can: the backbone with its FPN,
the heads' convolution towers. ``prune_parts`` runs the model once to record what each
submodule is called with, traces the largest submodules that trace (top down: a module
that fails is split into its children), prunes each of them with ``gp.prune`` and puts
the slim parts into a copy of the model. A part's outputs keep their widths (the code
around it reads them: groups that reach a part's output are pinned, as a model's are).

The result is checked twice. Every call a part received in the recorded run is replayed
on the slim part and on the part with its removed channels masked (``gp.masked_model``):
``max_diff`` is the largest difference, the exactness of the parts. Then the copy with slim
parts runs on the example inputs against the model with every part masked: ``output_diff``
compares the outputs through the untraceable code between the parts. That code may turn
differences at float precision into large ones (a top-k or NMS that orders near-equal scores
differently), so ``output_diff`` is reported, and ``max_diff`` is the check.

>>> import torch
>>> import graphprune as gp
>>> class Detector(torch.nn.Module):      # the top level cannot be traced: len() of a value
...     def __init__(self):
...         super().__init__()
...         self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
...                                             torch.nn.Conv2d(16, 8, 3, padding=1))
...     def forward(self, x):
...         f = self.backbone(x)
...         keep = torch.nonzero(f.flatten(1).amax(1) > 0)
...         return f[: len(keep)]
>>> result = gp.prune_parts(Detector(), torch.randn(2, 3, 16, 16), ratio=0.5)
>>> list(result.parts), result.after_params < result.before_params, result.max_diff < 1e-4
(['backbone'], True, True)
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from graphprune.errors import GraphPruneError, InputError, TraceError
from graphprune.importance import CRITERIA
from graphprune.preserve import untouched
from graphprune.steps import PruneResult
from graphprune.tracing import eval_mode

__all__ = ["prune_parts", "PartsResult"]

DATA_FREE = ("magnitude", "bn_scale", "random", "lean")


@dataclass
class PartsResult:
    """What ``prune_parts`` returns.

    ``model`` is a copy of the user's model (its own classes) whose pruned parts are slim
    GraphModules; ``parts`` maps each pruned part's qualified name to its ``PruneResult``;
    ``unpruned`` maps modules with parameters that no part covers to why (the trace error
    that split them, or that they were never called); ``part_diffs`` maps each part to the
    largest difference between it and the part with its removed channels masked, over every
    call it received while the model ran, and ``max_diff`` is the largest of them;
    ``output_diff`` compares the model's outputs with those of the original whose parts are
    masked (see the module docstring for why it may be large where ``max_diff`` is not).
    """

    model: torch.nn.Module
    parts: dict[str, PruneResult]
    unpruned: dict[str, str] = field(default_factory=dict)
    before_params: int = 0
    after_params: int = 0
    max_diff: float = 0.0
    output_diff: float = 0.0
    part_diffs: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines: parameters before and after, each part, what stayed whole and why."""
        lines = [f"parameters {self.before_params:,} -> {self.after_params:,} "
                 f"({self.after_params / max(self.before_params, 1):.2f} left); "
                 f"parts: max |masked - slim| = {self.max_diff:.2e} over their recorded calls; "
                 f"model outputs: {self.output_diff:.2e}"]
        for name, r in self.parts.items():
            lines.append(f"  part {name or '<model>'}: {r.before.params:,} -> {r.after.params:,} parameters, "
                         f"max diff {self.part_diffs.get(name, 0.0):.1e}")
        for name, why in self.unpruned.items():
            lines.append(f"  kept whole {name}: {why}")
        return "\n".join(lines)


def _record_calls(model: torch.nn.Module, example_inputs: Any, names: list[str] | None) -> dict[str, list]:
    """Run ``model`` once; the calls of the modules a search can make parts of (those named, or
    every module with parameters) as ``(args, kwargs)``, tensors cloned."""
    calls: dict[str, list] = {}
    handles = []
    for name, module in model.named_modules():
        if (name not in names) if names is not None else not _owns_parameters(module):
            continue

        def hook(_m: Any, args: tuple, kwargs: dict, name: str = name) -> None:
            calls.setdefault(name, []).append(_fresh((args, kwargs)))
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            _call(model, _fresh(example_inputs))
    except Exception as exc:
        raise InputError(f"{type(model).__name__} does not run on the example inputs: "
                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
    return calls


def _fresh(value: Any) -> Any:
    """``value`` with every tensor in it copied (a forward may change its inputs in place)."""
    return pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, value)


def _call(model: torch.nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _as_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """One recorded call as graphprune example inputs (a tuple of tensors, or keyword arguments),
    or None where it holds tensors inside containers or variadic arguments."""
    values = [*args, *kwargs.values()]
    if any(not isinstance(v, torch.Tensor) and any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(v))
           for v in values):
        return None
    if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
        return args
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError:
        return None
    params = inspect.signature(module.forward).parameters
    if any(params[n].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
           for n in bound.arguments):
        return None
    return dict(bound.arguments)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _owns_parameters(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _find_parts(model: torch.nn.Module, calls: dict[str, list], names: Iterable[str] | None,
                options: dict[str, Any]) -> tuple[dict[str, PruneResult], dict[str, str]]:
    from graphprune.api import prune

    parts: dict[str, PruneResult] = {}
    unpruned: dict[str, str] = {}
    queue = list(names) if names is not None else [""]
    explicit = names is not None
    while queue:
        name = queue.pop(0)
        module = model.get_submodule(name)
        if not _owns_parameters(module):
            continue
        children = [f"{name}.{c}" if name else c for c, _ in module.named_children()]
        recorded = calls.get(name)
        why = None
        if not recorded:
            why = "not called when the model ran on the example inputs"
        else:
            inputs = _as_inputs(module, *recorded[0])
            if inputs is None:
                why = "called with tensors inside lists or dicts, or through *args/**kwargs"
            else:
                try:
                    with untouched(module):
                        parts[name] = prune(module, inputs, **options)
                    continue
                except TraceError as exc:
                    why = f"cannot be traced: {_first_line(exc)}"
        if explicit and name in names:
            raise InputError(f"part {name!r} cannot be pruned on its own: {why}")
        if children:
            queue[:0] = children
        else:
            unpruned[name] = why
    return parts, unpruned


def _unique_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _flatten(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _with_parts(model: torch.nn.Module, replacements: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """A copy of ``model`` with the named submodules replaced (the root too, where named '')."""
    if "" in replacements:
        return replacements[""]
    out = copy.deepcopy(model)
    for name, part in replacements.items():
        parent, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent), leaf, part)
    return out


def prune_parts(
    model: torch.nn.Module,
    example_inputs: Any,
    parts: Iterable[str] | None = None,
    *,
    method: str = "magnitude",
    ratio: float = 0.5,
    **options: Any,
) -> PartsResult:
    """Prune the largest submodules of ``model`` that trace, each on the inputs it gets.

    Parameters
    ----------
    model
        Any module that runs on ``example_inputs`` (it is never changed).
    example_inputs
        A tensor, a tuple of tensors, or a dict of keyword arguments for ``model``.
    parts
        Qualified module names to prune (each must trace on its own); by default the
        model itself if it traces, otherwise its children, recursively.
    method, ratio, options
        As ``gp.prune`` for each part (``ratios``, ``ignore``, ``factor``, ``round_to`` ...).
        Criteria that need data (``taylor``, ``hessian``, ...) are refused: the data of
        the whole model is not the data of a part.

    Returns
    -------
    PartsResult
        The model with slim parts, each part's ``PruneResult``, what stayed whole and why,
        and the end-to-end check against the masked original.
    """
    if options.get("data") is not None or (isinstance(method, str) and method not in DATA_FREE
                                           and method in CRITERIA):
        raise InputError(f"prune_parts scores each part without data; use one of {', '.join(DATA_FREE)} "
                         f"(got method={method!r}{', data=...' if options.get('data') is not None else ''})")
    if "steps" in options and options["steps"] != 1:
        raise InputError("prune_parts prunes each part in one step (steps=1)")
    names = None if parts is None else [parts] if isinstance(parts, str) else list(parts)
    for name in names or ():
        try:
            model.get_submodule(name)
        except AttributeError as exc:
            raise InputError(f"parts names {name!r}, which is not a submodule of {type(model).__name__}") from exc
    with untouched(model), eval_mode(model):
        calls = _record_calls(model, example_inputs, names)
        found, unpruned = _find_parts(model, calls, names, dict(options, method=method, ratio=ratio))
    if not found:
        raise TraceError(f"no part of {type(model).__name__} could be traced and pruned: "
                         + "; ".join(f"{n or '<model>'}: {w}" for n, w in list(unpruned.items())[:5]))
    from graphprune.verify import masked_model

    masked_parts = {n: masked_model(model.get_submodule(n), r.graph, r.plan) for n, r in found.items()}
    part_diffs = {n: _replay(model.get_submodule(n), r.model, masked_parts[n], calls.get(n, []))
                  for n, r in found.items()}
    slim = _with_parts(model, {n: r.model for n, r in found.items()})
    masked = _with_parts(model, masked_parts)
    return PartsResult(model=slim, parts=found, unpruned=unpruned, before_params=_unique_params(model),
                       after_params=_unique_params(slim), max_diff=max(part_diffs.values(), default=0.0),
                       output_diff=_end_to_end(slim, masked, example_inputs), part_diffs=part_diffs)


def _replay(part: torch.nn.Module, slim: torch.nn.Module, masked: torch.nn.Module, calls: list) -> float:
    """The largest difference between a slim part and its masked original over recorded calls."""
    bound = [_as_inputs(part, args, kwargs) for args, kwargs in calls]
    return max((_end_to_end(slim, masked, inputs) for inputs in bound if inputs is not None), default=0.0)


def _end_to_end(slim: torch.nn.Module, masked: torch.nn.Module, example_inputs: Any) -> float:
    with torch.no_grad(), eval_mode(slim), eval_mode(masked):
        try:
            got = _flatten(_call(slim, _fresh(example_inputs)))
            want = _flatten(_call(masked, _fresh(example_inputs)))
        except GraphPruneError:
            raise
        except Exception as exc:
            raise TraceError(f"the model with its slim parts does not run: {_first_line(exc)}") from exc
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        return float("inf")
    diffs = [(a.double() - b.double()).abs().max().item() for a, b in zip(got, want)
             if a.is_floating_point() and a.numel()]
    return max(diffs, default=0.0)
