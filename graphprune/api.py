"""One call that runs the pipeline: trace, group, score, select, rewrite, count."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from graphprune.errors import InputError
from graphprune.graph import DependencyGraph
from graphprune.importance import score
from graphprune.metrics import Counts, count
from graphprune.plan import Plan, StepPlans, check_schedule, select
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
    history: list[Plan] = field(default_factory=list)  # each step's plan, on that step's graph


def prune(
    model: torch.nn.Module,
    example_inputs: Any,
    method: str | Callable = "magnitude",
    ratio: float = 0.5,
    data: Iterable | None = None,
    *,
    ignore: Iterable[int | str] = (),
    leaf_modules: Iterable[type | str] = (),
    target: str = "channels",
    scope: str = "local",
    round_to: int | None = None,
    min_keep: int | float = 1,
    normalize: str | bool | None = None,
    steps: int = 1,
    callback: Callable[[torch.fx.GraphModule, int], Any] | None = None,
    tolerance: float = 0.01,
    **options: Any,
) -> PruneResult:
    """Prune ``model``: score channels with ``method``, select, rewrite, count.

    - ``method`` names a criterion in ``graphprune.importance.CRITERIA`` (``magnitude``,
      ``bn_scale``, ``taylor``, ``hessian``, ``oracle``, ``shapley``, ``random`` ...) or is
      a callable with the criterion signature; ``options`` go to it (``p=1``, ``seed=0``,
      ``loss_fn=...``, ``permutations=5`` ...). Data-driven criteria need ``data``
      (iterable of ``(inputs, targets)``) and ``loss_fn``.
    - ``target``: what ``ratio`` removes: ``"channels"`` (of every group with
      ``scope="local"``, of all channels with ``"global"``), ``"macs"`` or ``"params"``
      (of the whole model, hit within ``tolerance``). ``round_to``, ``min_keep``,
      ``normalize`` and ``ignore`` (group ids or module names) are as in ``gp.select``.
    - ``method="lean"``: LEAN (``graphprune.lean.prune``); ``ratio`` is the fraction of
      kernels removed, ``steps`` its geometric schedule; options ``criterion``, ``n``,
      ``exclude``, ``mask_kernels``.
    - ``steps=N`` prunes iteratively: each step removes ``ratio / N`` of the original
      amount from the current slim model, re-tracing and re-scoring it, then calls
      ``callback(slim_model, step)`` (step = 1..N, after the last step too), e.g. to
      fine-tune it; a module the callback returns replaces the slim model.

    ``model`` is not modified. ``result.plan`` is on the original model's graph
    (``result.graph``): applying it to ``model`` gives the architecture of
    ``result.model``.
    """
    check_schedule(ratio, steps, callback)
    if method == "lean":  # LEAN keeps kernels along chains, then channels: see graphprune.lean.prune
        from graphprune.lean import prune as lean_prune

        return lean_prune(model, example_inputs, ratio, steps=steps, callback=callback, ignore=ignore,
                          leaf_modules=leaf_modules, **options)
    if steps > 1 and data is not None and iter(data) is data:
        data = list(data)  # a one-shot iterator: every step scores on the same batches
    dg0 = DependencyGraph.build(model, example_inputs, leaf_modules=leaf_modules)
    before = count(model, example_inputs)
    steps_done = StepPlans(dg0, ignore)
    current, dg = model, dg0
    base = before.macs if target == "macs" else before.params
    for step in range(1, steps + 1):
        if step > 1:
            dg = DependencyGraph.build(current, example_inputs, leaf_modules=leaf_modules)
        skip = steps_done.skip(dg)
        scores = score(method, current, dg, data=data, **options)
        done, goal = ratio * (step - 1) / steps, ratio * step / steps
        if target == "channels":
            r = 1 - (1 - goal) / (1 - done)
            plan = select(dg, scores, r, scope=scope, min_keep=min_keep, round_to=round_to,
                          ignore=skip, normalize=normalize)
        elif target in ("macs", "params"):
            now = count(current, example_inputs)
            now = now.macs if target == "macs" else now.params
            r = min(max(0.0, 1 - base * (1 - goal) / now), 0.999999) if now else 0.0
            plan = select(dg, scores, r, target=target, scope=scope, min_keep=min_keep,
                          round_to=round_to, ignore=skip, normalize=normalize, model=current,
                          example_inputs=example_inputs, tolerance=tolerance * base / max(now, 1))
        else:
            raise InputError(f"target must be 'channels', 'macs' or 'params', got {target!r}")
        slim = apply(current, dg, plan)
        steps_done.record(dg, plan)
        if callback is not None:
            returned = callback(slim, step)
            if isinstance(returned, torch.nn.Module):
                slim = returned
        current = slim
    return PruneResult(current, steps_done.composed(), before, count(current, example_inputs), dg0,
                       steps_done.history)
