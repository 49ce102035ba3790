"""LEAN: operator norms, the channel graph, longest-chain extraction, plans and gp.prune(method="lean")."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune import lean
from graphprune.lean.paths import _LongestPaths


# --- operator norms ------------------------------------------------------------------------------
def dense_periodic_norm(k: torch.Tensor, n: int, s: int) -> float:
    """Spectral norm of y[m] = sum_u k[u] x[(s m + u) mod n] on n x n, from its explicit matrix."""
    kh, kw = k.shape
    eye = torch.eye(n * n, dtype=torch.float64).reshape(n * n, 1, n, n)
    xp = F.pad(eye, (0, kw - 1, 0, kh - 1), mode="circular")
    a = F.conv2d(xp, k.reshape(1, 1, kh, kw), stride=s).reshape(n * n, -1).T
    return float(torch.linalg.matrix_norm(a, ord=2))


@pytest.mark.parametrize("method", ["autocorr", "fft"])
@pytest.mark.parametrize("stride,ksize", [(1, 3), (1, 5), (1, 1), (2, 3), (2, 4), (2, 1), (1, 2)])
def test_kernel_norms_match_dense_operator(method, stride, ksize):
    torch.manual_seed(ksize + 10 * stride)
    w = torch.randn(2, 3, ksize, ksize, dtype=torch.float64)
    got = lean.kernel_operator_norms(w, stride, 8, method=method)
    ref = torch.tensor([[dense_periodic_norm(w[i, j], 8, stride) for j in range(3)] for i in range(2)],
                       dtype=torch.float64)
    assert got.shape == (2, 3)
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-12)


def test_kernel_norms_1x1_linear_and_1d():
    w = torch.randn(4, 5, 1, 1)
    assert torch.equal(lean.kernel_operator_norms(w, 2), w.abs()[:, :, 0, 0])
    lin = torch.randn(3, 7)
    assert torch.equal(lean.kernel_operator_norms(lin), lin.abs())
    w1 = torch.randn(2, 2, 3, dtype=torch.float64)  # a 1-d conv is a 2-d one with a 1 x k kernel
    a = lean.kernel_operator_norms(w1, 2, 16)
    assert torch.allclose(a, lean.kernel_operator_norms(w1, 2, 16, method="fft"), rtol=1e-9)
    assert torch.allclose(a, lean.kernel_operator_norms(w1[:, :, None, :], (1, 2), 16), rtol=1e-9)


def test_layer_operator_norm_power_iteration():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2).double()
    x = torch.eye(2 * 36, dtype=torch.float64).reshape(-1, 2, 6, 6)
    a = (conv(x) - conv(torch.zeros_like(x[:1]))).reshape(72, -1).T.detach()
    ref = float(torch.linalg.matrix_norm(a, ord=2))
    assert lean.layer_operator_norm(conv, (1, 2, 6, 6)) == pytest.approx(ref, rel=1e-6)


# --- the channel graph ---------------------------------------------------------------------------
def test_bn_folded_into_edges():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([2.0, -0.5, 1.0]))
        model[1].running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    model.eval()
    dg = gp.DependencyGraph.build(model, torch.randn(1, 2, 8, 8))
    cg = lean.ChannelGraph.build(model, dg, n=16, exclude=())
    first = cg.blocks[0]
    scale = np.abs([2.0, -0.5, 1.0]) / np.sqrt(np.array([4.0, 1.0, 0.25]) + 1e-5)
    expect = lean.kernel_operator_norms(model[0].weight, 1, 16).double().numpy() * scale[:, None]
    assert np.allclose(np.exp(first.logw), expect, rtol=1e-5)
    l1 = lean.ChannelGraph.build(model, dg, criterion="l1", exclude=())
    assert np.allclose(np.exp(l1.blocks[0].logw), model[0].weight.detach().abs().sum((2, 3)).numpy(), rtol=1e-5)
    assert cg.n_kernels == 2 * 3 + 3 * 2 and len(cg.blocks) == 2


def _mlp(widths, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b, bias=False), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


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
    model = _mlp([2, 3, 3, 2], seed)
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
    model = _mlp([3, 5, 5, 5, 3], 4)
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


def _resnet():
    model, x = gp.zoo.create("resnet20", width=4)
    return model, x


def test_extraction_budget_and_fixed_edges():
    model, x = _resnet()
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
    model, x = _resnet()
    dg = gp.DependencyGraph.build(model, x)
    cg = lean.ChannelGraph.build(model, dg, criterion="l1")
    ext = lean.extract(cg, 0.25, method="individual")
    kept = np.concatenate([cg.blocks[b].logw[ext.kept[b]] for b in cg.kernel_blocks])
    dropped = np.concatenate([cg.blocks[b].logw[~ext.kept[b]] for b in cg.kernel_blocks])
    assert kept.min() >= dropped.max()


# --- plans -------------------------------------------------------------------------------------------
def _small_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    return model, torch.randn(2, 2, 8, 8)


@pytest.mark.parametrize("criterion", ["lean", "opnorm", "l1"])
@pytest.mark.parametrize("keep", [0.6, 0.2, 0.02])
def test_plan_from_kernels_is_valid_and_exact(criterion, keep):
    model, x = _small_cnn()
    dg = gp.DependencyGraph.build(model, x)
    lp, cg, ext = lean.lean_plan(model, dg, keep, criterion=criterion, exclude=())
    assert cg.n_kernels == 2 * 8 + 8 + 8 * 6 + 96 * 5 + 5 * 3
    lp.plan.validate(dg)
    assert lp.kept_kernels <= ext.n_kept + len(lp.restored) * 2 * 4
    assert lp.kept_kernels <= lp.kernels_between_kept_channels <= lp.total_kernels
    assert gp.verify(model, x, lp.plan) <= 1e-4
    # masks re-indexed for the slim model give what masking the original gives
    masked = copy.deepcopy(model)
    lean.apply_kernel_masks(masked, lp.kernel_masks)
    slim = gp.apply(model, dg, lp.plan)
    lean.apply_kernel_masks(slim, lean.slim_kernel_masks(dg, lp.plan, lp.kernel_masks))
    ref = gp.apply(masked, dg, lp.plan)
    assert torch.allclose(slim(x), ref(x), atol=1e-5)


def test_channel_survival_rule():
    model = _mlp([2, 4, 4, 2], 0)
    dg = gp.DependencyGraph.build(model, torch.randn(2, 2))
    cg = lean.ChannelGraph.build(model, dg, exclude=())
    # keep exactly the chain in0 -> h1[1] -> h2[2] -> out[0], plus an edge into h1[3] that leads nowhere
    kept = {b: np.zeros(cg.blocks[b].logw.shape, bool) for b in cg.kernel_blocks}
    b0, b1, b2 = cg.kernel_blocks
    kept[b0][1, 0] = kept[b1][2, 1] = kept[b2][0, 2] = True
    kept[b0][3, 1] = True
    lp = lean.plan_from_kernels(dg, cg, kept)
    assert sorted(lp.plan.items()) == [(0, (0, 2, 3)), (1, (0, 1, 3))]
    assert lp.kept_kernels == 3 and lp.kept_channels == 2
    assert lp.kernels_between_kept_channels == 5 and lp.extra_sparsity == pytest.approx(0.4)


def test_networkx_export():
    model, x = _small_cnn()
    dg = gp.DependencyGraph.build(model, x)
    cg = lean.ChannelGraph.build(model, dg)
    g = cg.to_networkx(dg)
    assert g.number_of_nodes() == cg.n_nodes
    assert g.number_of_edges() == cg.n_edges
    assert sum(1 for *_, d in g.edges(data=True) if d["kernel"]) == cg.n_kernels


def test_residual_classes_share_nodes_via_fixed_edges():
    model, x = _resnet()
    dg = gp.DependencyGraph.build(model, x)
    cg = lean.ChannelGraph.build(model, dg)
    for blk in cg.blocks:
        if not blk.kernel:  # merges join nodes of one channel class
            src = blk.src_matrix()[np.isfinite(blk.logw)].reshape(-1)
            assert set(cg.node_class[src]) <= set(cg.node_class[blk.dst])


# --- gp.prune ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kwargs", [("msd", {"depth": 8, "num_classes": 3}),
                                         ("resnet20", {"width": 4}), ("unet", {"base": 4})])
def test_prune_lean_zoo(name, kwargs):
    model, x = gp.zoo.create(name, **kwargs)
    res = gp.prune(model, x, method="lean", ratio=0.7)
    assert res.after.params < res.before.params
    assert gp.verify(model, x, res.plan) <= 1e-4
    assert res.model(*x).shape == model(*x).shape
    info = res.lean[0]
    assert info["budget"] == round(0.3 * info["original_kernels"])
    assert info["kept_kernels"] <= info["budget"] or info["restored"]


def test_prune_lean_schedule_masks_and_callback():
    model, x = gp.zoo.create("msd", depth=6, num_classes=2)
    seen = []

    def cb(slim, step):  # one training step: masked kernels must not regrow
        seen.append(step)
        opt = torch.optim.SGD(slim.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        slim(*x).square().mean().backward()
        opt.step()
        return slim

    res = gp.prune(model, x, method="lean", ratio=0.8, steps=3, callback=cb)
    assert seen == [1, 2, 3]
    keeps = [r["keep"] for r in res.lean]
    assert keeps == pytest.approx(lean.geometric_keep(0.2, 3))
    assert all(r["kept_kernels"] <= r["budget"] or r["restored"] for r in res.lean)
    # masked kernels stay zero: the next step's graph only sees what was kept
    dg = gp.DependencyGraph.build(res.model, x)
    assert lean.ChannelGraph.build(res.model, dg).n_kernels <= res.lean[-1]["kept_kernels"]
    slim = gp.apply(model, res.graph, res.plan)
    assert gp.count(slim, x).params == res.after.params
    with pytest.raises(gp.InputError):
        gp.prune(model, x, method="lean", schedule=[0.5, 1.5])
