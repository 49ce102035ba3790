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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from graphprune.graph import DependencyGraph
from graphprune.importance import score
from graphprune.importance.base import normalize_scores
from graphprune.metrics import count
from graphprune.plan import CountEstimator, Plan, resolve_ignore, select
from graphprune.rewrite import apply
from graphprune.train.finetune import finetune
from graphprune.verify import masked_model

__all__ = ["capped_select", "Sensitivity", "sensitivity", "ScheduleResult", "iterative_prune",
           "schedule_fractions", "group_keys"]


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
    raise ValueError(f"schedule must be 'constant' or 'geometric', got {kind!r}")


def _floor_keep(size: int, min_keep: int | float) -> int:
    if isinstance(min_keep, float) and 0 < min_keep < 1:
        return max(1, math.ceil(size * min_keep - 1e-9))
    return max(1, int(min_keep))


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
    """Like ``gp.select`` (lowest scores first) but group ``g`` loses at most ``ceilings[g]`` of its
    channels. ``ratio`` is the fraction of channels (of the scored groups), MACs or params to remove;
    if the ceilings do not allow it, as much as they allow is removed. Without ceilings this is
    ``gp.select``.

    ``scope="local"`` removes the same fraction ``t`` from every group (``min(t, ceiling)``), ``t``
    found by bisection; ``"global"`` walks one ranking of all channels, skipping full groups.
    """
    if ceilings is None:
        return select(dg, scores, ratio, target=target, scope=scope, min_keep=min_keep, ignore=ignore,
                      normalize=normalize)
    skip = resolve_ignore(dg, ignore)
    gids = [g.id for g in dg.groups if g.prunable and g.id in scores and g.id not in skip]
    orders = {gid: np.argsort(np.asarray(scores[gid], dtype=np.float64), kind="stable") for gid in gids}
    size = {gid: dg.groups[gid].size for gid in gids}
    cap = {gid: min(int(math.floor(max(0.0, float(ceilings.get(gid, 1.0))) * size[gid] + 1e-9)),
                    size[gid] - _floor_keep(size[gid], min_keep)) for gid in gids}
    est = CountEstimator(dg) if target in ("macs", "params") else None
    which = 0 if target == "params" else 1
    base = est.counts({})[which] if est is not None else sum(size.values())

    def reduction(plan: Plan) -> float:
        if est is None:
            return plan.n_removed / max(base, 1)
        return 1 - est.counts(plan)[which] / max(base, 1)

    if scope == "local":
        def plan_at(t: float) -> Plan:
            return Plan({gid: orders[gid][:min(int(math.floor(t * size[gid] + 1e-9)), cap[gid])].tolist()
                         for gid in gids})
        if reduction(plan_at(1.0)) <= ratio:
            return plan_at(1.0)
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if reduction(plan_at(mid)) >= ratio - 1e-12:
                hi = mid
            else:
                lo = mid
        return plan_at(hi)
    if scope != "global":
        raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
    norm = normalize_scores({gid: np.asarray(scores[gid], dtype=np.float64) for gid in gids}, normalize)
    ranked = sorted((float(norm[gid][c]), gid, int(c)) for gid in gids for c in range(size[gid]))
    seq, taken = [], dict.fromkeys(gids, 0)
    for _, gid, c in ranked:
        if taken[gid] < cap[gid]:
            taken[gid] += 1
            seq.append((gid, c))

    def prefix(k: int) -> Plan:
        out: dict[int, list[int]] = {}
        for gid, c in seq[:k]:
            out.setdefault(gid, []).append(c)
        return Plan(out)
    lo, hi = 0, len(seq)
    if reduction(prefix(hi)) <= ratio:
        return prefix(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if reduction(prefix(mid)) >= ratio - 1e-12:
            hi = mid
        else:
            lo = mid
    return prefix(hi)


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
class ScheduleResult:
    """Slim model after the last step; per-step history rows and plans (each on its step's graph)."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    plans: list[Plan] = field(default_factory=list)
    ceilings: dict[int, float] | None = None


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
    - ``eval_fn(model) -> float`` is recorded in the history before and after each retrain.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    if target not in ("channels", "macs", "params"):
        raise ValueError(f"target must be 'channels', 'macs' or 'params', got {target!r}")
    opts = dict(criterion_options or {})
    if data is not None:
        opts.setdefault("data", data)
        opts.setdefault("loss_fn", loss_fn)
    dg0 = DependencyGraph.build(model, example_inputs)
    if isinstance(ceilings, str):
        if ceilings == "auto":
            from graphprune.train.redundancy import redundancy

            if data is None:
                raise ValueError("ceilings='auto' needs data (the gradient redundancy estimate)")
            ceilings = redundancy(model, dg0, data, loss_fn=loss_fn).ceilings
        elif ceilings == "sensitivity":
            if eval_fn is None:
                raise ValueError("ceilings='sensitivity' needs eval_fn")
            sc = score(method, model, dg0, **opts)
            ceilings = sensitivity(model, dg0, eval_fn, scores=sc, progress=progress).ceilings(max_drop)
        else:
            raise ValueError(f"ceilings must be a dict, 'auto' or 'sensitivity', got {ceilings!r}")
    keys0 = group_keys(dg0)
    orig = {g.id: g.size for g in dg0.groups}
    result = ScheduleResult(model, ceilings=dict(ceilings) if ceilings is not None else None)
    base = count(model, example_inputs)
    base_n = base.macs if target == "macs" else base.params
    fracs = schedule_fractions(ratio, steps, schedule)
    current, dg = model, dg0
    for step, goal in enumerate(tqdm(fracs, desc="iterative prune", disable=not progress, leave=False), 1):
        if step > 1:
            dg = DependencyGraph.build(current, example_inputs)
        scores = score(method, current, dg, **opts)
        # Follow the original groups through the re-trace: original size, ceiling.
        orig_of: dict[int, int] = {}
        for g in dg.groups:
            keys = frozenset((m.param, m.dim) for m in g.members)
            hit = [gid for gid, k in keys0.items() if k & keys]
            if hit and g.prunable:
                orig_of[g.id] = hit[0]

        caps = None
        if ceilings is not None:
            caps = {gid: _allowed(orig[o], dg.groups[gid].size, float(ceilings.get(o, 1.0)))
                    for gid, o in orig_of.items()}
        if target == "channels" and scope == "local":
            # Exactly floor(goal * original size) gone from every group, without rounding drift.
            per = {gid: _allowed(orig[o], dg.groups[gid].size, goal) for gid, o in orig_of.items()}
            caps = {gid: min(v, caps.get(gid, 1.0)) if caps else v for gid, v in per.items()}
            r = 1.0 - 1e-9
        elif target == "channels":
            n0 = sum(orig[o] for o in orig_of.values())
            n = sum(dg.groups[gid].size for gid in orig_of)
            r = min(max(0.0, (goal * n0 - (n0 - n)) / max(n, 1)), 0.999)
        else:
            c = count(current, example_inputs)
            now = c.macs if target == "macs" else c.params
            r = min(max(0.0, 1 - base_n * (1 - goal) / max(now, 1)), 0.999)
        plan = capped_select(dg, scores, r, caps, target=target, scope=scope, min_keep=min_keep)
        slim = apply(current, dg, plan)
        row: dict[str, float] = {"step": step, "goal": goal}
        if eval_fn is not None:
            row["eval_pruned"] = float(eval_fn(slim))
        if retrain is not None:
            if callable(retrain):
                returned = retrain(slim, step)
                if isinstance(returned, nn.Module):
                    slim = returned
            else:
                kw = dict(retrain)
                train_data = kw.pop("data", data)
                kw.setdefault("progress", progress)
                kw.setdefault("loss_fn", loss_fn)
                finetune(slim, train_data, **kw)
        c = count(slim, example_inputs)
        row.update(params=c.params, macs=c.macs)
        if eval_fn is not None:
            row["eval"] = float(eval_fn(slim))
        result.history.append(row)
        result.plans.append(plan)
        current = slim
    result.model = current
    return result
