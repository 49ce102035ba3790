"""removal.py: what a plan removes."""

from __future__ import annotations

import numpy as np
import pytest

import graphprune as gp
from graphprune.removal import EmptiedAxes, Removal
from graphprune.rules.base import iter_arrays


@pytest.mark.parametrize("name", ["mini_shufflenet_v2", "mini_densenet", "mini_vit"])
def test_emptied_axes_says_whether_a_plan_empties_any_axis(name):
    model, x = gp.zoo.create(name)
    dg = gp.DependencyGraph.build(model, x)
    axes, rng = EmptiedAxes(dg), np.random.default_rng(0)
    plans = [{}, {g.id: list(range(g.size)) for g in dg.groups if g.prunable}]
    for _ in range(8):
        plans.append({g.id: sorted(rng.choice(g.size, size=rng.integers(0, g.size + 1), replace=False).tolist())
                      for g in dg.groups if g.prunable and rng.random() < 0.7})
    answers = []
    for plan in plans:
        removal = Removal(dg, plan)
        want = any(arr.size and not removal.keep(arr).any()  # the definition, one axis at a time
                   for node in dg.gm.graph.nodes for arr in iter_arrays(dg.node_labels.get(node.name)))
        answers.append(want)
        assert axes.any_empty(removal.removed) == want
    assert not answers[0] and answers[1]
