"""graphprune.rules.base: the rule registry (gp.register) for a user's own leaf module."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

import graphprune as gp


def test_user_rule_for_a_custom_leaf_module():
    class Gate(nn.Module):  # per-channel gate with a data-dependent branch: must be a leaf
        def __init__(self, c):
            super().__init__()
            self.w = nn.Parameter(torch.rand(c) + 0.5)

        def forward(self, x):
            if x.sum() > 1e9:
                x = x / 2
            return x * self.w.view(1, -1, 1, 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.g, self.b = nn.Conv2d(3, 8, 3), Gate(8), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(self.g(self.a(x)))

    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = gp.DependencyGraph.build(model, x, leaf_modules=[Gate])
    assert not any(g.prunable for g in dg.groups)          # no rule yet: pinned, with a reason
    assert "no rule for Gate" in dg.describe(width=200)

    @gp.register(Gate)
    def gate_rule(ctx, node, module):
        labels = ctx.labels(node.args[0])
        w = ctx.module_param(node.target, "w", 0, "pass")
        return labels[:1] + (ctx.couple([labels[1], w], 8, "gate"),) + labels[2:]

    dg = gp.DependencyGraph.build(model, x)                  # a registered type is a leaf by itself
    group = next(g for g in dg.groups if g.prunable)
    assert {m.param for m in group.members} >= {"a.weight", "g.w", "b.weight"}
    slim = gp.apply(model, dg, {group.id: [0, 5]})
    assert slim.get_parameter("g.w").shape == (6,)
    assert gp.verify(model, x, {group.id: [0, 5]}, dg=dg, slim=slim) <= 1e-5
