"""Exactness check: the slim model against the original with removed channels masked."""

from __future__ import annotations

import copy
from typing import Any

import torch

from graphprune.graph import DependencyGraph
from graphprune.plan import Plan
from graphprune.rewrite import apply
from graphprune.tracing import normalize_inputs

__all__ = ["verify", "masked_model"]


def masked_model(model: torch.nn.Module, dg: DependencyGraph, plan: Plan | dict) -> torch.nn.Module:
    """A copy of ``model`` whose consumers ignore the removed channels.

    Every input column (conv/linear weight ``in`` members) that reads a removed channel
    is zeroed; for channel-separable models this computes exactly what the slim model
    computes.
    """
    plan = plan if isinstance(plan, Plan) else Plan(plan)
    masked = copy.deepcopy(model)
    state = dict(masked.named_parameters())
    state.update(dict(masked.named_buffers()))
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


def verify(
    model: torch.nn.Module,
    example_inputs: Any,
    plan: Plan | dict,
    *,
    dg: DependencyGraph | None = None,
    slim: torch.nn.Module | None = None,
) -> float:
    """Max |masked original - slim| over all outputs, in eval mode; inf if shapes differ.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
    >>> verify(model, torch.randn(1, 3, 8, 8), {0: [1, 5]}) < 1e-5
    True
    """
    inputs = normalize_inputs(example_inputs)
    dg = dg or DependencyGraph.build(model, inputs)
    slim = slim if slim is not None else apply(model, dg, plan)
    masked = masked_model(model, dg, plan).eval()
    was_training = slim.training
    slim.eval()
    try:
        with torch.no_grad():
            want, got = _flatten(masked(*inputs)), _flatten(slim(*inputs))
    finally:
        slim.train(was_training)
    if len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got)):
        return float("inf")
    diffs = [(a.double() - b.double()).abs().max().item() for a, b in zip(want, got) if a.numel()]
    return max(diffs, default=0.0)
