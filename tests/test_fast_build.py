"""The fast mode, ``DependencyGraph.build(..., check=False)`` + ``apply(..., check=False)``:
the same groups, plans and slim models as the checked default on every zoo model, with no
eager forward pass of the model (only the graph's own shape-recording run)."""

from __future__ import annotations

import pytest
import torch
from fingerprints import _groups

import graphprune as gp


@pytest.mark.parametrize("name", gp.zoo.list_models())
def test_fast_mode_gives_the_default_groups_plans_and_slim_code(name: str) -> None:
    model, inputs = gp.zoo.create(name)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))  # the root runs only eagerly
    try:
        dg = gp.DependencyGraph.build(model, inputs)
        assert calls == [1]
        fast = gp.DependencyGraph.build(model, inputs, check=False)
        assert calls == [1]  # no eager run in the fast mode
    finally:
        hook.remove()
    assert _groups(fast) == _groups(dg)
    for plan_dg, plan_fast in (
        (gp.select(dg, gp.score("random", model, dg, seed=0), 0.5),
         gp.select(fast, gp.score("random", model, fast, seed=0), 0.5)),
        (gp.select(dg, gp.score("magnitude", model, dg, p=1), 0.3, scope="global"),
         gp.select(fast, gp.score("magnitude", model, fast, p=1), 0.3, scope="global")),
    ):
        assert plan_fast.to_json() == plan_dg.to_json()
        slim, slim_fast = gp.apply(model, dg, plan_dg), gp.apply(model, fast, plan_fast, check=False)
        assert slim_fast.code == slim.code
        assert {k: v.shape for k, v in slim_fast.state_dict().items()} == \
            {k: v.shape for k, v in slim.state_dict().items()}
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(slim_fast.state_dict().values(),
                                                         slim.state_dict().values()))


class ShapeBranch(torch.nn.Module):
    """Symbolic tracing fails on the shape-dependent branch: the torch.export fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.d = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        if x.shape[0] > 1:
            x = x * 2
        return self.d(torch.relu(self.c(x)))


def test_fast_mode_takes_the_export_fallback_where_fx_fails() -> None:
    model, x = ShapeBranch().eval(), torch.randn(2, 3, 8, 8)
    dg, fast = gp.DependencyGraph.build(model, x), gp.DependencyGraph.build(model, x, check=False)
    assert fast.gm.meta.get("graphprune_export") and dg.gm.meta.get("graphprune_export")
    assert _groups(fast) == _groups(dg)
    plan = {g.id: [0, 3] for g in fast.groups if g.prunable}
    assert plan and gp.verify(model, x, plan, dg=fast) <= 1e-4
