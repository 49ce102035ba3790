"""C-SGD, centripetal SGD (Ding et al. 2019): make channels identical while training, then merge.

1. ``cluster_channels``: k-means over each group's channel features (all ``out`` and ``pass``
   parameter slices: filters, biases, norm scales/shifts), ``k = size - floor(ratio * size)``.
2. ``CSGD`` plugin: after each backward the gradients of a cluster's slices are replaced by their
   cluster mean; after each step every slice moves towards its cluster mean,
   ``w <- w + eps * (mean_cluster(w) - w)``, so differences decay geometrically while the cluster
   mean follows the ordinary SGD update of the averaged gradient.
3. ``merge``: set every slice (running statistics included) to its cluster mean, keep one channel
   per cluster, add the other channels' consumer input columns (``in`` members) into the kept one,
   and remove the others with ``gp.apply``. For channel-separable (exact) groups whose channels are
   identical this is lossless: the consumers see ``sum_j W[:, j] x_j = (sum_j W[:, j]) x_keep``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from graphprune.plan import Plan
from graphprune.rewrite import apply
from graphprune.train.finetune import finetune
from graphprune.train.masking import channel_rows, member_params, position_keys

__all__ = ["kmeans", "cluster_channels", "CSGD", "unify", "merge", "csgd", "CSGDResult", "mergeable"]

Clusters = dict[int, list[np.ndarray]]


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Labels of k-means++ / Lloyd clustering of the rows of ``x`` (empty clusters re-seeded).

    >>> kmeans(np.array([[0.0], [0.1], [5.0], [5.1]]), 2).tolist() in ([0, 0, 1, 1], [1, 1, 0, 0])
    True
    """
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centers = [x[rng.integers(n)]]
    for _ in range(1, k):
        d = np.min(((x[:, None, :] - np.asarray(centers)[None]) ** 2).sum(-1), axis=1)
        centers.append(x[rng.choice(n, p=d / d.sum())] if d.sum() > 0 else x[rng.integers(n)])
    c = np.asarray(centers, dtype=np.float64)
    labels = np.zeros(n, dtype=np.int64)
    for it in range(iters):
        d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        new = d.argmin(1)
        for j in range(k):
            if not (new == j).any():  # re-seed an empty cluster with the farthest point
                far = int(d[np.arange(n), new].argmax())
                new[far] = j
                d[far] = np.inf
        if it and (new == labels).all():
            break
        labels = new
        c = np.stack([x[labels == j].mean(0) for j in range(k)])
    return labels


def mergeable(dg, gid: int, model: nn.Module) -> bool:
    """Whether C-SGD can merge group ``gid``: prunable, exact, every member a parameter or buffer."""
    g = dg.groups[gid]
    state = member_params(model)
    return g.prunable and g.exact and all(m.param in state for m in g.members)


def cluster_channels(model: nn.Module, dg, ratio: float, *, groups: Iterable[int] | None = None,
                     seed: int = 0) -> Clusters:
    """``{gid: [channels of each cluster]}``; each group gets ``size - floor(ratio * size)`` clusters."""
    ids = [g.id for g in dg.groups if mergeable(dg, g.id, model)] if groups is None else list(groups)
    state = member_params(model)
    out: Clusters = {}
    for gid in ids:
        g = dg.groups[gid]
        k = g.size - min(int(math.floor(ratio * g.size + 1e-9)), g.size - 1)
        rows = channel_rows(g, state, ("out", "pass")).detach().double().numpy()
        labels = kmeans(rows, k, seed + gid) if k < g.size else np.arange(g.size)
        out[gid] = [np.flatnonzero(labels == j) for j in np.unique(labels)]
    return out


def _labels(dg, clusters: Clusters, gid: int) -> np.ndarray:
    lab = np.empty(dg.groups[gid].size, dtype=np.int64)
    for j, chans in enumerate(clusters[gid]):
        lab[chans] = j
    return lab


def _slices(dg, clusters: Clusters, roles: tuple[str, ...]) -> list[tuple[str, int, torch.Tensor, torch.Tensor]]:
    """(param, dim, positions, compact cluster key per position) for the clustered groups' members."""
    out = []
    for gid in clusters:
        lab = _labels(dg, clusters, gid)
        for m in dg.groups[gid].members:
            if m.role in roles:
                pos, key = position_keys(m, lab)
                out.append((m.param, m.dim, pos, torch.unique(key, return_inverse=True)[1]))
    return out


def _cluster_mean(t: torch.Tensor, dim: int, pos: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Each position's slice replaced by the mean over its cluster key (``[len(pos), ...]``)."""
    sl = t.movedim(dim, 0).index_select(0, pos)
    flat = sl.reshape(len(pos), -1)
    n = int(key.max()) + 1
    sums = flat.new_zeros(n, flat.shape[1]).index_add_(0, key, flat)
    cnt = torch.bincount(key, minlength=n).to(flat).unsqueeze(1)
    return (sums / cnt)[key].reshape(sl.shape)


def _write(t: torch.Tensor, dim: int, pos: torch.Tensor, values: torch.Tensor) -> None:
    t.movedim(dim, 0).index_copy_(0, pos, values)


class CSGD:
    """Centripetal SGD plugin for ``finetune``: ``clusters`` from ``cluster_channels``."""

    def __init__(self, dg, clusters: Clusters, centripetal: float = 0.05) -> None:
        self.dg, self.clusters, self.eps = dg, clusters, float(centripetal)
        self.items = _slices(dg, clusters, ("out", "pass"))

    def after_backward(self, model: nn.Module) -> None:
        params = member_params(model, buffers=False)
        with torch.no_grad():
            for name, dim, pos, key in self.items:
                p = params.get(name)
                if p is not None and p.grad is not None:
                    _write(p.grad, dim, pos, _cluster_mean(p.grad, dim, pos, key))

    def after_step(self, model: nn.Module) -> None:
        params = member_params(model, buffers=False)
        with torch.no_grad():
            for name, dim, pos, key in self.items:
                p = params.get(name)
                if p is not None:
                    cur = p.movedim(dim, 0).index_select(0, pos)
                    _write(p, dim, pos, cur + self.eps * (_cluster_mean(p, dim, pos, key) - cur))

    def spread(self, model: nn.Module) -> float:
        """Largest distance of a parameter slice from its cluster mean (0 once the clusters are identical;
        running statistics follow by themselves and are averaged by ``merge``)."""
        state = member_params(model, buffers=False)
        worst = 0.0
        with torch.no_grad():
            for name, dim, pos, key in self.items:
                if name not in state:
                    continue
                t = state[name]
                cur = t.movedim(dim, 0).index_select(0, pos)
                worst = max(worst, float((cur - _cluster_mean(t, dim, pos, key)).abs().max()))
        return worst


def unify(model: nn.Module, dg, clusters: Clusters) -> nn.Module:
    """Set every ``out``/``pass`` slice (buffers too) of the clustered groups to its cluster mean."""
    state = member_params(model)
    with torch.no_grad():
        for name, dim, pos, key in _slices(dg, clusters, ("out", "pass")):
            t = state[name]
            _write(t, dim, pos, _cluster_mean(t, dim, pos, key).to(t.dtype))
    return model


def merge(model: nn.Module, dg, clusters: Clusters) -> torch.fx.GraphModule:
    """The slim model with one channel per cluster (``model`` untouched); lossless when the clusters'
    channels are identical (after C-SGD, up to the residual spread, which ``unify`` removes)."""
    work = unify(copy.deepcopy(model), dg, clusters)
    state = member_params(work)
    removed: dict[int, list[int]] = {}
    with torch.no_grad():
        for gid, cl in clusters.items():
            g = dg.groups[gid]
            for chans in cl:
                keep, rest = int(chans[0]), [int(c) for c in chans[1:]]
                if not rest:
                    continue
                removed.setdefault(gid, []).extend(rest)
                for m in g.members:
                    if m.role != "in":
                        continue
                    t = state[m.param].movedim(m.dim, 0)
                    dst = torch.as_tensor(m.indices([keep]))
                    for c in rest:
                        t[dst] += t[torch.as_tensor(m.indices([c]))]
    return apply(work, dg, Plan(removed))


@dataclass
class CSGDResult:
    """Merged slim model, its plan, the clusters, the final spread before merging, training history."""

    model: torch.fx.GraphModule
    plan: Plan
    clusters: Clusters
    spread: float
    history: list[dict[str, float]] = field(default_factory=list)


def csgd(model: nn.Module, dg, data: Iterable, ratio: float, *, epochs: int = 5, centripetal: float = 0.05,
         groups: Iterable[int] | None = None, seed: int = 0, finetune_epochs: int = 0,
         **train: Any) -> CSGDResult:
    """Cluster, train ``model`` (in place) with centripetal SGD, merge, optionally fine-tune the slim
    model. ``train`` goes to ``finetune``. Any optimizer works: a cluster's slices get identical
    gradients, hence identical optimizer states and updates (weight decay, applied per slice,
    differs, and the centripetal term absorbs it)."""
    clusters = cluster_channels(model, dg, ratio, groups=groups, seed=seed)
    plugin = CSGD(dg, clusters, centripetal)
    res = finetune(model, data, epochs=epochs, plugins=[plugin], **train)
    spread = plugin.spread(model)
    slim = merge(model, dg, clusters)
    removed = {gid: sorted(int(c) for ch in cl for c in ch[1:]) for gid, cl in clusters.items()}
    history = res.history
    if finetune_epochs:
        history = history + finetune(slim, data, epochs=finetune_epochs, **train).history
    return CSGDResult(slim, Plan(removed), clusters, spread, history)
