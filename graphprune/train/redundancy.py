"""Per-layer redundancy from the singularity of gradient matrices (after Zhou et al. 2022).

For every prunable group, the gradients of its producer rows (``out`` members: conv filters,
linear rows, biases) over a few batches form a matrix ``G`` of shape ``[channels, D * batches]``
(one row per channel). If the loss only ever moves the channels inside a ``k``-dimensional
subspace, ``G`` has (numerical) rank ``k`` and the other ``channels - k`` directions are
redundant: the layer can lose up to ``1 - k / channels`` of its channels. The numerical rank is
the number of singular values needed to hold ``energy`` of ``sum(s**2)``, and singular values
below ``tol * s_max`` never count. ``Redundancy.ceilings`` turns the estimate into per-group
ceilings for ``capped_select`` / ``iterative_prune(ceilings="auto")`` ("auto" ratios).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graphprune.graph import DependencyGraph
from graphprune.importance.base import prepare_data
from graphprune.train.masking import channel_rows

__all__ = ["Redundancy", "redundancy", "effective_rank"]


def effective_rank(s: np.ndarray, energy: float = 0.99, tol: float = 1e-3) -> int:
    """Singular values needed for ``energy`` of the spectrum's squared mass, ignoring those below
    ``tol * s.max()``.

    >>> effective_rank(np.array([10.0, 1.0, 1e-6]), energy=0.999)
    2
    """
    s = np.sort(np.abs(np.asarray(s, dtype=np.float64)))[::-1]
    if s.size == 0 or s[0] <= 0:
        return 0
    s = s[s > tol * s[0]]
    cum = np.cumsum(s**2) / np.sum(s**2)
    return int(np.searchsorted(cum, energy - 1e-12) + 1)


@dataclass
class Redundancy:
    """Per group: singular values, effective rank, and the estimated prunable fraction."""

    singular_values: dict[int, np.ndarray]
    ranks: dict[int, int]
    fractions: dict[int, float]

    @property
    def ceilings(self) -> dict[int, float]:
        """The prunable fractions, as per-group ceilings for selection."""
        return dict(self.fractions)


def redundancy(
    model: nn.Module,
    dg: DependencyGraph,
    data: Iterable,
    *,
    loss_fn: Callable = F.cross_entropy,
    batches: int = 8,
    energy: float = 0.99,
    tol: float = 1e-3,
    groups: Iterable[int] | None = None,
    max_fraction: float = 0.9,
) -> Redundancy:
    """Estimate each prunable group's maximum prunable fraction from its gradient matrix.

    One backward pass per batch (at most ``batches``), model in eval mode, weights untouched.
    Fractions are clipped to ``[0, max_fraction]`` and leave every group at least one channel.
    """
    ids = [g.id for g in dg.groups if g.prunable] if groups is None else list(groups)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cols: dict[int, list[torch.Tensor]] = {gid: [] for gid in ids}
    params = dict(model.named_parameters())
    was = model.training
    model.eval()
    try:
        for inputs, targets, _ in prepare_data(data, "redundancy", device, batches):
            model.zero_grad(set_to_none=True)
            loss_fn(model(*inputs), targets).backward()
            grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
            for gid in ids:
                cols[gid].append(channel_rows(dg.groups[gid], grads, ("out",), params_only=False).detach())
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    sv, ranks, fracs = {}, {}, {}
    for gid in ids:
        size = dg.groups[gid].size
        G = torch.cat(cols[gid], dim=1).double() if cols[gid] else torch.zeros(size, 0)
        s = torch.linalg.svdvals(G).numpy() if G.numel() else np.zeros(0)
        k = effective_rank(s, energy, tol)
        sv[gid], ranks[gid] = s, k
        fracs[gid] = float(min(max(0.0, 1 - max(k, 1) / size), max_fraction))
    return Redundancy(sv, ranks, fracs)
