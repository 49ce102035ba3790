"""One call that runs the pipeline: trace, group, score, select, rewrite, count.

``prune(model, example_inputs, method, ratio, ...)`` picks the step planner for
``method`` (a criterion, or LEAN) and runs the one pruning loop (``graphprune.steps``).

>>> import graphprune as gp
>>> model, x = gp.zoo.create("resnet20")
>>> result = gp.prune(model, x, method="magnitude", ratio=0.5)
>>> result.after.macs < result.before.macs
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from graphprune.errors import InputError
from graphprune.graph import DependencyGraph
from graphprune.importance import score
from graphprune.lean import prune as lean_prune
from graphprune.metrics import count
from graphprune.plan import Plan
from graphprune.select import TARGETS, select
from graphprune.steps import Pruner, PruneResult, Step, check_schedule

__all__ = ["PruneResult", "prune", "ScorePlanner"]


@dataclass
class ScorePlanner:
    """Each step: score with a criterion, then ``select`` the step's share of ``ratio``.

    Step ``k`` of ``n`` brings the amount removed to ``ratio * k / n`` of the original
    (channels of every group, or the model's MACs or parameters).
    """

    method: str | Callable
    ratio: float
    example_inputs: Any
    data: Iterable | None = None
    target: str = "channels"
    select_options: dict[str, Any] = field(default_factory=dict)
    criterion_options: dict[str, Any] = field(default_factory=dict)
    tolerance: float = 0.01
    base: int | None = None  # MACs or parameters of the original model, for those targets

    def plan(self, model: torch.nn.Module, dg: DependencyGraph, step: Step) -> Plan:
        scores = score(self.method, model, dg, data=self.data, **self.criterion_options)
        n, k = step.steps, step.index
        done, goal = self.ratio * (k - 1) / n, self.ratio * k / n
        options = dict(self.select_options, ignore=step.ignore)
        if self.target == "channels":
            return select(dg, scores, 1 - (1 - goal) / (1 - done), **options)
        now = getattr(count(model, self.example_inputs), self.target)
        if self.base is None:
            self.base = now
        r = min(max(0.0, 1 - self.base * (1 - goal) / now), 0.999999) if now else 0.0
        return select(dg, scores, r, target=self.target, model=model, example_inputs=self.example_inputs,
                      tolerance=self.tolerance * self.base / max(now, 1), **options)


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
      fine-tune it; a module the callback returns replaces the slim model. To step
      through the loop yourself, iterate a ``graphprune.steps.Pruner``.

    ``model`` is not modified. ``result.plan`` is on the original model's graph
    (``result.graph``): applying it to ``model`` gives the architecture of
    ``result.model``.
    """
    check_schedule(ratio, steps, callback)
    if method == "lean":  # LEAN keeps kernels along chains, then channels: see graphprune.lean.prune
        return lean_prune(model, example_inputs, ratio, steps=steps, callback=callback, ignore=ignore,
                          leaf_modules=leaf_modules, **options)
    if target not in TARGETS:
        raise InputError(f"target must be 'channels', 'macs' or 'params', got {target!r}")
    if steps > 1 and data is not None and iter(data) is data:
        data = list(data)  # a one-shot iterator: every step scores on the same batches
    planner = ScorePlanner(method, ratio, example_inputs, data, target,
                           dict(scope=scope, min_keep=min_keep, round_to=round_to, normalize=normalize),
                           options, tolerance)
    return Pruner(model, example_inputs, planner, steps=steps, ignore=ignore,
                  leaf_modules=leaf_modules).run(callback)
