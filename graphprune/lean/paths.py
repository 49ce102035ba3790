"""Longest-chain extraction over LEAN's channel graph.

``extract(cg, keep)`` keeps a budget of kernel edges: ``method="lean"`` repeatedly takes
the chain with the highest product of edge weights (running product ``>= 1``), keeps
its kernels and deletes them from the graph (a max-plus sweep updated incrementally
downstream of each deletion), then fills the budget with the largest single edges;
``method="individual"`` only does the latter (a global threshold on single kernels).

>>> import torch, graphprune as gp
>>> from graphprune.lean import ChannelGraph
>>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
...                             torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(),
...                             torch.nn.Conv2d(4, 2, 1))
>>> cg = ChannelGraph.build(model, gp.DependencyGraph.build(model, torch.randn(1, 1, 8, 8)))
>>> ext = extract(cg, keep=10)
>>> ext.n_kept, ext.n_paths >= 1
(10, True)
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from graphprune.errors import InputError
from graphprune.lean.channel_graph import ChannelGraph

__all__ = ["Extraction", "extract"]


@dataclass
class Extraction:
    """Which kernel edges were kept: ``kept[b]`` is a bool ``[rows, K]`` per kernel block ``b``."""

    kept: dict[int, np.ndarray]
    budget: int
    n_kernels: int
    n_paths: int = 0
    path_kernels: int = 0
    filled: int = 0
    path_values: list[float] = field(default_factory=list)
    seconds: float = 0.0
    method: str = "lean"

    @property
    def n_kept(self) -> int:
        return int(sum(int(k.sum()) for k in self.kept.values()))


class _LongestPaths:
    """Max-plus DP over the layered graph, kept up to date as edges are deleted.

    ``B[v]``: the best log-value of a path ending at ``v`` that contains a kernel edge,
    where a chain may restart at any node: a kernel edge ``u -> v`` extends
    ``max(B[u], 0)``, a fixed edge extends ``B[u]`` (so no path of only fixed edges
    counts).
    """

    def __init__(self, cg: ChannelGraph) -> None:
        self.cg = cg
        self.w = [blk.logw.copy() for blk in cg.blocks]
        self.arg = [np.zeros(len(blk.dst), np.int64) for blk in cg.blocks]
        self.second = [np.full(len(blk.dst), -np.inf) for blk in cg.blocks]
        self.B = np.full(cg.n_nodes, -np.inf)
        # node -> consumer blocks (CSR)
        pairs_n, pairs_b = [], []
        for b, blk in enumerate(cg.blocks):
            u = np.unique(blk.src)
            pairs_n.append(u)
            pairs_b.append(np.full(len(u), b, np.int64))
        if pairs_n:
            nn_ = np.concatenate(pairs_n)
            bb = np.concatenate(pairs_b)
            order = np.argsort(nn_, kind="stable")
            self.cons = bb[order]
            self.cons_ptr = np.searchsorted(nn_[order], np.arange(cg.n_nodes + 1))
        else:
            self.cons = np.zeros(0, np.int64)
            self.cons_ptr = np.zeros(cg.n_nodes + 1, np.int64)
        self.dirty = np.zeros(cg.n_nodes, bool)
        for b in range(len(cg.blocks)):
            self._recompute(b, np.arange(len(cg.blocks[b].dst)))

    def _recompute(self, b: int, rows: np.ndarray) -> np.ndarray:
        """Full max over the rows' in-edges; also refreshes each row's second-best bound."""
        blk = self.cg.blocks[b]
        vals = self.B[blk.src if blk.src.ndim == 1 else blk.src[rows]]
        if blk.kernel:
            vals = np.maximum(vals, 0.0)
        cand = self.w[b][rows] + vals
        r = np.arange(len(rows))
        am = cand.argmax(1)
        best = cand[r, am]
        if cand.shape[1] > 1:
            cand[r, am] = -np.inf
            self.second[b][rows] = cand.max(1)
        self.arg[b][rows] = am
        return self._store(blk.dst[rows], best)

    def _store(self, nodes: np.ndarray, best: np.ndarray) -> np.ndarray:
        changed = nodes[best != self.B[nodes]]
        self.B[nodes] = best
        return changed

    def _refresh(self, b: int, rows: np.ndarray) -> np.ndarray:
        """Rows whose best in-edge's source changed: O(1) each while that edge stays best.

        Values only decrease, so ``second`` (the runner-up at the last full recompute)
        bounds every other in-edge from above; a row whose argmax edge still reaches it
        keeps that argmax, the others get a full recompute.
        """
        blk = self.cg.blocks[b]
        k = self.arg[b][rows]
        src = blk.src[k] if blk.src.ndim == 1 else blk.src[rows, k]
        vals = self.B[src]
        if blk.kernel:
            vals = np.maximum(vals, 0.0)
        cand = self.w[b][rows, k] + vals
        ok = cand >= self.second[b][rows]
        changed = [self._store(blk.dst[rows[ok]], cand[ok])]
        if not ok.all():
            changed.append(self._recompute(b, rows[~ok]))
        return np.concatenate(changed)

    def _consumers(self, nodes: np.ndarray) -> np.ndarray:
        lo, hi = self.cons_ptr[nodes], self.cons_ptr[nodes + 1]
        lens = hi - lo
        if not lens.sum():
            return np.zeros(0, np.int64)
        idx = np.repeat(lo - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())
        return np.unique(self.cons[idx])

    def delete(self, edges: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> None:
        """Delete kernel edges ``{block: (rows, cols)}`` and update the DP downstream."""
        explicit: dict[int, np.ndarray] = {}
        for b, (rows, cols) in edges.items():
            self.w[b][rows, cols] = -np.inf
            explicit[b] = np.unique(rows)
        heap = list(explicit)
        heapq.heapify(heap)
        queued = set(heap)
        touched: list[np.ndarray] = []
        while heap:
            b = heapq.heappop(heap)
            queued.discard(b)
            blk = self.cg.blocks[b]
            arg = self.arg[b]
            srcs = blk.src[arg] if blk.src.ndim == 1 else blk.src[np.arange(len(arg)), arg]
            rows = np.flatnonzero(self.dirty[srcs])
            full = explicit.pop(b, None)
            if full is not None:
                rows = np.setdiff1d(rows, full)
            parts = []
            if len(rows):
                parts.append(self._refresh(b, rows))
            if full is not None:
                parts.append(self._recompute(b, full))
            if not parts:
                continue
            changed = np.concatenate(parts)
            if len(changed):
                self.dirty[changed] = True
                touched.append(changed)
                for c in self._consumers(changed).tolist():
                    if c not in queued:
                        queued.add(c)
                        heapq.heappush(heap, c)
        for t in touched:
            self.dirty[t] = False

    def chain(self, v: int) -> list[tuple[int, int, int]]:
        """The kernel edges ``(block, row, col)`` of the best chain ending at node ``v``."""
        path: list[tuple[int, int, int]] = []
        for _ in range(self.cg.n_nodes + 1):
            b = int(self.cg.writer_block[v])
            if b < 0:
                break
            j = int(self.cg.writer_row[v])
            k = int(self.arg[b][j])
            blk = self.cg.blocks[b]
            u = int(blk.src[k] if blk.src.ndim == 1 else blk.src[j, k])
            if blk.kernel:
                path.append((b, j, k))
                if not self.B[u] > 0:
                    break
            v = u
        return path

    def best_path(self) -> tuple[float, list[tuple[int, int, int]]]:
        """The highest-valued chain (log value >= 0) and its kernel edges; ``[]`` if none."""
        if not len(self.B):
            return -math.inf, []
        v = int(np.argmax(self.B))
        return (float(self.B[v]), self.chain(v)) if self.B[v] >= 0 else (-math.inf, [])


def extract(
    cg: ChannelGraph,
    keep: float | int,
    *,
    method: str = "lean",
    max_paths: int | None = None,
    progress: bool = False,
) -> Extraction:
    """Choose the kernels to keep: ``keep`` is a fraction of the graph's kernels or a count.

    ``method="lean"`` extracts longest chains (highest product of edge weights, running
    product ``>= 1``) one at a time, keeping their kernels and deleting them from the
    graph, until the budget is met or no chain ``>= 1`` is left, then fills the budget
    with the largest remaining single edges. ``method="individual"`` only does the
    latter (a global threshold on single-kernel scores). Fixed edges are never counted
    in the budget nor deleted; a chain always contains a kernel. ``max_paths`` caps the
    number of chains (the rest is filled by single edges).
    """
    t0 = time.perf_counter()
    if method not in ("lean", "individual"):
        raise InputError(f"method must be 'lean' or 'individual', got {method!r}")
    total = cg.n_kernels
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.integer, np.floating)):
        raise InputError(f"keep must be a fraction in [0, 1] or a kernel count, got {keep!r}")
    if isinstance(keep, (float, np.floating)):
        if not 0 <= keep <= 1:
            raise InputError(f"keep as a fraction must lie in [0, 1], got {keep!r}")
        budget = int(round(float(keep) * total))
    else:
        if keep < 0:
            raise InputError(f"keep as a count must be >= 0, got {keep!r}")
        budget = int(keep)
    budget = min(budget, total)
    kept = {b: np.zeros(cg.blocks[b].logw.shape, bool) for b in cg.kernel_blocks}
    ext = Extraction(kept, budget, total, method=method)
    n_kept = 0
    if method == "lean" and budget > 0:
        from tqdm.auto import tqdm

        dp = _LongestPaths(cg)
        bar = tqdm(total=budget, desc="LEAN chains", disable=not progress, leave=False)
        while n_kept < budget and (max_paths is None or ext.n_paths < max_paths):
            value, path = dp.best_path()
            if not path:
                break
            if len(path) > budget - n_kept:  # the last chain: its strongest kernels
                path = sorted(path, key=lambda e: -dp.w[e[0]][e[1], e[2]])[:budget - n_kept]
            by_block: dict[int, tuple[list[int], list[int]]] = {}
            for b, j, k in path:
                kept[b][j, k] = True
                by_block.setdefault(b, ([], []))
                by_block[b][0].append(j)
                by_block[b][1].append(k)
            n_kept += len(path)
            ext.n_paths += 1
            ext.path_values.append(value)
            bar.update(len(path))
            dp.delete({b: (np.array(r), np.array(c)) for b, (r, c) in by_block.items()})
        bar.close()
        ext.path_kernels = n_kept
    if n_kept < budget:  # the largest remaining single edges
        flat = [np.where(kept[b], -np.inf, cg.blocks[b].logw).ravel() for b in cg.kernel_blocks]
        allw = np.concatenate(flat) if flat else np.zeros(0, np.float32)
        take = budget - n_kept
        idx = np.argpartition(-allw, take - 1)[:take] if take < len(allw) else np.arange(len(allw))
        idx = idx[np.isfinite(allw[idx])]
        offsets = np.cumsum([0] + [f.size for f in flat])
        for i, b in enumerate(cg.kernel_blocks):
            sel = idx[(idx >= offsets[i]) & (idx < offsets[i + 1])] - offsets[i]
            kept[b].ravel()[sel] = True
        ext.filled = len(idx)
    ext.seconds = time.perf_counter() - t0
    return ext
