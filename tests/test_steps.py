"""graphprune.steps: the pruning loop in several steps, rescoring and callbacks."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp


@pytest.fixture(scope="module")
def resnet20():
    model, x = gp.zoo.create("resnet20", width=8)
    return model, x, gp.DependencyGraph.build(model, x)


def test_iterative_pruning_rescores_and_calls_back(resnet20) -> None:
    model, x, _ = resnet20
    seen = []

    def callback(slim, step):
        seen.append((step, gp.count(slim, x).macs))

    r = gp.prune(model, x, "l2", 0.6, target="macs", scope="global", steps=3, callback=callback)
    assert [s for s, _ in seen] == [1, 2, 3]
    macs = [m for _, m in seen]
    assert macs[0] > macs[1] > macs[2] == r.after.macs
    for i, m in enumerate(macs, 1):  # each step removes its share of the original MACs
        assert abs(1 - m / r.before.macs - 0.6 * i / 3) <= 0.01
    assert len(r.history) == 3
    # the composed plan, applied in one go to the original model, gives the same network
    again = gp.apply(model, r.graph, r.plan)
    assert gp.count(again, x) == r.after
    with torch.no_grad():
        assert torch.allclose(again(*x), r.model(*x), atol=1e-5)


def test_iterative_channel_ratio_and_replacing_callback(resnet20) -> None:
    model, x, dg = resnet20
    marker = []

    def finetune(slim, step):
        with torch.no_grad():
            slim.fc.bias.add_(1.0)  # stands in for training
        marker.append(step)
        return slim

    r = gp.prune(model, x, "l1", 0.5, steps=2, callback=finetune, ignore=["conv1"])
    assert marker == [1, 2]
    assert torch.allclose(r.model.fc.bias, model.fc.bias + 2.0)
    one = gp.prune(model, x, "l1", 0.5, ignore=["conv1"])
    assert abs(one.after.params - r.after.params) <= 0.05 * one.after.params
    group0 = next(g.id for g in dg.groups if any(m.param == "conv1.weight" for m in g.members))
    assert group0 not in r.plan
