"""LEAN as a pruning method: one-shot, or LEAN's geometric schedule with retraining.

``prune(model, example_inputs, ratio, steps=...)`` is ``gp.prune(method="lean")``: the
one pruning loop (``graphprune.steps.Pruner``) with ``LeanPlanner``, which builds the
channel graph of the current model, extracts chains down to the step's kernel budget,
and turns the kept kernels into the step's plan (optionally masking the dropped
kernels inside surviving channels and holding them at zero through the callback).

>>> import torch, graphprune as gp
>>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
...                             torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
...                             torch.nn.Conv2d(8, 2, 1))
>>> result = prune(model, torch.randn(1, 1, 8, 8), ratio=0.75)
>>> result.records[0]["kept_kernels"] <= 0.25 * result.records[0]["original_kernels"] + 1
True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from graphprune.errors import InputError
from graphprune.graph import DependencyGraph
from graphprune.lean.channel_graph import CRITERIA, ChannelGraph
from graphprune.lean.kernels import (
    KernelMasker,
    LeanPlan,
    apply_kernel_masks,
    plan_from_kernels,
    slim_kernel_masks,
)
from graphprune.lean.paths import Extraction, extract
from graphprune.plan import Plan
from graphprune.steps import Pruner, PruneResult, Step, check_schedule

__all__ = ["geometric_keep", "lean_plan", "LeanPlanner", "prune"]


def geometric_keep(final_keep: float, steps: int) -> list[float]:
    """LEAN's schedule: the kept fraction after each of ``steps`` steps, ``final_keep ** (k / steps)``.

    >>> [round(k, 3) for k in geometric_keep(0.25, 2)]
    [0.5, 0.25]
    """
    if not 0 < final_keep <= 1:
        raise InputError(f"final_keep must be in (0, 1], got {final_keep!r}")
    return [final_keep ** ((k + 1) / steps) for k in range(steps)]


def lean_plan(
    model: nn.Module,
    dg: DependencyGraph,
    keep: float | int,
    *,
    criterion: str = "lean",
    n: int = 32,
    exclude: Iterable[str] | None = None,
    ignore: Iterable[int | str] = (),
    max_paths: int | None = None,
    progress: bool = False,
) -> tuple[LeanPlan, ChannelGraph, Extraction]:
    """Graph, extraction and plan in one call. ``criterion``: ``lean`` (chains of operator
    norms), ``opnorm`` or ``l1`` (individual kernels, global threshold)."""
    cg = ChannelGraph.build(model, dg, criterion=criterion, n=n, exclude=exclude)
    ext = extract(cg, keep, method="lean" if criterion == "lean" else "individual",
                  max_paths=max_paths, progress=progress)
    return plan_from_kernels(dg, cg, ext, ignore=ignore), cg, ext


@dataclass
class LeanPlanner:
    """Each step: channel graph of the current model, chains down to the step's kernel budget
    (``keeps[k]`` of the original model's kernels), kept kernels -> plan; optionally masks the
    dropped kernels inside surviving channels and holds them at zero until the step settles."""

    keeps: Sequence[float]
    criterion: str = "lean"
    n: int = 32
    exclude: list[str] | None = None
    mask: bool = False
    max_paths: int | None = None
    progress: bool = False
    total0: int | None = None
    _step: dict[str, Any] = field(default_factory=dict)

    def plan(self, model: nn.Module, dg: DependencyGraph, step: Step) -> Plan:
        t0 = time.perf_counter()
        cg = ChannelGraph.build(model, dg, criterion=self.criterion, n=self.n, exclude=self.exclude)
        if self.total0 is None:
            self.total0 = cg.n_kernels
        keep = self.keeps[step.index - 1]
        budget = int(round(keep * self.total0))
        ext = extract(cg, budget, method="lean" if self.criterion == "lean" else "individual",
                      max_paths=self.max_paths, progress=self.progress)
        lp = plan_from_kernels(dg, cg, ext, ignore=step.ignore)
        self._step = {"dg": dg, "lp": lp, "handles": [], "masker": None}
        step.record.update({"keep": keep, "original_kernels": self.total0, "budget": budget,
                            "paths": ext.n_paths, "path_kernels": ext.path_kernels,
                            "seconds": time.perf_counter() - t0, **lp.summary(), "masked": self.mask})
        return lp.plan

    def slimmed(self, step: Step) -> None:
        if self.mask:
            lp = self._step["lp"]
            masker = KernelMasker(slim_kernel_masks(self._step["dg"], lp.plan, lp.kernel_masks))
            apply_kernel_masks(step.model, masker.masks)
            self._step.update(masker=masker, handles=masker.hook(step.model))

    def settled(self, step: Step) -> None:
        for h in self._step.get("handles", ()):
            h.remove()
        if self._step.get("masker") is not None:
            apply_kernel_masks(step.model, self._step["masker"].masks)


def prune(
    model: nn.Module,
    example_inputs: Any,
    ratio: float = 0.5,
    *,
    steps: int = 1,
    callback: Callable[[torch.fx.GraphModule, int], Any] | None = None,
    criterion: str = "lean",
    n: int = 32,
    exclude: Iterable[str] | None = None,
    ignore: Iterable[int | str] = (),
    leaf_modules: Iterable[type | str] = (),
    mask_kernels: bool | None = None,
    schedule: Sequence[float] | None = None,
    max_paths: int | None = None,
    progress: bool = False,
) -> PruneResult:
    """LEAN pruning: remove ``ratio`` of the kernels, then every channel left without kernels.

    ``ratio`` is the fraction of *kernels* (kernel edges of the channel graph) removed:
    ``1 - ratio`` are kept. With ``steps > 1`` this runs LEAN's geometric schedule: step
    ``k`` keeps ``(1 - ratio) ** (k / steps)`` of the original kernels, re-tracing the
    current slim model, and calls ``callback(slim_model, step)`` after each step (e.g. a
    short fine-tune; a module it returns replaces the slim model). ``mask_kernels``
    (default: on when ``steps > 1``) zeroes the non-kept kernels inside surviving
    channels and holds them at zero through the callback (gradient hooks), so later
    steps see them as gone. ``criterion`` ``"opnorm"`` / ``"l1"`` are the individual
    baselines (global threshold on single kernels), with the same channel removal.
    ``schedule`` gives the kept fraction of the original kernels after each step
    explicitly (e.g. ``[0.8, 0.5, 0.3, 0.1, 0.05]``) and overrides ``ratio``/``steps``.

    Returns a ``gp.PruneResult`` (``plan`` on the original model's graph) whose
    ``records`` (also ``lean``) hold one dict per step (keep fraction, kernels and
    channels kept, extra sparsity from masks, chains, seconds).
    """
    check_schedule(ratio, steps, callback)
    if criterion not in CRITERIA:
        raise InputError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if schedule is not None:
        schedule = [float(k) for k in schedule]
        if not schedule or any(not 0 < k <= 1 for k in schedule):
            raise InputError(f"schedule must be a non-empty list of kept fractions in (0, 1], got {schedule!r}")
        steps = len(schedule)
    keeps = schedule or (geometric_keep(1 - ratio, steps) if ratio > 0 else [1.0] * steps)
    planner = LeanPlanner(keeps, criterion, n, None if exclude is None else list(exclude),
                          steps > 1 if mask_kernels is None else bool(mask_kernels), max_paths, progress)
    # LEAN's channel graph has a grouped conv's within-group kernels; its plans are made on
    # whole conv groups (grouped="groups"), as before "channels" became the build default
    result = Pruner(model, example_inputs, planner, steps=steps, ignore=ignore,
                    leaf_modules=list(leaf_modules), grouped="groups").run(callback)
    result.lean = result.records  # LEAN's name for the per-step records
    return result
