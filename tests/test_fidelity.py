"""fidelity: outputs_differ and same_random_state, and trace's check that the traced graph
computes what the model computes (replaced by the torch.export graph, or refused)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.errors import TraceError
from graphprune.fidelity import outputs_differ, same_random_state


# --- outputs_differ ---------------------------------------------------------------------
def test_equal_outputs_in_any_container_do_not_differ():
    a = {"x": torch.ones(2, 3), "rest": [torch.arange(3), None, "text"]}
    assert outputs_differ(copy.deepcopy(a), a) is None


def test_a_difference_above_the_tolerance_is_named():
    got, want = (torch.zeros(3), torch.ones(2)), (torch.zeros(3), torch.ones(2) + 1e-3)
    assert outputs_differ(got, want) == "output 1 differs by 0.001 (largest |value| 1)"
    assert outputs_differ(got, (torch.zeros(3), torch.ones(2) + 1e-6)) is None


def test_the_tolerance_scales_with_the_largest_value():
    want = torch.tensor([1e12, 1.0])
    assert outputs_differ(want + torch.tensor([1e6, 0.0]), want) is None  # 1e-6 of the scale
    assert outputs_differ(want + torch.tensor([0.0, 1e9]), want) is not None


def test_nans_and_infinities_must_sit_at_the_same_places():
    want = torch.tensor([math.nan, math.inf, 1.0])
    assert outputs_differ(want.clone(), want) is None
    assert "infinities or NaNs" in outputs_differ(torch.tensor([math.nan, 1.0, 1.0]), want)
    assert "infinities or NaNs" in outputs_differ(torch.tensor([0.0, math.inf, 1.0]), want)


def test_counts_shapes_dtypes_and_integers_are_compared_exactly():
    assert "2 tensor(s), the model 1" in outputs_differ((torch.ones(1), torch.ones(1)), torch.ones(1))
    assert "(2,) in the graph" in outputs_differ(torch.ones(2), torch.ones(3))
    assert "torch.float64" in outputs_differ(torch.ones(2, dtype=torch.float64), torch.ones(2))
    assert "differs at 1 place" in outputs_differ(torch.tensor([1, 2]), torch.tensor([1, 3]))


def test_same_random_state_repeats_draws_and_leaves_the_generator_alone():
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    with same_random_state():
        a = torch.rand(3)
    with same_random_state():
        b = torch.rand(3)
    assert torch.equal(a, b)
    assert torch.equal(torch.random.get_rng_state(), before)


# --- trace ------------------------------------------------------------------------------
class AugmentedAssignment(nn.Module):
    """``y = x; y += 1`` changes ``x`` itself; a Proxy has no ``__iadd__``, so torch.fx
    records ``y = y + 1`` and later reads of ``x`` see the unchanged input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = x
        y += 1.0
        return self.b(self.a(x))


def test_an_unfaithful_fx_graph_is_replaced_by_the_export_graph():
    torch.manual_seed(0)
    model, x = AugmentedAssignment().eval(), torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        want = copy.deepcopy(model)(x.clone())
    gm = gp.trace(model, x.clone())
    assert gm.meta.get("graphprune_export")
    dg = gp.DependencyGraph.build(model, x.clone())
    plan = {g.id: [0] for g in dg.groups if g.prunable}
    with torch.no_grad():
        assert outputs_differ(gm(x.clone()), want) is None
        assert outputs_differ(gp.apply(model, dg, {})(x.clone()), want) is None
    assert plan and gp.verify(model, x, plan, dg=dg) <= 1e-4


def test_an_unfaithful_fx_graph_without_the_fallback_is_refused():
    with pytest.raises(TraceError, match=r"does not compute what the model computes.*y = x; y \+= 1"):
        gp.trace(AugmentedAssignment().eval(), torch.randn(2, 3, 4, 4), export_fallback=False)


class TracingAware(nn.Module):
    """Takes another path while it is being traced (as code guarded by is_fx_tracing or
    is_exporting does): no traced graph computes what it computes when called."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        tracing = torch.fx._symbolic_trace.is_fx_tracing() or torch.compiler.is_exporting()
        return self.conv(x) * (2.0 if tracing else 1.0)


def test_a_model_no_graph_reproduces_is_refused_and_left_as_it_was():
    model = TracingAware().eval()
    with pytest.raises(TraceError, match="torch.export graph differs from the model too"):
        gp.trace(model, torch.randn(2, 3, 4, 4))
    assert model.calls == 0


class Noisy(nn.Module):
    """Draws random numbers in eval mode (as a sampling decoder does)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y + 0.1 * torch.randn_like(y))


def test_random_draws_are_compared_from_the_same_random_state():
    gm = gp.trace(Noisy().eval(), torch.randn(2, 3, 4, 4))
    assert not gm.meta.get("graphprune_export")  # the fx graph was found faithful


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.b(nn.functional.dropout(self.a(x), 0.5, self.training))


def test_a_training_model_is_traced_in_eval_mode_with_a_warning():
    model = FunctionalDropout().train()
    with pytest.warns(UserWarning, match=r"'FunctionalDropout'.*eval-mode branch"):
        gm = gp.trace(model, torch.randn(2, 3, 4, 4))
    assert model.training and gm.training
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(gm(x), model.eval()(x))


def test_without_the_check_an_unfaithful_fx_graph_is_kept():
    """``check=False`` is the documented fast mode: no eager run, so the difference goes unseen."""
    model, x = AugmentedAssignment().eval(), torch.randn(2, 3, 4, 4)
    assert not gp.trace(model, x.clone(), check=False).meta.get("graphprune_export")
    assert not gp.DependencyGraph.build(model, x.clone(), check=False).gm.meta.get("graphprune_export")
