"""graphprune.lean.prune: gp.prune(method="lean"), one-shot and with a geometric schedule."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune import lean


@pytest.mark.parametrize("name,kwargs", [("msd", {"depth": 8, "num_classes": 3}),
                                         ("resnet20", {"width": 4}), ("mini_unet", {"base": 4})])
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
