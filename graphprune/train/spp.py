"""SPP, structured probabilistic pruning (Wang et al. 2017), on dependency-graph groups.

Every channel of a targeted group has a pruning probability ``p`` (initially 0). Every ``every``
training iterations the group's live channels are ranked by importance (L1 norm of the producer
rows by default; rank 0 = weakest) and ``p += Delta(r)``, clipped to [0, 1], where

    Delta(r) = A * exp(-alpha * r)                        for r <= N_c
    Delta(r) = 2 u A - A * exp(-alpha * (2 N_c - r))       for r >  N_c

is centrally symmetric about ``(N_c, u A)``, with ``alpha = ln(1/u) / N_c`` and ``N_c`` placed so
that ``Delta`` crosses zero between rank ``N_p - 1`` and ``N_p`` (``N_p`` = channels still to prune):
weak channels' probabilities rise, strong ones' fall. Before every iteration each channel is masked
with a Bernoulli draw of its ``p``; a channel whose ``p`` reaches 1 is masked for good. When every
group has lost ``floor(ratio * size)`` channels the masks stop and the model is slimmed
(``gp.apply``). Masks act on the consumers' input columns (``ChannelMasker``), i.e. exactly as removal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.errors import InputError
from graphprune.plan import Plan
from graphprune.train.masking import ChannelMasker, channel_rows, member_params, train_then_slim

__all__ = ["SPP", "spp", "SPPResult", "spp_increment"]


def spp_increment(ranks: np.ndarray, n_prune: float, A: float = 0.05, u: float = 0.25) -> np.ndarray:
    """``Delta(r)`` for ranks ``r`` (0 = weakest), zero crossing between ranks ``n_prune - 1`` and
    ``n_prune``.

    >>> d = spp_increment(np.arange(6), 3, A=0.1)
    >>> bool(d[0] == 0.1 and (d[:3] > 0).all() and (d[3:] < 0).all() and (np.diff(d) < 0).all())
    True
    """
    if not 0 < u < 0.5:
        raise InputError("SPP needs 0 < u < 0.5")
    r = np.asarray(ranks, dtype=np.float64)
    zero = max(float(n_prune) - 0.5, 1e-6)
    nc = zero / (2 - math.log(2 * u) / math.log(u))
    alpha = math.log(1 / u) / nc
    return np.where(r <= nc, A * np.exp(-alpha * r), 2 * u * A - A * np.exp(-alpha * (2 * nc - r)))


Criterion = Callable[[nn.Module, Any], dict[int, np.ndarray]]


def _l1_rows(model: nn.Module, dg) -> dict[int, np.ndarray]:
    state = member_params(model)
    return {g.id: channel_rows(g, state, ("out",)).detach().abs().sum(1).double().numpy()
            for g in dg.groups if g.prunable}


class SPP:
    """The SPP training plugin (for ``finetune(plugins=[...])``); ``stop`` turns true when done.

    Construct with the model, its graph and ``ratio`` (fraction of each group's channels to prune);
    it registers a ``ChannelMasker`` on the model. ``criterion(model, dg) -> {gid: scores}`` ranks
    channels (default: L1 norm of the producer rows).
    """

    def __init__(self, model: nn.Module, dg, ratio: float, *, groups: Iterable[int] | None = None,
                 A: float = 0.05, u: float = 0.25, every: int = 1, seed: int = 0,
                 criterion: Criterion | None = None) -> None:
        ids = [g.id for g in dg.groups if g.prunable and g.exact] if groups is None else list(groups)
        self.dg, self.ratio, self.A, self.u, self.every = dg, ratio, A, u, every
        self.masker = ChannelMasker(model, dg, ids)
        self.target = {gid: min(int(math.floor(ratio * dg.groups[gid].size + 1e-9)),
                                dg.groups[gid].size - 1) for gid in ids}
        self.prob = {gid: np.zeros(dg.groups[gid].size) for gid in ids}
        self.criterion = criterion or _l1_rows
        self.rng = np.random.default_rng(seed)
        self.steps = 0
        self.trace: list[dict[int, int]] = []  # permanently pruned count per group after each update

    @property
    def stop(self) -> bool:
        return all(len(self.masker.pruned[g]) >= n for g, n in self.target.items())

    def update(self, model: nn.Module) -> None:
        """One probability update from the current ranks."""
        with torch.no_grad():
            scores = self.criterion(model, self.dg)
        for gid, n in self.target.items():
            pruned = self.masker.pruned[gid]
            if len(pruned) >= n:
                self.prob[gid][:] = 0.0
                self.prob[gid][list(pruned)] = 1.0
                continue
            live = np.array([c for c in range(len(self.prob[gid])) if c not in pruned])
            order = live[np.argsort(np.asarray(scores[gid])[live], kind="stable")]
            ranks = np.empty(len(live))
            ranks[np.searchsorted(np.sort(live), order)] = np.arange(len(live))
            p = self.prob[gid]
            p[live] = np.clip(p[live] + spp_increment(ranks, n - len(pruned), self.A, self.u), 0.0, 1.0)
            full = live[p[live] >= 1.0]
            if len(full):  # never past the target: the weakest of the saturated ones go first
                full = sorted(full, key=lambda c: scores[gid][c])[: n - len(pruned)]
                self.masker.prune(gid, full)
        self.trace.append({g: len(self.masker.pruned[g]) for g in self.target})

    def sample(self) -> None:
        """Draw the masks for the next iteration (Bernoulli of the probabilities)."""
        for gid in self.target:
            if len(self.masker.pruned[gid]) >= self.target[gid]:
                self.masker.set(gid, np.ones(len(self.prob[gid])))
            else:
                self.masker.set(gid, (self.rng.random(len(self.prob[gid])) >= self.prob[gid]).astype(float))

    def after_step(self, model: nn.Module) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            self.update(model)
        self.sample()

    def finish(self) -> Plan:
        """Force the target (highest probability, then weakest, first) and return the plan."""
        scores = self.criterion(self.masker.model, self.dg)
        for gid, n in self.target.items():
            left = n - len(self.masker.pruned[gid])
            if left > 0:
                live = [c for c in range(len(self.prob[gid])) if c not in self.masker.pruned[gid]]
                live.sort(key=lambda c: (-self.prob[gid][c], scores[gid][c]))
                self.masker.prune(gid, live[:left])
        self.masker.refresh()
        return self.masker.plan()


@dataclass
class SPPResult:
    """Slim model, the plan on the input model's graph, probabilities, and the training histories."""

    model: torch.fx.GraphModule
    plan: Plan
    probabilities: dict[int, np.ndarray]
    reached: bool
    history: list[dict[str, float]] = field(default_factory=list)


def spp(model: nn.Module, dg, data: Iterable, ratio: float, *, epochs: int = 5, A: float = 0.05,
        u: float = 0.25, every: int = 1, seed: int = 0, groups: Iterable[int] | None = None,
        criterion: Criterion | None = None, finetune_epochs: int = 0, **train: Any) -> SPPResult:
    """Train ``model`` (in place) with SPP until every group reaches ``ratio`` (or ``epochs`` run out:
    then the most probable channels are pruned to reach it, ``reached=False``), slim it, and
    optionally fine-tune the slim model for ``finetune_epochs``. ``train`` goes to ``finetune``."""
    plugin = SPP(model, dg, ratio, groups=groups, A=A, u=u, every=every, seed=seed, criterion=criterion)
    slim, plan, reached, history = train_then_slim(model, data, plugin, epochs=epochs,
                                                   finetune_epochs=finetune_epochs, train=train)
    return SPPResult(slim, plan, plugin.prob, reached, history)
