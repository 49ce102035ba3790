"""The pruning loop: build the graph, plan, rewrite, hand the slim model out, repeat.

``Pruner`` owns the one loop every pruning method runs (``gp.prune``, LEAN,
``graphprune.train.iterative_prune``). What differs between methods is the *planner*,
an object with one required method, ``plan(model, dg, step) -> Plan``, and two
optional hooks, ``slimmed(step)`` (right after the rewrite, e.g. to mask kernels) and
``settled(step)`` (once the caller is done with the step's model, e.g. to measure it).

Iterating a ``Pruner`` yields a ``Step`` after each rewrite, so the caller can
fine-tune between steps; assigning ``step.model`` replaces the model the next step
prunes. ``run(callback)`` does the same with a callback; ``result`` is the
``PruneResult`` once the loop has finished.

>>> import torch, graphprune as gp
>>> model, x = gp.zoo.create("mlp")
>>> class Half:
...     def plan(self, model, dg, step):
...         return gp.select(dg, gp.score("magnitude", model, dg), 0.5, ignore=step.ignore)
>>> pruner = Pruner(model, x, Half(), steps=2)
>>> for step in pruner:
...     print(step.index, gp.count(step.model, x).params)   # fine-tune step.model here
1 ...
2 ...
>>> pruner.result.after.params < pruner.result.before.params
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from graphprune.errors import InputError
from graphprune.graph import DependencyGraph
from graphprune.metrics import Counts, LayerComparison, count
from graphprune.plan import Plan
from graphprune.rewrite import apply
from graphprune.select import module_names, resolve_ignore

__all__ = ["Pruner", "Planner", "Step", "PruneResult", "StepPlans", "check_schedule"]


@dataclass
class PruneResult:
    """What a pruning loop returns: the slim model, its plan, and counts before and after.

    ``plan`` is on ``graph`` (the original model's graph): applying it to the original
    model gives the architecture of ``model``. ``history`` holds each step's plan (on
    that step's graph) and ``records`` one dict per step of what the planner measured.
    """

    model: torch.fx.GraphModule
    plan: Plan
    before: Counts
    after: Counts
    graph: DependencyGraph
    history: list[Plan] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)

    def layer_changes(self) -> LayerComparison:
        """Each layer before and after pruning: parameters, MACs per sample, output shape
        (``before.layers.compare(after.layers)``; ``.table()`` prints it)."""
        if self.before.layers is None or self.after.layers is None:
            raise InputError("these counts have no per-layer breakdown (they were estimated, not counted)")
        return self.before.layers.compare(self.after.layers)


@dataclass
class Step:
    """One step of the loop. ``model`` is the slim model; replace it to change what the next
    step prunes (a fine-tuned copy, say). ``ignore`` lists what the planner must leave whole
    on ``graph`` (the caller's ignored groups, followed across re-traces). ``record`` is
    what the planner reports about the step."""

    index: int
    steps: int
    graph: DependencyGraph
    ignore: list[int | str]
    plan: Plan = field(default_factory=Plan)
    model: torch.nn.Module | None = None
    record: dict[str, Any] = field(default_factory=dict)


class Planner(Protocol):
    """Decides each step's plan; ``slimmed(step)`` and ``settled(step)`` are optional hooks."""

    def plan(self, model: torch.nn.Module, dg: DependencyGraph, step: Step) -> Plan: ...


class StepPlans:
    """Bookkeeping of iterative pruning: each step's plan is on that step's (re-traced)
    graph; this follows the original graph's tensor slices through the steps.

    - ``skip(dg)``: group ids of ``dg`` to leave alone (the ignored groups of the
      original graph, found by the slices they own, plus ignored module names);
    - ``record(dg, plan)``: note what a step removed;
    - ``composed()``: one plan on the original graph that removes what all steps did.
    """

    def __init__(self, dg0: DependencyGraph, ignore: Any = ()) -> None:
        ignore = list(ignore)
        self.dg0 = dg0
        self.names = [i for i in ignore if isinstance(i, str)]
        ids = resolve_ignore(dg0, [i for i in ignore if not isinstance(i, str)])
        self.pinned = {(m.param, m.dim) for gid in ids for m in dg0.groups[gid].members}
        self.kept = {(param, dim): np.arange(dg0.state_shapes[param][dim])
                     for (param, dim) in dg0.member_labels if param in dg0.state_shapes}
        self.history: list[Plan] = []

    def skip(self, dg: DependencyGraph) -> list[int | str]:
        return [g.id for g in dg.groups if any((m.param, m.dim) in self.pinned for m in g.members)] + self.names

    def record(self, dg: DependencyGraph, plan: Plan) -> None:
        gone: dict[tuple[str, int], set[int]] = {}
        for gid, channels in plan.items():
            for m in dg.groups[gid].members:
                gone.setdefault((m.param, m.dim), set()).update(m.indices(channels))
        for key, positions in gone.items():
            if key in self.kept:
                self.kept[key] = np.delete(self.kept[key], sorted(positions))
        self.history.append(plan)

    def composed(self) -> Plan:
        if len(self.history) == 1:
            return self.history[0]
        removed: dict[int, list[int]] = {}
        for g in self.dg0.groups:
            gone: set[int] = set()
            for m in g.members:
                alive = self.kept.get((m.param, m.dim))
                if alive is None:
                    continue
                alive = set(alive.tolist())
                dead: dict[int, bool] = {}
                for p, c in zip(m.positions.tolist(), m.channels.tolist()):
                    dead[c] = dead.get(c, True) and p not in alive
                gone |= {c for c, is_dead in dead.items() if is_dead}
            if gone:
                removed[g.id] = sorted(gone)
        return Plan(removed)


def check_schedule(ratio: Any, steps: Any, callback: Any) -> None:
    """Raise ``InputError`` for a ratio outside [0, 1), a bad step count or callback."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise InputError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if callback is not None and not callable(callback):
        raise InputError(f"callback must be callable(model, step), got {type(callback).__name__}")


class Pruner:
    """The pruning loop over ``steps`` steps of ``planner`` (see the module docstring).

    ``build`` holds ``DependencyGraph.build`` options (``leaf_modules``, ``factor``,
    ``grouped``); ``ignore`` (group ids, module names or glob patterns of the original
    model's graph, or its modules, which are taken by name) is followed across re-traces
    and handed to the planner as ``step.ignore``. ``model`` is never modified.
    """

    def __init__(self, model: torch.nn.Module, example_inputs: Any, planner: Planner, *, steps: int = 1,
                 ignore: Iterable[Any] = (), **build: Any) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps must be a positive integer, got {steps!r}")
        self.model, self.example_inputs, self.planner = model, example_inputs, planner
        if isinstance(ignore, (str, torch.nn.Module)):
            ignore = [ignore]
        self.ignore = [n for i in ignore
                       for n in (module_names(None, i, model) if isinstance(i, torch.nn.Module) else [i])]
        self.steps, self.build = steps, build
        self._result: PruneResult | None = None

    def __iter__(self) -> Iterator[Step]:
        dg0 = DependencyGraph.build(self.model, self.example_inputs, **self.build)
        before = count(self.model, self.example_inputs)
        book = StepPlans(dg0, self.ignore)
        current, dg, records = self.model, dg0, []
        for index in range(1, self.steps + 1):
            if index > 1:
                dg = DependencyGraph.build(current, self.example_inputs, **self.build)
            step = Step(index, self.steps, dg, book.skip(dg))
            step.plan = self.planner.plan(current, dg, step)
            step.model = apply(current, dg, step.plan)
            book.record(dg, step.plan)
            _hook(self.planner, "slimmed", step)
            yield step
            _hook(self.planner, "settled", step)
            records.append({"step": index, **step.record})
            current = step.model
        self._result = PruneResult(current, book.composed(), before, count(current, self.example_inputs),
                                   dg0, book.history, records)

    def run(self, callback: Callable[[torch.fx.GraphModule, int], Any] | None = None) -> PruneResult:
        """Run every step; ``callback(slim_model, step)`` after each (a module it returns
        replaces the slim model)."""
        for step in self:
            if callback is not None:
                returned = callback(step.model, step.index)
                if isinstance(returned, torch.nn.Module):
                    step.model = returned
        return self.result

    @property
    def result(self) -> PruneResult:
        """The ``PruneResult``, once iteration has finished."""
        if self._result is None:
            raise InputError("the pruning loop has not finished: iterate the Pruner to the end or call run()")
        return self._result


def _hook(planner: Any, name: str, step: Step) -> None:
    hook = getattr(planner, name, None)
    if hook is not None:
        hook(step)
