"""Shapley values of channels (Ancona et al., "Shapley Value as Principled Metric for
Structured Network Pruning", 2020), estimated by permutation sampling.

The players are the channels of one group; the value of a coalition ``S`` is the loss
increase when the channels in ``S`` are removed (the rest of the network intact). For
each of ``permutations`` random orders the channels are removed cumulatively, and each
channel is credited with the loss increase its own removal caused; the score is the
mean of those marginals. Per permutation the marginals sum to ``L(all removed) -
L(none removed)`` (the efficiency axiom), and with many permutations the estimate
converges to the exact Shapley value.

Cost: ``permutations x (group size - 1)`` ablations per batch and group. Only the
downstream part of the network runs per ablation: the graph is cut before the
group's first consumer and the upstream activations are computed once per batch and
cached (:class:`graphprune.importance.base.Ablator`), so keep ``data`` small (tens to
hundreds of samples; this criterion is meant for the low-data regime). ``truncation``
stops a permutation once the loss is within ``truncation x |L(all) - L(none)|`` of
the all-removed loss (truncated Monte Carlo, Ghorbani & Zou 2019); the rest of that
permutation's channels get a zero marginal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from graphprune.errors import InputError
from graphprune.importance.base import (
    Ablator,
    model_device,
    prepare_data,
    require_loss_fn,
)

__all__ = ["shapley"]


def _prefix_masks(perm: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """Rows of removal masks: row i removes ``perm[:ks[i]]``."""
    n = len(perm)
    rank = np.empty(n, dtype=np.int64)
    rank[perm] = np.arange(n)
    return rank[None, :] < ks[:, None]


def shapley(
    model: torch.nn.Module,
    dg: Any,
    *,
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    permutations: int = 5,
    truncation: float | None = None,
    seed: int = 0,
    batch_ablations: int | None = None,
    max_batches: int | None = None,
    groups: Iterable[int] | None = None,
    progress: bool | None = None,
    **_: Any,
) -> dict[int, np.ndarray]:
    """Permutation-sampled Shapley value of each channel's removal; higher = keep.

    ``permutations`` random orders per group (seeded by ``seed``); ``truncation`` is
    a relative tolerance (e.g. ``0.01``) for truncated sampling, ``None`` for none.
    ``progress=None`` shows a bar on a terminal, ``True`` always, ``False`` never.
    """
    if not isinstance(permutations, int) or permutations < 1:
        raise InputError(f"shapley: permutations must be a positive integer, got {permutations!r}")
    if truncation is not None and not truncation >= 0:
        raise InputError(f"shapley: truncation must be None or a number >= 0, got {truncation!r}")
    loss_fn = require_loss_fn(loss_fn, "shapley")
    batches = prepare_data(data, "shapley", model_device(model), max_batches)
    wanted = None if groups is None else {int(g) for g in groups}
    todo = [g for g in dg.groups if g.prunable and (wanted is None or g.id in wanted)]
    rng = np.random.default_rng(seed)
    scores: dict[int, np.ndarray] = {}
    bar = tqdm(total=len(todo) * permutations, desc="shapley", unit="perm",
               disable=None if progress is None else not progress)
    try:
        for g in todo:
            n = g.size
            ab = Ablator(model, dg, g, batches, loss_fn, name="shapley", chunk=batch_ablations)
            v0, v_all = ab.losses(np.vstack([np.zeros(n, bool), np.ones(n, bool)]))
            perms = [rng.permutation(n) for _ in range(permutations)]
            # values[p, k] = loss with perms[p][:k] removed
            values = np.empty((permutations, n + 1))
            values[:, 0], values[:, n] = v0, v_all
            inner = np.arange(1, n)
            if truncation is None:
                rows = np.vstack([_prefix_masks(p, inner) for p in perms]) if n > 1 else np.zeros((0, n), bool)
                if len(rows):
                    values[:, 1:n] = ab.losses(rows).reshape(permutations, n - 1)
                bar.update(permutations)
            else:
                tol = truncation * abs(v_all - v0)
                for p, perm in enumerate(perms):
                    k = 1
                    while k < n:
                        ks = inner[k - 1:k - 1 + ab.chunk]
                        values[p, ks] = ab.losses(_prefix_masks(perm, ks))
                        done = np.flatnonzero(np.abs(values[p, ks] - v_all) <= tol)
                        if done.size:
                            stop = ks[done[0]]
                            values[p, stop:] = values[p, stop]  # later marginals are zero
                            break
                        k += len(ks)
                    bar.update(1)
            marg = np.diff(values, axis=1)  # marg[p, k] credits perms[p][k]
            total = np.zeros(n)
            for p, perm in enumerate(perms):
                total[perm] += marg[p]
            scores[g.id] = total / permutations
    finally:
        bar.close()
    return scores
