"""Typed errors: every failure a user can cause raises a ``gp.GraphPruneError`` subclass
whose message names the culprit, and leaves the user's model as it was."""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp
from graphprune import errors


@contextlib.contextmanager
def untouched(model):
    """Assert the model's state, parameter identity and mode survive the block."""
    snap = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = {k: id(v) for k, v in model.named_parameters()}
    training = model.training
    try:
        yield
    finally:
        now = model.state_dict()
        assert now.keys() == snap.keys()
        for k, v in snap.items():
            assert now[k].shape == v.shape and torch.equal(now[k], v), f"{k} changed"
        assert {k: id(v) for k, v in model.named_parameters()} == params
        assert model.training == training


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(F.relu(self.bn(self.conv1(x))))


def net():
    return Net().eval()


X = torch.randn(2, 3, 8, 8)


def test_error_hierarchy():
    for cls in (gp.TraceError, gp.InputError, gp.PlanError, gp.RewriteError,
                gp.SerializationError, gp.UnsupportedOpError):
        assert issubclass(cls, gp.GraphPruneError)
        assert getattr(errors, cls.__name__) is cls
    assert issubclass(gp.InputError, ValueError) and issubclass(gp.PlanError, ValueError)


# --- tracing ---------------------------------------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.c(x)
        return -self.c(x)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1)
        self.dd = DataDependent()
        self.h = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.h(self.dd(F.relu(self.a(x))))


def _branch_line():
    lines, start = inspect.getsourcelines(DataDependent.forward)
    return start + next(i for i, line in enumerate(lines) if "if x.sum() > 0" in line)


@pytest.mark.parametrize("entry", ["trace", "build", "count", "prune"])
def test_untraceable_model_names_file_line_and_suggests_fixes(entry):
    model = Outer().eval()
    call = {"trace": gp.trace, "build": gp.DependencyGraph.build, "count": gp.count,
            "prune": gp.prune}[entry]
    with untouched(model), pytest.raises(gp.TraceError) as info:
        call(model, X)
    msg = str(info.value)
    assert os.path.basename(__file__) in msg and re.search(rf"\b{_branch_line()}\b", msg)
    assert "leaf_modules" in msg and "concrete_args" in msg


def test_untraceable_submodule_is_named():
    with pytest.raises(gp.TraceError) as info:
        gp.DependencyGraph.build(Outer(), X)
    msg = str(info.value)
    assert "'dd'" in msg and "leaf_modules=[DataDependent]" in msg


@pytest.mark.parametrize("leaf", [DataDependent, "dd"])
def test_leaf_modules_make_it_traceable_and_pin_its_channels(leaf):
    model = Outer().eval()
    with untouched(model):
        dg = gp.DependencyGraph.build(model, X, leaf_modules=[leaf])
    feeding = [g for g in dg.groups if ("a.weight", 0) in {(m.param, m.dim) for m in g.members}]
    assert len(feeding) == 1
    g = feeding[0]
    assert not g.prunable
    assert "no rule" in g.reason and "DataDependent" in g.reason and "dd" in g.reason
    with pytest.raises(gp.PlanError):
        gp.apply(model, dg, {g.id: [0]})


def test_wrong_input_shape_names_the_node():
    model = net()
    with untouched(model), pytest.raises(gp.TraceError) as info:
        gp.DependencyGraph.build(model, torch.randn(2, 5, 8, 8))
    msg = str(info.value)
    assert "conv1" in msg
    assert "example_inputs" in msg or "example inputs" in msg


def test_wrong_input_shape_in_train_mode_leaves_running_stats():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.Linear(5, 2)).train()
    with untouched(model), pytest.raises(gp.TraceError) as info:
        gp.DependencyGraph.build(model, torch.randn(2, 3, 4, 4))
    assert "'2'" in str(info.value)  # the Linear that fails


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


@pytest.mark.parametrize("inputs", [(X,), (X, X, X)])
def test_wrong_number_of_inputs(inputs):
    model = TwoInputs().eval()
    with untouched(model), pytest.raises((gp.TraceError, gp.InputError)) as info:
        gp.DependencyGraph.build(model, inputs)
    msg = str(info.value)
    assert re.search(rf"\b{len(inputs)}\b", msg) and re.search(r"\b2\b", msg)
    assert re.search(r"\bx\b.*\by\b", msg)  # names the forward's inputs


@pytest.mark.parametrize("bad", [[1.0], ("x",), (X, None), (), None, 3.0, {"nope": X}, {}, {"x": 1.0}],
                         ids=["float", "str", "none-in-tuple", "empty", "none", "scalar", "dict-unknown-key",
                              "dict-empty", "dict-no-tensor"])
def test_non_tensor_example_inputs(bad):
    model = net()
    with untouched(model), pytest.raises(gp.InputError):
        gp.DependencyGraph.build(model, bad)


def test_meta_example_input():
    with pytest.raises(gp.InputError, match="meta"):
        gp.DependencyGraph.build(net(), X.to("meta"))


@pytest.mark.parametrize("bad", [lambda t: t, torch.randn(3), "resnet20", None],
                         ids=["function", "tensor", "str", "none"])
def test_non_module_model(bad):
    with pytest.raises(gp.InputError, match="Module"):
        gp.DependencyGraph.build(bad, X)
    with pytest.raises(gp.InputError):
        gp.prune(bad, X)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model(dtype):
    model = net().to(dtype)
    with untouched(model), pytest.raises(gp.InputError) as info:
        gp.DependencyGraph.build(model, X.to(dtype))
    msg = str(info.value)
    assert str(dtype) in msg and "conv1.weight" in msg


def test_meta_device_model_is_structure_only():
    # a model on the meta device builds (DESIGN: structure without weights); what needs weights says so
    with torch.device("meta"):
        model = Net()
    dg = gp.DependencyGraph.build(model, X)
    with pytest.raises(gp.InputError) as info:
        gp.score("magnitude", model, dg)
    assert "meta device" in str(info.value) and "random" in str(info.value)


# --- plans -----------------------------------------------------------------------------------


@pytest.fixture
def built():
    model = net()
    dg = gp.DependencyGraph.build(model, X)
    inner = next(g for g in dg.groups if g.prunable)
    pinned = next(g for g in dg.groups if not g.prunable)
    return model, dg, inner, pinned


def _plan_error(model, dg, plan, *patterns):
    with untouched(model), pytest.raises(gp.PlanError) as info:
        gp.apply(model, dg, plan)
    for p in patterns:
        assert re.search(p, str(info.value)), (p, str(info.value))
    return str(info.value)


def test_plan_unknown_group(built):
    model, dg, _, _ = built
    n = len(dg.groups)
    _plan_error(model, dg, {n + 3: [0]}, rf"\b{n + 3}\b")
    _plan_error(model, dg, gp.Plan.from_json('{"-1": [0]}'), r"-1")


def test_plan_channel_out_of_range(built):
    model, dg, inner, _ = built
    _plan_error(model, dg, {inner.id: [0, inner.size]}, rf"\b{inner.size}\b", rf"group {inner.id}\b")


def test_plan_removing_every_channel_of_a_non_removable_group(built):
    model, dg, inner, _ = built
    assert not inner.removable
    _plan_error(model, dg, {inner.id: list(range(inner.size))}, rf"group {inner.id}\b")


def test_plan_pruning_an_unprunable_group(built):
    model, dg, _, pinned = built
    msg = _plan_error(model, dg, {pinned.id: [0]}, rf"group {pinned.id}\b")
    assert "output" in msg  # says why it is not prunable


def test_plan_negative_index(built):
    model, dg, inner, _ = built
    with pytest.raises(gp.PlanError, match="-1"):
        gp.Plan({inner.id: [-1]})
    with untouched(model), pytest.raises(gp.PlanError):
        gp.apply(model, dg, {inner.id: [-1]})


@pytest.mark.parametrize("text", ['{"0": [1]', "[1, 2]", '{"0": "ab"}', '{"zero": [1]}', '{"0": 3}', ""],
                         ids=["truncated", "list", "string-entry", "bad-key", "int-entry", "empty"])
def test_plan_malformed_json(text):
    with pytest.raises(gp.PlanError):
        gp.Plan.from_json(text)


@pytest.mark.parametrize("text", ['{"0": [1.5]}', '{"0": [true]}'])
def test_plan_non_integer_index(text):
    with pytest.raises(gp.PlanError):
        gp.Plan.from_json(text)


def test_plan_given_as_json_text_is_rejected_with_a_plan_error(built):
    model, dg, inner, _ = built
    with pytest.raises(gp.GraphPruneError):
        gp.apply(model, dg, gp.Plan({inner.id: [0]}).to_json())


def test_plan_is_read_only():
    plan = gp.Plan({0: [3, 1]})
    with pytest.raises(TypeError):
        plan[0] = (2,)
    assert plan[0] == (1, 3)


# --- prune() arguments ----------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, float("nan"), "0.5"])
def test_prune_ratio_out_of_range(ratio):
    model = net()
    with untouched(model), pytest.raises(gp.InputError) as info:
        gp.prune(model, X, ratio=ratio)
    assert "ratio" in str(info.value)


def test_prune_unknown_method():
    model = net()
    with untouched(model), pytest.raises(gp.InputError) as info:
        gp.prune(model, X, method="no_such_method")
    msg = str(info.value)
    assert "no_such_method" in msg and "magnitude" in msg and "random" in msg


def test_prune_invalid_method_option():
    with pytest.raises(gp.GraphPruneError):
        gp.prune(net(), X, method="magnitude", p=-1)


# --- the model changed after the graph was built ------------------------------------------------


def test_apply_to_a_model_modified_after_build():
    model = net()
    dg = gp.DependencyGraph.build(model, X)
    inner = next(g for g in dg.groups if g.prunable)
    changed = copy.deepcopy(model)
    changed.conv1 = nn.Conv2d(3, 12, 3, padding=1)
    with untouched(changed), pytest.raises(gp.GraphPruneError) as info:
        gp.apply(changed, dg, {inner.id: [0]})
    assert "conv1" in str(info.value)
    with untouched(changed), pytest.raises(gp.GraphPruneError):
        gp.verify(changed, X, {inner.id: [0]}, dg=dg)
    # the model it was built from still works
    slim = gp.apply(model, dg, {inner.id: [0]})
    assert slim.conv1.out_channels == 7


def test_parameter_replaced_in_place_after_build():
    model = net()
    dg = gp.DependencyGraph.build(model, X)
    inner = next(g for g in dg.groups if g.prunable)
    changed = copy.deepcopy(model)
    changed.bn.weight = nn.Parameter(torch.ones(12))  # same module, new parameter shape
    with untouched(changed), pytest.raises(gp.InputError) as info:
        gp.apply(changed, dg, {inner.id: [0]})
    assert "bn.weight" in str(info.value) and "(8,)" in str(info.value) and "(12,)" in str(info.value)


# --- example inputs of the wrong dtype -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64, torch.bool])
def test_example_input_of_the_wrong_dtype_names_the_node_and_dtypes(dtype):
    model = net()
    with untouched(model), pytest.raises(gp.TraceError) as info:
        gp.DependencyGraph.build(model, X.to(dtype))
    msg = str(info.value)
    assert "conv1" in msg and "dtype" in msg
    assert re.search(r"double|half|long|bool", msg, re.IGNORECASE)


# --- ratios and scores given to select() directly ----------------------------------------------


@pytest.mark.parametrize("ratio", [1.0, -0.1, float("nan"), None, True])
def test_select_ratio_out_of_range(built, ratio):
    _, dg, inner, _ = built
    with pytest.raises(gp.InputError, match="ratio"):
        gp.select(dg, {inner.id: [1.0] * inner.size}, ratio)


def test_nan_weights_give_a_clear_error_not_a_silent_plan():
    model = net()
    with torch.no_grad():
        model.conv1.weight[2, 0, 0, 0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(gp.PlanError, match="NaN"):
        gp.prune(model, X, method="magnitude", ratio=0.5)
    for k, v in model.state_dict().items():  # untouched() cannot compare NaN with NaN
        assert torch.equal(v.isnan(), before[k].isnan()) and torch.equal(v.nan_to_num(), before[k].nan_to_num())


# --- a failure midway leaves nothing half-pruned -----------------------------------------------


@pytest.mark.parametrize("stage", ["rule patch", "dropping layers", "check run"])
def test_a_failure_midway_through_apply_leaves_the_model_whole(built, monkeypatch, stage):
    model, dg, inner, _ = built

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure")

    if stage == "rule patch":  # the BatchNorm rule fails after the weights were sliced
        import dataclasses

        from graphprune.rules import base

        rule = dataclasses.replace(base._MODULE_RULES[nn.BatchNorm2d], patch=boom)
        monkeypatch.setitem(base._MODULE_RULES, nn.BatchNorm2d, rule)
    elif stage == "dropping layers":
        monkeypatch.setattr("graphprune.rewrite._drop_vanished", boom)
    else:  # the slim model fails its check run
        monkeypatch.setattr(torch.fx.GraphModule, "__call__", boom)
    with untouched(model), pytest.raises(gp.RewriteError, match="injected failure"):
        gp.apply(model, dg, {inner.id: [0, 3]})
    monkeypatch.undo()
    # the same graph and model still prune exactly afterwards
    assert gp.verify(model, X, {inner.id: [0, 3]}, dg=dg) <= 1e-5


class ReturnsAnObject(nn.Module):
    """Python control flow on a shape (fx fails) and an output torch.export cannot flatten."""

    class Box:
        def __init__(self, t):
            self.t = t

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        y = self.a(x)
        if x.shape[0] > 1:
            y = y * 2
        return self.Box(y)


def test_an_output_that_is_not_tensors_is_named_with_what_to_do():
    with pytest.raises(gp.TraceError) as info:
        gp.DependencyGraph.build(ReturnsAnObject(), torch.randn(2, 4))
    msg = str(info.value)
    assert "returns a Box, which is not a tensor or a container of tensors" in msg
    assert "use_cache=False" in msg and "leaf_modules=[ReturnsAnObject]" not in msg


def test_warnings_name_the_callers_line():
    class ShapeBranch(nn.Module):  # torch.export at batch 1 warns that the batch size stays fixed
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.a(x) if x.shape[0] > 0 else x

    with pytest.warns(UserWarning, match="batch size is 1") as caught:
        gp.DependencyGraph.build(ShapeBranch(), torch.randn(1, 3, 4, 4))
    assert {os.path.basename(w.filename) for w in caught} == {os.path.basename(__file__)}
