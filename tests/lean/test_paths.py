"""graphprune.lean.paths: the longest-chain DP against brute force, incremental updates, budgets."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import mlp, small_resnet

import graphprune as gp
from graphprune import lean
from graphprune.lean.paths import _LongestPaths


def brute_force_best(weights: list[np.ndarray]) -> float:
    """Best sum of log |w| over every path of >= 1 edge in a layered graph (any start, any end)."""
    best = -math.inf
    for start in range(len(weights)):
        for stop in range(start + 1, len(weights) + 1):
            sizes = [weights[start].shape[1]] + [w.shape[0] for w in weights[start:stop]]
            for nodes in itertools.product(*[range(s) for s in sizes]):
                val = sum(math.log(abs(weights[start + t][nodes[t + 1], nodes[t]])) for t in range(stop - start))
                best = max(best, val)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dp_finds_longest_chain(seed):
    model = mlp([2, 3, 3, 2], seed)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(3.0)
    dg = gp.DependencyGraph.build(model, torch.randn(2, 2))
    cg = lean.ChannelGraph.build(model, dg, exclude=())
    weights = [m.weight.detach().double().numpy() for m in model if isinstance(m, nn.Linear)]
    dp = _LongestPaths(cg)
    value, path = dp.best_path()
    ref = brute_force_best(weights)
    if ref < 0:
        assert path == []
        return
    assert value == pytest.approx(ref, abs=1e-5)
    # the returned chain is contiguous (it is listed from its end) and its weights multiply to the value
    total = sum(float(cg.blocks[b].logw[j, k]) for b, j, k in path)
    assert total == pytest.approx(value, abs=1e-5)
    for (b1, j1, k1), (b2, j2, _) in zip(path, path[1:]):
        assert cg.blocks[b1].src_at(np.array([j1]), np.array([k1]))[0] == cg.blocks[b2].dst[j2]


def test_dp_incremental_matches_full_recompute():
    model = mlp([3, 5, 5, 5, 3], 4)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(4.0)
    dg = gp.DependencyGraph.build(model, torch.randn(2, 3))
    cg = lean.ChannelGraph.build(model, dg, exclude=())
    dp = _LongestPaths(cg)
    for _ in range(8):
        value, path = dp.best_path()
        if not path:
            break
        by = {}
        for b, j, k in path:
            by.setdefault(b, ([], []))
            by[b][0].append(j)
            by[b][1].append(k)
        dp.delete({b: (np.array(r), np.array(c)) for b, (r, c) in by.items()})
        fresh = copy.deepcopy(cg)
        for b, blk in enumerate(fresh.blocks):
            blk.logw = dp.w[b].copy()
        assert np.array_equal(_LongestPaths(fresh).B, dp.B)


def test_extraction_budget_and_fixed_edges():
    model, x = small_resnet()
    dg = gp.DependencyGraph.build(model, x)
    cg = lean.ChannelGraph.build(model, dg)
    assert any(not b.kernel for b in cg.blocks)  # residual merges are fixed edges
    total = cg.n_kernels
    for keep in (0, 7, 0.3, 0.9, 1.0):
        ext = lean.extract(cg, keep)
        want = keep if isinstance(keep, int) else round(keep * total)
        assert ext.n_kept == want == ext.budget
        assert set(ext.kept) == set(cg.kernel_blocks)
    # strong chains everywhere: chains cross the fixed skip edges, the count still is exact
    strong = copy.deepcopy(cg)
    for b in strong.kernel_blocks:
        strong.blocks[b].logw += 3.0
    ext = lean.extract(strong, 500)
    assert ext.n_kept == 500 and ext.n_paths > 0 and ext.path_kernels == 500
    # only weak kernels: fixed edges (weight 1) alone never make a chain, the budget is filled
    weak = copy.deepcopy(cg)
    for b in weak.kernel_blocks:
        weak.blocks[b].logw -= 20.0
    ext = lean.extract(weak, 100)
    assert ext.n_paths == 0 and ext.filled == 100 == ext.n_kept


def test_individual_is_global_threshold():
    model, x = small_resnet()
    dg = gp.DependencyGraph.build(model, x)
    cg = lean.ChannelGraph.build(model, dg, criterion="l1")
    ext = lean.extract(cg, 0.25, method="individual")
    kept = np.concatenate([cg.blocks[b].logw[ext.kept[b]] for b in cg.kernel_blocks])
    dropped = np.concatenate([cg.blocks[b].logw[~ext.kept[b]] for b in cg.kernel_blocks])
    assert kept.min() >= dropped.max()
