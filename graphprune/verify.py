"""Exactness check: the slim model against the original with removed channels masked."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import torch
import torch.fx

from graphprune.graph import DependencyGraph
from graphprune.plan import Plan
from graphprune.rewrite import apply, copy_as_graph_module
from graphprune.rules.base import Multi
from graphprune.tracing import named_state, normalize_inputs

__all__ = ["verify", "masked_model", "masked_forward"]


def masked_model(model: torch.nn.Module, dg: DependencyGraph, plan: Plan | dict) -> torch.nn.Module:
    """A copy of ``model`` whose consumers ignore the removed channels.

    Every input column (conv/linear weight ``in`` members) that reads a removed channel
    is zeroed; for channel-separable models this computes exactly what the slim model
    computes.
    """
    plan = plan if isinstance(plan, Plan) else Plan(plan)
    masked = copy.deepcopy(model)
    state = named_state(masked)
    with torch.no_grad():
        for g in dg.groups:
            if g.id not in plan:
                continue
            for m in g.members:
                if m.role != "in" or m.param not in state:
                    continue
                idx = m.indices(plan[g.id])
                if idx:
                    state[m.param].index_fill_(m.dim, torch.as_tensor(idx), 0.0)
    return masked


def _flatten(out: Any) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten(o)]
    return []


class _MaskedRun(torch.fx.Interpreter):
    """Run the traced graph, zeroing removed channels in every tensor it computes."""

    def __init__(self, gm: torch.fx.GraphModule, dg: DependencyGraph, removed: np.ndarray) -> None:
        super().__init__(gm)
        self.dg, self.removed = dg, removed

    def run_node(self, n: torch.fx.Node) -> Any:
        return self._mask(super().run_node(n), self.dg.node_labels.get(n.name))

    def _mask(self, value: Any, labels: Any) -> Any:
        if isinstance(value, torch.Tensor) and isinstance(labels, tuple) and not isinstance(labels, Multi):
            for d, lab in enumerate(labels):
                if lab is None or d >= value.dim():
                    continue
                keep = self.dg.keep_mask(lab, self.removed)
                if not keep.all():
                    shape = [1] * value.dim()
                    shape[d] = -1
                    mask = torch.as_tensor(keep, dtype=value.dtype).view(shape)
                    try:  # in place, so tensors aliasing this one (views, in-place ops) see it too
                        value.mul_(mask)
                    except RuntimeError:  # expanded or otherwise unwritable tensors
                        value = value * mask
            return value
        if isinstance(value, (tuple, list)) and isinstance(labels, Multi):
            return type(value)(self._mask(v, lab) for v, lab in zip(value, labels))
        return value


def masked_forward(model: torch.nn.Module, dg: DependencyGraph, plan: Plan | dict, inputs: tuple) -> Any:
    """Outputs of ``model`` with every removed channel zeroed: in every parameter slice
    it owns and in every tensor the graph computes (inside leaf modules such as
    attention, the zeroed weights do the masking)."""
    plan = plan if isinstance(plan, Plan) else Plan(plan)
    removed = dg.removed_classes(plan)
    gm = copy_as_graph_module(model, dg, "Masked").eval()
    state = named_state(gm)
    with torch.no_grad():
        for (param, dim), labels in dg.member_labels.items():
            drop = np.flatnonzero(~dg.keep_mask(labels, removed))
            if drop.size and param in state:
                state[param].index_fill_(dim, torch.as_tensor(drop), 0.0)
        return _MaskedRun(gm, dg, removed).run(*inputs)


def verify(
    model: torch.nn.Module,
    example_inputs: Any,
    plan: Plan | dict,
    *,
    dg: DependencyGraph | None = None,
    slim: torch.nn.Module | None = None,
) -> float:
    """Max |masked original - slim| over all outputs, in eval mode; inf if shapes differ.

    The masked original is the traced model with every removed channel zeroed where it
    is computed. Plans that touch inexact groups (normalisation across channels) cannot
    match exactly: for them the result is 0.0 when the slim outputs keep their shapes
    and are finite, inf otherwise, and a warning names the groups.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
    >>> verify(model, torch.randn(1, 3, 8, 8), {0: [1, 5]}) < 1e-5
    True
    """
    inputs = normalize_inputs(example_inputs)
    plan = plan if isinstance(plan, Plan) else Plan(plan)
    dg = dg or DependencyGraph.build(model, inputs)
    slim = slim if slim is not None else apply(model, dg, plan)
    want = _flatten(masked_forward(model, dg, plan, inputs))
    was_training = slim.training
    slim.eval()
    try:
        with torch.no_grad():
            got = _flatten(slim(*inputs))
    finally:
        slim.train(was_training)
    if len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got)):
        return float("inf")
    inexact = [g.id for g in dg.groups if g.id in plan and not g.exact]
    if inexact:
        warnings.warn(f"plan prunes inexact groups {inexact}; verify checked shapes and finiteness only",
                      stacklevel=2)
        return 0.0 if all(torch.isfinite(b).all() for b in got) else float("inf")
    diffs = [(a.double() - b.double()).abs().max().item() for a, b in zip(want, got) if a.numel()]
    return max(diffs, default=0.0)
