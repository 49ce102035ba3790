"""AOFP, approximated oracle filter pruning (Ding et al. 2019), on dependency-graph groups.

Runs during training, on all groups at once. Each group keeps a *search space* ``S`` (initially all
its live channels). At every search iteration a random half ``H`` of ``S`` is masked and the damage
to the next layer is measured on the current batch: ``||Y - Y_H||^2 / ||Y||^2`` summed over the
consumers (the modules whose input columns read the group; ``Y_H`` is their output with ``H``'s
columns zeroed, from the same inputs). Each channel in ``H`` accumulates that damage. Every
``rounds`` iterations the half ``L`` of ``S`` with the lowest mean damage is tested: if masking all
of ``L`` damages the next layer less than ``threshold``, ``L`` is masked for good and ``S`` resets to
the live channels; otherwise the search narrows to ``S = L`` (binary search for a cheap set). When
``S`` cannot shrink any more the group starts over, and if a whole sweep prunes nothing anywhere
the threshold grows by ``growth``. Search stops once the model's MACs are at most
``(1 - ratio)`` of the original (the last prune is cut to the channels needed), then the model is
slimmed. Masked channels are masked as removed (``ChannelMasker``); consumers are found through
the parametrized ``in``-member weights, so any module type works.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from graphprune.plan import CountEstimator, Plan
from graphprune.train.masking import ChannelMasker, train_then_slim

__all__ = ["AOFP", "aofp", "AOFPResult"]


class AOFP:
    """The AOFP training plugin (``finetune(plugins=[...])``); ``stop`` turns true at the MACs target."""

    def __init__(self, model: nn.Module, dg, ratio: float, *, groups: Iterable[int] | None = None,
                 rounds: int = 4, threshold: float = 0.05, growth: float = 1.5,
                 min_keep: int | float = 1, ceilings: dict[int, float] | None = None, seed: int = 0) -> None:
        ids = [g.id for g in dg.groups if g.prunable and g.exact] if groups is None else list(groups)
        self.dg, self.ratio, self.rounds, self.threshold, self.growth = dg, ratio, rounds, threshold, growth
        self.masker = ChannelMasker(model, dg, ids)
        self.rng = np.random.default_rng(seed)
        self.est = CountEstimator(dg)
        self.base = self.est.counts({})[1]
        self.goal = (1 - ratio) * self.base
        self.ids = [g for g in ids if g not in self.masker.unmaskable]
        self.max_prune: dict[int, int] = {}
        for gid in self.ids:
            size = dg.groups[gid].size
            keep = max(1, math.ceil(min_keep * size - 1e-9) if isinstance(min_keep, float) and min_keep < 1
                       else int(min_keep))
            cap = size - keep
            if ceilings is not None and gid in ceilings:
                cap = min(cap, int(math.floor(ceilings[gid] * size + 1e-9)))
            self.max_prune[gid] = max(0, cap)
        self.space = {gid: self._live(gid) for gid in self.ids}
        self.sum = {gid: np.zeros(dg.groups[gid].size) for gid in self.ids}
        self.cnt = {gid: np.zeros(dg.groups[gid].size) for gid in self.ids}
        self.iters = 0
        self.pruned_in_sweep = False
        self.exhausted: set[int] = set()
        self.log: list[dict[str, float]] = []
        self._captures: dict[nn.Module, list[torch.Tensor]] = {}
        self._consumers: dict[int, list[nn.Module]] = {}
        modules = dict(model.named_modules())
        for gid in self.ids:
            mods = []
            for m in dg.groups[gid].members:
                if m.role == "in":
                    owner = m.param.rpartition(".")[0]
                    mod = modules.get(owner, model if not owner else None)
                    if mod is not None and mod not in mods:
                        mods.append(mod)
            self._consumers[gid] = mods
        self._hooks = [mod.register_forward_hook(self._capture)
                       for mod in {id(m): m for ms in self._consumers.values() for m in ms}.values()]

    # --- bookkeeping -----------------------------------------------------------------------------
    def _live(self, gid: int) -> np.ndarray:
        return np.array([c for c in range(self.dg.groups[gid].size) if c not in self.masker.pruned[gid]])

    def _capture(self, module: nn.Module, args: tuple, output: Any) -> None:
        if module.training and args and isinstance(args[0], torch.Tensor):
            self._captures[module] = [a.detach() for a in args if isinstance(a, torch.Tensor)]

    def macs(self) -> int:
        return self.est.counts(self.masker.plan())[1]

    @property
    def stop(self) -> bool:
        return self.macs() <= self.goal

    def damage(self, gid: int, channels: Iterable[int]) -> float:
        """Next-layer damage of masking ``channels`` of ``gid`` on the last captured batch."""
        mask = torch.ones(self.dg.groups[gid].size)
        mask[torch.as_tensor(list(channels), dtype=torch.long)] = 0.0
        num = den = 0.0
        with torch.no_grad():
            for mod in self._consumers[gid]:
                args = self._captures.get(mod)
                if args is None:
                    continue
                was = mod.training
                mod.eval()
                try:
                    y = mod(*args)
                    with self.masker.override({gid: mask}):
                        y_h = mod(*args)
                finally:
                    mod.train(was)
                num += float((y - y_h).pow(2).sum())
                den += float(y.pow(2).sum())
        return num / max(den, 1e-12)

    def _prune(self, gid: int, chans: list[int]) -> None:
        room = self.max_prune[gid] - len(self.masker.pruned[gid])
        chans = chans[:max(room, 0)]
        if not chans:
            return
        # Cut the last prune to what the MACs target needs.
        for k in range(1, len(chans) + 1):
            trial = {g: sorted(self.masker.pruned[g] | (set(chans[:k]) if g == gid else set()))
                     for g in self.ids}
            if self.est.counts(Plan(trial))[1] <= self.goal:
                chans = chans[:k]
                break
        self.masker.prune(gid, chans)
        self.pruned_in_sweep = True

    def _reset(self, gid: int) -> None:
        self.space[gid] = self._live(gid)
        self.sum[gid][:] = 0
        self.cnt[gid][:] = 0

    # --- the search --------------------------------------------------------------------------------
    def after_backward(self, model: nn.Module) -> None:
        if self.stop:
            return
        self.iters += 1
        for gid in self.ids:
            if gid in self.exhausted or len(self.masker.pruned[gid]) >= self.max_prune[gid]:
                continue
            S = self.space[gid]
            if len(S) < 1:
                self._reset(gid)
                continue
            half = self.rng.choice(S, size=max(1, len(S) // 2), replace=False)
            d = self.damage(gid, half)
            self.sum[gid][half] += d
            self.cnt[gid][half] += 1
        if self.iters % self.rounds == 0:
            self._decide()

    def _decide(self) -> None:
        for gid in self.ids:
            if gid in self.exhausted or len(self.masker.pruned[gid]) >= self.max_prune[gid]:
                continue
            S = self.space[gid]
            mean = np.where(self.cnt[gid][S] > 0, self.sum[gid][S] / np.maximum(self.cnt[gid][S], 1), np.inf)
            L = [int(c) for c in S[np.argsort(mean, kind="stable")][:max(1, len(S) // 2)]]
            dmg = self.damage(gid, L)
            self.log.append({"iter": self.iters, "group": gid, "size": len(L), "damage": dmg,
                             "threshold": self.threshold})
            if dmg <= self.threshold:
                self._prune(gid, L)
                self._reset(gid)
                if self.stop:
                    return
            elif len(L) < len(S):
                self.space[gid] = np.array(L)
                self.sum[gid][:] = 0
                self.cnt[gid][:] = 0
            else:  # a single channel that is too expensive: this sweep is over for the group
                self.exhausted.add(gid)
                self._reset(gid)
        if len(self.exhausted) >= len([g for g in self.ids
                                       if len(self.masker.pruned[g]) < self.max_prune[g]]):
            if not self.pruned_in_sweep:
                self.threshold *= self.growth
            self.pruned_in_sweep = False
            self.exhausted.clear()

    def close(self) -> None:
        """Remove the hooks that record next-layer damage."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def finish(self) -> Plan:
        """Reach the MACs target if training ended first (lowest mean damage, then random, first)."""
        while not self.stop:
            best = None
            for gid in self.ids:
                if len(self.masker.pruned[gid]) >= self.max_prune[gid]:
                    continue
                live = self._live(gid)
                mean = np.where(self.cnt[gid][live] > 0, self.sum[gid][live] / np.maximum(self.cnt[gid][live], 1),
                                np.inf)
                j = int(np.argmin(mean))
                cand = (float(mean[j]) if np.isfinite(mean[j]) else math.inf, gid, int(live[j]))
                best = cand if best is None or cand < best else best
            if best is None:
                break
            self.masker.prune(best[1], [best[2]])
        self.close()
        self.masker.refresh()
        return self.masker.plan()


@dataclass
class AOFPResult:
    """Slim model, the plan (on the input graph), MACs before/after, whether search alone reached it."""

    model: torch.fx.GraphModule
    plan: Plan
    macs_before: int
    macs_after: int
    reached: bool
    log: list[dict[str, float]] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)


def aofp(model: nn.Module, dg, data: Iterable, ratio: float, *, epochs: int = 5, rounds: int = 4,
         threshold: float = 0.05, growth: float = 1.5, groups: Iterable[int] | None = None,
         min_keep: int | float = 1, ceilings: dict[int, float] | None = None, seed: int = 0,
         finetune_epochs: int = 0, **train: Any) -> AOFPResult:
    """Train ``model`` (in place) with AOFP until ``ratio`` of its MACs (as ``gp.count`` counts them on
    the graph's example inputs) are gone, slim it, optionally fine-tune. ``train`` goes to ``finetune``."""
    plugin = AOFP(model, dg, ratio, groups=groups, rounds=rounds, threshold=threshold, growth=growth,
                  min_keep=min_keep, ceilings=ceilings, seed=seed)
    slim, plan, reached, history = train_then_slim(model, data, plugin, epochs=epochs,
                                                   finetune_epochs=finetune_epochs, train=train)
    return AOFPResult(slim, plan, plugin.base, plugin.est.counts(plan)[1], reached, plugin.log, history)
