"""One call that runs the pipeline: trace, group, score, select, rewrite, count."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from graphprune.errors import InputError
from graphprune.graph import DependencyGraph
from graphprune.importance import score
from graphprune.metrics import Counts, count
from graphprune.plan import Plan, resolve_ignore, select
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


def _removal_map(dg: DependencyGraph, plan: Plan) -> dict[tuple[str, int], list[int]]:
    """Positions each (parameter, axis) loses under ``plan``, in the current model's indexing."""
    out: dict[tuple[str, int], list[int]] = {}
    for gid, channels in plan.items():
        for m in dg.groups[gid].members:
            out.setdefault((m.param, m.dim), []).extend(m.indices(channels))
    return out


def _compose(dg0: DependencyGraph, kept: dict[tuple[str, int], np.ndarray]) -> Plan:
    """The plan on the original graph that removes what the steps removed together."""
    removed: dict[int, list[int]] = {}
    for g in dg0.groups:
        gone = set()
        for m in g.members:
            alive = kept.get((m.param, m.dim))
            if alive is None:
                continue
            alive = set(alive.tolist())
            by_channel: dict[int, bool] = {}
            for p, c in zip(m.positions, m.channels):
                by_channel[c] = by_channel.get(c, True) and p not in alive
            gone |= {c for c, dead in by_channel.items() if dead}
        if gone:
            removed[g.id] = sorted(gone)
    return Plan(removed)


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
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise InputError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if callback is not None and not callable(callback):
        raise InputError(f"callback must be callable(model, step), got {type(callback).__name__}")
    if method == "lean":  # LEAN keeps kernels along chains, then channels: see graphprune.lean.prune
        from graphprune.lean import prune as lean_prune

        return lean_prune(model, example_inputs, ratio, steps=steps, callback=callback, ignore=ignore,
                          leaf_modules=leaf_modules, **options)
    if steps > 1 and data is not None and iter(data) is data:
        data = list(data)  # a one-shot iterator: every step scores on the same batches
    dg0 = DependencyGraph.build(model, example_inputs, leaf_modules=leaf_modules)
    before = count(model, example_inputs)
    ignore = list(ignore)
    names = [i for i in ignore if isinstance(i, str)]
    ids = resolve_ignore(dg0, [i for i in ignore if not isinstance(i, str)])
    # Group ids change when a slim model is traced again: follow the groups by their slices.
    pinned = {(m.param, m.dim) for gid in ids for m in dg0.groups[gid].members}
    kept = {(param, dim): np.arange(dg0.state_shapes[param][dim])
            for (param, dim) in dg0.member_labels if param in dg0.state_shapes}
    current, dg = model, dg0
    base = before.macs if target == "macs" else before.params
    history = []
    for step in range(1, steps + 1):
        if step > 1:
            dg = DependencyGraph.build(current, example_inputs, leaf_modules=leaf_modules)
        skip = [g.id for g in dg.groups if any((m.param, m.dim) in pinned for m in g.members)] + names
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
        for key, positions in _removal_map(dg, plan).items():
            if key in kept:
                kept[key] = np.delete(kept[key], sorted(set(positions)))
        history.append(plan)
        if callback is not None:
            returned = callback(slim, step)
            if isinstance(returned, torch.nn.Module):
                slim = returned
        current = slim
    plan = history[0] if steps == 1 else _compose(dg0, kept)
    return PruneResult(current, plan, before, count(current, example_inputs), dg0, history)
