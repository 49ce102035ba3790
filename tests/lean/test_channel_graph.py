"""graphprune.lean.channel_graph: edge weights (BatchNorm folded), fixed residual edges, networkx export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import small_cnn, small_resnet

import graphprune as gp
from graphprune import lean


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


def test_networkx_export():
    model, x = small_cnn()
    dg = gp.DependencyGraph.build(model, x)
    cg = lean.ChannelGraph.build(model, dg)
    g = cg.to_networkx(dg)
    assert g.number_of_nodes() == cg.n_nodes
    assert g.number_of_edges() == cg.n_edges
    assert sum(1 for *_, d in g.edges(data=True) if d["kernel"]) == cg.n_kernels


def test_residual_classes_share_nodes_via_fixed_edges():
    model, x = small_resnet()
    dg = gp.DependencyGraph.build(model, x)
    cg = lean.ChannelGraph.build(model, dg)
    for blk in cg.blocks:
        if not blk.kernel:  # merges join nodes of one channel class
            src = blk.src_matrix()[np.isfinite(blk.logw)].reshape(-1)
            assert set(cg.node_class[src]) <= set(cg.node_class[blk.dst])


@pytest.mark.parametrize("name", ["resnet20", "mini_unet", "msd", "mini_densenet"])
def test_export_fallback_gives_the_same_channel_graph_and_kernels(name):
    # the channel graph is built from the rule table, so an ATen graph (torch.export) gives the
    # same one as fx; it used to find 0 kernels there
    class ForceExport(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if x.shape[0] > 0:  # shape-dependent Python: symbolic tracing fails
                return self.inner(x)
            return self.inner(x) * 0

    model, x = gp.zoo.create(name)
    wrapped = ForceExport(model).eval()
    fx, exported = gp.DependencyGraph.build(model, x), gp.DependencyGraph.build(wrapped, x)
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in exported.gm.graph.nodes)
    lp1, cg1, _ = lean.lean_plan(model, fx, 0.3)
    lp2, cg2, _ = lean.lean_plan(wrapped, exported, 0.3)
    assert cg1.n_kernels == cg2.n_kernels > 0
    masks = {k.removeprefix("inner."): v for k, v in lp2.kernel_masks.items()}
    assert masks.keys() == lp1.kernel_masks.keys()
    assert all(torch.equal(masks[k], v) for k, v in lp1.kernel_masks.items())
    assert (lp1.kept_kernels, lp1.kept_channels) == (lp2.kept_kernels, lp2.kept_channels)
