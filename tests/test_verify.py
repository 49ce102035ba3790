"""verify / masked_forward / masked_model: the masked original computes what the slim model
computes, without false alarms from tied weights or forwards that change their inputs."""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import InputInPlace, assert_state, flat_outputs, snapshot

import graphprune as gp
from graphprune.verify import masked_forward

X = torch.randn(2, 6)


class TiedAcross(nn.Module):
    """``b`` shares ``a``'s weight; they read the same input and feed different layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(6, 8)
        self.b.weight = self.a.weight
        self.c = nn.Linear(8, 6)
        self.d = nn.Linear(8, 6)

    def forward(self, x):
        return self.c(torch.relu(self.a(x))) + self.d(torch.relu(self.b(x)))


class TiedDeclaredLate(nn.Module):
    """The tied pair is declared in the opposite order of its use, so the first name under
    which the model holds the tensor is not the one the traced graph uses first."""

    def __init__(self) -> None:
        super().__init__()
        self.d = nn.Linear(8, 6)
        self.c = nn.Linear(8, 6)
        self.b = nn.Linear(6, 8)
        self.a = nn.Linear(6, 8)
        self.c.weight = self.d.weight

    def forward(self, x):
        return self.c(torch.relu(self.a(x))) + self.d(torch.relu(self.b(x)))


class ChangesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        x.mul_(3)
        return self.b(torch.relu(self.a(x)))


class Gated(nn.Module):
    """A removed channel reaches a channel-mixing op (a sum over channels) through a
    sigmoid, which does not keep zeros: zeroing weights cannot mask it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) + torch.sigmoid(h).sum(-1, keepdim=True)


def _random_plan(dg, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {g.id: sorted(rng.choice(g.size, max(1, g.size // 2), replace=False).tolist())
            for g in dg.groups if g.prunable and g.exact and (g.size > 1 or g.removable)}


def _max_diff(a, b) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(flat_outputs(a), flat_outputs(b)))


@pytest.mark.parametrize("make", [TiedAcross, TiedDeclaredLate])
def test_tied_weights_give_no_false_alarm(make):
    model = make()
    state = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = gp.DependencyGraph.build(model, X)
    plan = {g.id: [1, 3] for g in dg.groups if g.prunable}
    assert plan
    slim = gp.apply(model, dg, plan)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert gp.verify(model, X, plan, dg=dg, slim=slim) <= 1e-5
    masked = gp.masked_model(model, dg, plan)
    with torch.no_grad():
        assert _max_diff(masked(X), slim(X)) <= 1e-5
    assert_state(model, state)
    assert not [w for w in caught if "ties" in str(w.message)]  # the slim model keeps the tie
    names = ("a.weight", "b.weight") if make is TiedAcross else ("c.weight", "d.weight")
    assert slim.get_parameter(names[0]) is slim.get_parameter(names[1])
    assert masked.get_parameter(names[0]) is masked.get_parameter(names[1])


def test_verify_says_when_a_slim_model_unties_a_cut_tensor():
    model = TiedAcross()
    dg = gp.DependencyGraph.build(model, X)
    plan = {g.id: [1, 3] for g in dg.groups if g.prunable}
    slim = gp.apply(model, dg, plan)
    slim.b.weight = nn.Parameter(slim.b.weight.detach().clone())  # as a rewrite that unties would
    with pytest.warns(UserWarning, match=r"'a.weight', 'b.weight'.*no longer ties them"):
        gp.verify(model, X, plan, dg=dg, slim=slim)


def test_verify_and_masked_model_keep_ties_they_do_not_cut():
    model = TiedAcross()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = gp.DependencyGraph.build(model, X)
    masked = gp.masked_model(model, dg, {})
    assert masked.a.weight is masked.b.weight and model.a.weight is model.b.weight


def test_forward_changing_its_input_gives_no_false_alarm():
    model, x = ChangesInput(), X.clone()
    dg = gp.DependencyGraph.build(model, x)
    plan = {g.id: [0, 5] for g in dg.groups if g.prunable}
    assert plan
    assert gp.verify(model, x, plan, dg=dg) <= 1e-5
    assert gp.verify(model, x, plan) <= 1e-5
    assert torch.equal(x, X)


@pytest.mark.parametrize("name", ["mini_vit_mha", "mini_vit", "mini_swin", "resnet20", "mini_mobilenet_v3", "mini_densenet"])
def test_masked_model_computes_what_the_slim_model_computes(name):
    model, x = gp.zoo.create(name)
    model.eval()
    dg = gp.DependencyGraph.build(model, x)
    plan = _random_plan(dg)
    slim = gp.apply(model, dg, plan).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback needed: the user's own classes do it
        masked = gp.masked_model(model, dg, plan).eval()
    assert type(masked) is type(model)
    with torch.no_grad():
        assert _max_diff(masked(*x), slim(*x)) <= 1e-4
        assert _max_diff(masked_forward(model, dg, plan, x), slim(*x)) <= 1e-4


def test_masked_model_that_weights_cannot_mask_falls_back_and_says_where():
    model = Gated().eval()
    dg = gp.DependencyGraph.build(model, X)
    g = next(g for g in dg.groups if g.prunable)
    plan = {g.id: [2, 5]}
    slim = gp.apply(model, dg, plan)
    with pytest.warns(UserWarning, match=r"node 'sum\w*'"):
        masked = gp.masked_model(model, dg, plan)
    with torch.no_grad():
        assert _max_diff(masked(X), slim(X)) <= 1e-5
    assert gp.verify(model, X, plan, dg=dg, slim=slim) <= 1e-5


def test_masked_model_leaves_the_model_alone():
    model, x = gp.zoo.create("resnet20")
    state = snapshot(model)
    dg = gp.DependencyGraph.build(model, x)
    masked = gp.masked_model(model, dg, _random_plan(dg))
    assert_state(model, state)
    assert all(p is not q for p, q in zip(masked.parameters(), model.parameters()))


def test_verify_refuses_inputs_of_other_shapes_than_the_graph():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    dg = gp.DependencyGraph.build(model, X)
    with pytest.raises(gp.InputError, match=r"\(2, 6\)"):
        gp.verify(model, torch.randn(3, 6), {0: [1]}, dg=dg)
    assert gp.verify(model, torch.randn(3, 6), {0: [1]}) <= 1e-5  # a graph of its own is fine


def test_verify_leaves_a_training_model_in_training_mode():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 3)).train()
    state = snapshot(model)
    assert gp.verify(model, X, {0: [1, 2]}) <= 1e-5
    assert all(m.training for m in model.modules())
    assert_state(model, state)
    copy.deepcopy(model)  # still an ordinary module


def test_functional_gated_model_grads_are_untouched():
    model = Gated()
    F.relu(torch.zeros(1))
    before = [p.clone() for p in model.parameters()]
    dg = gp.DependencyGraph.build(model, X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gp.masked_model(model, dg, {next(g.id for g in dg.groups if g.prunable): [0]})
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_nan_computed_in_a_removed_channel_does_not_leak():
    # p / p.sum(...) over a block whose channels all go is 0 / 0 in the masked original; the
    # masked reference must set removed positions to zero, not multiply them by zero
    # (bat_resnext26ts's bilinear attention transform: verify used to return nan)
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.h = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            b, _, hh, ww = x.shape
            r = torch.sigmoid(self.a(x)).view(b, 4, 2, hh, ww)
            s = r / r.sum(2, keepdim=True)
            return self.h(s.view(b, 8, hh, ww))

    model, x = Blocks().eval(), torch.randn(2, 3, 4, 4)
    dg = gp.DependencyGraph.build(model, x)
    g = next(g for g in dg.groups if g.prunable)
    assert g.size == 4  # blocks of two channels
    assert gp.verify(model, x, {g.id: [1]}, dg=dg) < 1e-5


def test_tensors_sharing_storage_are_masked_apart():
    # two buffers that are views of one tensor (a rotary table split per block): the slim model
    # slices them apart, so the masked original must not zero one through the other
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            table = torch.rand(8) + 0.5
            self.register_buffer("s1", table[:])
            self.register_buffer("s2", table.view(8))
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
            self.c, self.d = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c(self.a(x) * self.s1.view(1, 8, 1, 1)) + self.d(self.b(x) * self.s2.view(1, 8, 1, 1))

    model, x = Shared().eval(), torch.randn(2, 3, 4, 4)
    assert model.s1.data_ptr() == model.s2.data_ptr()
    dg = gp.DependencyGraph.build(model, x)
    g = next(g for g in dg.groups if g.prunable and any(m.param == "a.weight" for m in g.members))
    assert len(g.members) == 4  # a's rows and bias, c's columns, and s1 (a constant of the traced graph)
    assert gp.verify(model, x, {g.id: [0, 3]}, dg=dg) < 1e-5


# --- the result says exact or inexact, and measures the inexact part ------------------------------
class Normed(nn.Module):
    """An exact group (``a``'s outputs) and an inexact one (``b``'s, normalised by a LayerNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.norm, self.c = nn.Linear(6, 12), nn.Linear(12, 16), nn.LayerNorm(16), nn.Linear(16, 3)

    def forward(self, x):
        return self.c(self.norm(self.b(torch.relu(self.a(x)))))


def _normed():
    torch.manual_seed(0)
    model = Normed().eval()
    dg = gp.DependencyGraph.build(model, X)
    exact = next(g.id for g in dg.groups if g.prunable and g.exact)
    inexact = next(g.id for g in dg.groups if g.prunable and not g.exact)
    return model, dg, exact, inexact


def test_verify_result_of_an_exact_plan_is_a_float_that_says_so():
    model, dg, exact, _ = _normed()
    result = gp.verify(model, X, {exact: [1, 2]}, dg=dg)
    assert isinstance(result, float) and result < 1e-5 and float(result) == result.masked_diff
    assert result.exact and result.inexact_groups == () and result.reason == ""
    assert str(result).startswith("exact (max diff ") and f"{result:.1g}" in str(result)
    assert result.output_change > 0  # pruning did change the outputs (exactly as masking does)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["exact"] is True and data["summary"] == str(result)
    again = pickle.loads(pickle.dumps(result))
    assert again == result and again.exact and str(again) == str(result)


def test_verify_says_inexact_and_measures_it_without_a_warning():
    model, dg, exact, inexact = _normed()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = gp.verify(model, X, {exact: [1, 2], inexact: [0, 5, 7]}, dg=dg)
    assert result < 1e-5  # the exact part alone matches its masked original
    assert not result.exact and result.inexact_groups == (inexact,)
    assert result.reason == "normalisation over pruned channels" and "LayerNorm" in result.reasons[inexact]
    assert result.masked_diff > 1e-3 and result.output_change > 1e-3  # what the inexact part changes
    assert str(result) == ("inexact (normalisation over pruned channels): outputs changed by "
                           f"{result.output_change:.3g} relative to the dense model")
    assert result.to_dict()["inexact_groups"] == {str(inexact): result.reasons[inexact]}


def test_verify_checks_the_exact_part_of_an_inexact_plan(monkeypatch):
    model, dg, exact, inexact = _normed()
    plan = {exact: [1, 2], inexact: [0, 5]}
    slim = gp.apply(model, dg, plan)
    real = gp.apply
    # a rewrite that cut the wrong channels of the exact group is caught
    monkeypatch.setitem(gp.verify.__globals__, "apply", lambda m, d, p, **k: real(m, d, {exact: [3, 4]}, **k))
    result = gp.verify(model, X, plan, dg=dg, slim=slim)
    assert result > 1e-3 and not result.exact and "MISMATCH" in str(result)


def test_verify_result_of_a_plan_that_changes_output_shapes_is_inf():
    model, dg, exact, _ = _normed()
    bad = nn.Sequential(nn.Linear(6, 4))
    result = gp.verify(model, X, {exact: [1]}, dg=dg, slim=bad)
    assert result == float("inf") and str(result).startswith("failed")


def test_verify_of_a_model_that_changes_its_input_in_place():
    # verify.py: the masked original and the slim model run one after the other on the same
    # tensors, so the slim model sees x * 4 where the masked original saw x * 2: verify reports
    # about 1.0 for an exact plan, and the caller's inputs are changed
    torch.manual_seed(0)
    model, x = InputInPlace("mul_").eval(), torch.randn(1, 3, 6, 6)
    dg = gp.DependencyGraph.build(model, x.clone())
    plan = {0: [1, 4]}
    assert dg.groups[0].prunable and dg.groups[0].exact
    original = x.clone()
    assert gp.verify(model, x, plan, dg=dg) <= 1e-4
    assert torch.equal(x, original), "verify changed the example inputs"
