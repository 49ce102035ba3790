"""graphprune.lean.channel_graph: edge weights (BatchNorm folded), fixed residual edges, networkx export."""

from __future__ import annotations

import numpy as np
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
