"""graphprune.api: gp.prune with MACs targets, global scope and rounding."""

from __future__ import annotations

import pytest

import graphprune as gp


@pytest.fixture(scope="module")
def resnet20():
    model, x = gp.zoo.create("resnet20", width=8)
    return model, x, gp.DependencyGraph.build(model, x)


def test_prune_with_targets_rounding_and_scope(resnet20) -> None:
    model, x, _ = resnet20
    r = gp.prune(model, x, "l1", 0.5, target="macs", scope="global", normalize="mean")
    assert abs(1 - r.after.macs / r.before.macs - 0.5) <= 0.01
    r = gp.prune(model, x, "l1", 0.5, round_to=4)
    for g in r.graph.groups:
        if g.id in r.plan:
            assert (g.size - len(r.plan[g.id])) % 4 == 0
