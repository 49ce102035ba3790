"""Iterative prune-retrain schedules (Han et al. 2015), per-group ceilings, sensitivity analysis.

- ``iterative_prune``: ``steps`` rounds of score -> select -> slim -> retrain on the current slim
  model (re-traced each round). The cumulative amount removed follows a ``"constant"`` schedule
  (the same share of the original every step: ``ratio * k / steps``) or a ``"geometric"`` one (the
  same fraction of what remains: ``1 - (1 - ratio) ** (k / steps)``).
- Per-group *ceilings* (the largest fraction of a group's original channels that may go) come
  from a dict, from ``sensitivity`` analysis, or ``"auto"`` from the gradient-singularity
  redundancy estimate (``graphprune.train.redundancy``); they are followed across re-traces.
- ``capped_select``: selection under a channel/MACs/params target that never exceeds ceilings.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from graphprune.errors import InputError
from graphprune.graph import DependencyGraph
from graphprune.importance import score
from graphprune.metrics import CountEstimator, count
from graphprune.plan import Plan
from graphprune.select import resolve_ignore, select
from graphprune.steps import Pruner, PruneResult, Step
from graphprune.train.finetune import finetune
from graphprune.verify import masked_model

__all__ = ["capped_select", "Sensitivity", "sensitivity", "ScheduleResult", "SchedulePlanner",
           "iterative_prune", "schedule_fractions", "group_keys"]


def schedule_fractions(ratio: float, steps: int, kind: str = "constant") -> list[float]:
    """Cumulative fraction removed after each step.

    >>> schedule_fractions(0.5, 2)
    [0.25, 0.5]
    >>> [round(f, 4) for f in schedule_fractions(0.75, 2, "geometric")]
    [0.5, 0.75]
    """
    if kind == "constant":
        return [ratio * k / steps for k in range(1, steps + 1)]
    if kind == "geometric":
        return [1 - (1 - ratio) ** (k / steps) for k in range(1, steps + 1)]
    raise InputError(f"schedule must be 'constant' or 'geometric', got {kind!r}")


def capped_select(
    dg: DependencyGraph,
    scores: Mapping[int, np.ndarray],
    ratio: float,
    ceilings: Mapping[int, float] | None = None,
    *,
    target: str = "channels",
    scope: str = "local",
    min_keep: int | float = 1,
    ignore: Iterable[int | str] = (),
    normalize: str | None = None,
) -> Plan:
    """``gp.select`` where group ``g`` loses at most ``ceilings[g]`` of its channels, and the others
    make up for it: ``ratio`` is the fraction of all scored channels, or of the MACs or params, to
    remove in total (at least that much, as close as the channel granularity allows). If the
    ceilings do not allow it, as much as they allow is removed. Without ceilings this is
    ``gp.select``.

    ``gp.select(..., ceilings=ceilings)`` removes a fraction ``t`` of every group (``"local"``) or
    the ``t`` lowest-ranked channels (``"global"``), each group capped by its ceiling; ``t`` is
    found by bisection so that the total reaches ``ratio``.
    """
    options = dict(scope=scope, min_keep=min_keep, ignore=ignore, normalize=normalize)
    if ceilings is None:
        return select(dg, scores, ratio, target=target, **options)
    if target == "channels":
        skip = resolve_ignore(dg, ignore)
        total = sum(g.size for g in dg.groups if g.prunable and g.id in scores and g.id not in skip)

        def reduction(plan: Plan) -> float:
            return plan.n_removed / max(total, 1)
    else:
        est = CountEstimator(dg)
        which = 0 if target == "params" else 1
        base = est.counts({})[which]

        def reduction(plan: Plan) -> float:
            return 1 - est.counts(plan)[which] / max(base, 1)

    def plan_at(t: float) -> Plan:
        with warnings.catch_warnings():  # the ceilings may stop a group short: that is the point
            warnings.filterwarnings("ignore", message="select: asked to remove", category=RuntimeWarning)
            return select(dg, scores, t, ceilings=ceilings, **options)

    top = 1.0 - 1e-9
    if reduction(plan_at(top)) <= ratio:
        return plan_at(top)
    lo, hi = 0.0, top
    for _ in range(40):
        mid = (lo + hi) / 2
        if reduction(plan_at(mid)) >= ratio - 1e-12:
            hi = mid
        else:
            lo = mid
    return plan_at(hi)


@dataclass
class Sensitivity:
    """Per-group sensitivity curves: ``curves[gid] = [(ratio, score), ...]``; ``baseline`` unpruned."""

    baseline: float
    curves: dict[int, list[tuple[float, float]]]

    def ceilings(self, max_drop: float = 0.01) -> dict[int, float]:
        """Per group, the largest tested ratio whose score is within ``max_drop`` of the baseline."""
        out = {}
        for gid, curve in self.curves.items():
            ok = [r for r, s in curve if self.baseline - s <= max_drop]
            out[gid] = max(ok, default=0.0)
        return out


def sensitivity(
    model: nn.Module,
    dg: DependencyGraph,
    eval_fn: Callable[[nn.Module], float],
    *,
    method: str | Callable = "magnitude",
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    groups: Iterable[int] | None = None,
    scores: Mapping[int, np.ndarray] | None = None,
    progress: bool = True,
    **options: Any,
) -> Sensitivity:
    """Prune one group at a time (lowest-scored channels, masked, no retraining) at each of
    ``ratios`` and record ``eval_fn`` (higher is better) (Han et al. 2015; Li et al. 2017)."""
    scores = scores if scores is not None else score(method, model, dg, **options)
    ids = [g.id for g in dg.groups if g.prunable and g.id in scores] if groups is None else list(groups)
    base = float(eval_fn(model))
    curves: dict[int, list[tuple[float, float]]] = {}
    for gid in tqdm(ids, desc="sensitivity", disable=not progress, leave=False):
        order = np.argsort(np.asarray(scores[gid]), kind="stable")
        size = dg.groups[gid].size
        curves[gid] = []
        for r in ratios:
            n = min(int(math.floor(r * size + 1e-9)), size - 1)
            m = masked_model(model, dg, Plan({gid: order[:n].tolist()}))
            curves[gid].append((float(r), float(eval_fn(m))))
    return Sensitivity(base, curves)


def group_keys(dg: DependencyGraph) -> dict[int, frozenset[tuple[str, int]]]:
    """Each group's (parameter, axis) slices: stable names that survive re-tracing a slim model."""
    return {g.id: frozenset((m.param, m.dim) for m in g.members) for g in dg.groups}


def _allowed(s0: int, s: int, frac: float) -> float:
    """Fraction of a group now of ``s`` channels (originally ``s0``) that may go so that at most
    ``frac`` of the original channels are gone."""
    return max(0, math.floor(frac * s0 + 1e-9) - (s0 - s)) / s


@dataclass
class ScheduleResult(PruneResult):
    """A ``PruneResult`` with the per-group ceilings the schedule followed. ``records`` holds
    one row per step (goal, params, MACs, evaluations before and after retraining)."""

    ceilings: dict[int, float] | None = None


@dataclass
class SchedulePlanner:
    """Each step: score, then select the step's cumulative goal (a fraction of the original
    channels, MACs or params) under ceilings followed from the original graph's groups."""

    method: str | Callable
    goals: Sequence[float]
    target: str
    scope: str
    min_keep: int | float
    options: dict[str, Any]
    example_inputs: Any
    ceilings: Mapping[int, float] | None
    keys0: dict[int, frozenset[tuple[str, int]]]
    sizes0: dict[int, int]
    base: int
    eval_fn: Callable[[nn.Module], float] | None = None

    def plan(self, model: nn.Module, dg: DependencyGraph, step: Step) -> Plan:
        goal = self.goals[step.index - 1]
        scores = score(self.method, model, dg, **self.options)
        # Follow the original groups through the re-trace: original size, ceiling.
        orig_of: dict[int, int] = {}
        for g in dg.groups:
            keys = frozenset((m.param, m.dim) for m in g.members)
            hit = [gid for gid, k in self.keys0.items() if k & keys]
            if hit and g.prunable:
                orig_of[g.id] = hit[0]
        orig = self.sizes0
        caps = None
        if self.ceilings is not None:
            caps = {gid: _allowed(orig[o], dg.groups[gid].size, float(self.ceilings.get(o, 1.0)))
                    for gid, o in orig_of.items()}
        if self.target == "channels" and self.scope == "local":
            # Exactly floor(goal * original size) gone from every group, without rounding drift.
            per = {gid: _allowed(orig[o], dg.groups[gid].size, goal) for gid, o in orig_of.items()}
            caps = {gid: min(v, caps.get(gid, 1.0)) if caps else v for gid, v in per.items()}
            r = 1.0 - 1e-9
        elif self.target == "channels":
            n0 = sum(orig[o] for o in orig_of.values())
            n = sum(dg.groups[gid].size for gid in orig_of)
            r = min(max(0.0, (goal * n0 - (n0 - n)) / max(n, 1)), 0.999)
        else:
            now = getattr(count(model, self.example_inputs), self.target)
            r = min(max(0.0, 1 - self.base * (1 - goal) / max(now, 1)), 0.999)
        step.record["goal"] = goal
        return capped_select(dg, scores, r, caps, target=self.target, scope=self.scope, min_keep=self.min_keep,
                             ignore=step.ignore)

    def slimmed(self, step: Step) -> None:
        if self.eval_fn is not None:
            step.record["eval_pruned"] = float(self.eval_fn(step.model))

    def settled(self, step: Step) -> None:
        c = count(step.model, self.example_inputs)
        step.record.update(params=c.params, macs=c.macs)
        if self.eval_fn is not None:
            step.record["eval"] = float(self.eval_fn(step.model))


def iterative_prune(
    model: nn.Module,
    example_inputs: Any,
    *,
    ratio: float,
    steps: int = 3,
    schedule: str = "constant",
    method: str | Callable = "magnitude",
    target: str = "channels",
    scope: str = "local",
    data: Iterable | None = None,
    loss_fn: Callable = F.cross_entropy,
    retrain: Callable[[nn.Module, int], nn.Module | None] | Mapping[str, Any] | None = None,
    ceilings: Mapping[int, float] | str | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    max_drop: float = 0.02,
    min_keep: int | float = 1,
    progress: bool = True,
    criterion_options: Mapping[str, Any] | None = None,
) -> ScheduleResult:
    """Prune ``model`` in ``steps`` rounds, retraining after each; ``model`` is not modified.

    - ``ratio`` of channels (``target="channels"``), MACs or params is removed in total, following
      ``schedule`` (``"constant"`` or ``"geometric"``).
    - ``method``: any criterion name or callable (``gp.importance``); data-driven ones get ``data``
      and ``loss_fn``; ``criterion_options`` go to it too.
    - ``retrain``: ``callable(slim, step)`` (may return a replacement model), or a dict of
      ``finetune`` keyword arguments (``data`` is the training data), or None.
    - ``ceilings``: ``{group id of model's graph: max fraction}``, ``"auto"`` (gradient-singularity
      redundancy; needs ``data``), or ``"sensitivity"`` (per-group sensitivity analysis with
      ``eval_fn``, keeping each group's drop within ``max_drop``).
    - ``eval_fn(model) -> float`` is recorded in ``records`` before and after each retrain.

    It runs the one pruning loop (``graphprune.steps.Pruner``) with a ``SchedulePlanner``.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise InputError(f"ratio must be in [0, 1), got {ratio!r}")
    if target not in ("channels", "macs", "params"):
        raise InputError(f"target must be 'channels', 'macs' or 'params', got {target!r}")
    opts = dict(criterion_options or {})
    if data is not None:
        opts.setdefault("data", data)
        opts.setdefault("loss_fn", loss_fn)
    dg0 = DependencyGraph.build(model, example_inputs)
    if isinstance(ceilings, str):
        if ceilings == "auto":
            from graphprune.train.redundancy import redundancy

            if data is None:
                raise InputError("ceilings='auto' needs data (the gradient redundancy estimate)")
            ceilings = redundancy(model, dg0, data, loss_fn=loss_fn).ceilings
        elif ceilings == "sensitivity":
            if eval_fn is None:
                raise InputError("ceilings='sensitivity' needs eval_fn")
            sc = score(method, model, dg0, **opts)
            ceilings = sensitivity(model, dg0, eval_fn, scores=sc, progress=progress).ceilings(max_drop)
        else:
            raise InputError(f"ceilings must be a dict, 'auto' or 'sensitivity', got {ceilings!r}")
    base = getattr(count(model, example_inputs), target) if target != "channels" else 0
    planner = SchedulePlanner(method, schedule_fractions(ratio, steps, schedule), target, scope, min_keep, opts,
                              example_inputs, ceilings, group_keys(dg0), {g.id: g.size for g in dg0.groups},
                              base, eval_fn)

    def callback(slim: nn.Module, step: int) -> nn.Module | None:
        if callable(retrain):
            return retrain(slim, step)
        if retrain is not None:
            kw = dict(retrain)
            train_data = kw.pop("data", data)
            kw.setdefault("progress", progress)
            kw.setdefault("loss_fn", loss_fn)
            finetune(slim, train_data, **kw)
        return None

    pruner = Pruner(model, example_inputs, planner, steps=steps)
    for step in tqdm(pruner, total=steps, desc="iterative prune", disable=not progress, leave=False):
        returned = callback(step.model, step.index)
        if isinstance(returned, nn.Module):
            step.model = returned
    r = pruner.result
    return ScheduleResult(r.model, r.plan, r.before, r.after, r.graph, r.history, r.records,
                          ceilings=dict(ceilings) if ceilings is not None else None)
