"""graphprune.lean.kernels: from kept kernels to a plan (channel survival) and kernel masks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import mlp, small_cnn

import graphprune as gp
from graphprune import lean


@pytest.mark.parametrize("criterion", ["lean", "opnorm", "l1"])
@pytest.mark.parametrize("keep", [0.6, 0.2, 0.02])
def test_plan_from_kernels_is_valid_and_exact(criterion, keep):
    model, x = small_cnn()
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
    model = mlp([2, 4, 4, 2], 0)
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
