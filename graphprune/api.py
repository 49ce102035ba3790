"""One call that runs the pipeline: trace, group, score, select, rewrite, count."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from graphprune.errors import InputError
from graphprune.graph import DependencyGraph
from graphprune.importance import score
from graphprune.metrics import Counts, count
from graphprune.plan import Plan, select
from graphprune.rewrite import apply

__all__ = ["PruneResult", "prune"]


@dataclass
class PruneResult:
    """What ``prune`` returns: the slim model, its plan, and counts before and after."""

    model: torch.fx.GraphModule
    plan: Plan
    before: Counts
    after: Counts
    graph: DependencyGraph


def prune(
    model: torch.nn.Module,
    example_inputs: Any,
    method: str = "magnitude",
    ratio: float = 0.5,
    data: Iterable | None = None,
    *,
    ignore: Iterable[int] = (),
    leaf_modules: Iterable[type | str] = (),
    **options: Any,
) -> PruneResult:
    """Prune ``ratio`` of the channels of every prunable group, lowest scores first.

    ``method`` names a criterion (``magnitude``, ``random``, ...); ``options`` go to
    it (``p=1``, ``seed=0``). ``model`` is not modified.
    """
    if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise InputError(f"ratio must be a number in [0, 1), got {ratio!r}")
    dg = DependencyGraph.build(model, example_inputs, leaf_modules=leaf_modules)
    scores = score(method, model, dg, data=data, **options)
    plan = select(dg, scores, ratio, ignore=set(ignore))
    slim = apply(model, dg, plan)
    return PruneResult(slim, plan, count(model, example_inputs), count(slim, example_inputs), dg)
