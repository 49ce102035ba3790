"""Symbolic tracing fails -> torch.export (non-strict) gives an ATen graph that prunes exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp
from graphprune.errors import TraceError
from graphprune.tracing import _export_trace


class ShapeBranch(nn.Module):
    """Python branches on a shape: symbolic tracing cannot follow, export specialises."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.d = nn.Conv2d(8, 8, 1)
        self.e = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x):
        y = F.relu(self.bn(self.c(x)))
        if y.shape[-1] > 4:
            y = self.d(y) + y
        a, b = torch.split(self.e(y), [4, 8], dim=1)
        y = torch.cat([a, b, y[:, 2:6]], 1)[:, :8]
        return self.fc(y.flatten(1))


class DataBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.c(x)
        if y.sum() > 0:
            y = y * 2
        return y


def test_shape_dependent_model_is_pruned_through_export():
    model, x = ShapeBranch().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(TraceError):
        gp.trace(model, x, export_fallback=False)
    dg = gp.DependencyGraph.build(model, x, grouped="groups")
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in dg.gm.graph.nodes)
    prunable = [g for g in dg.groups if g.prunable]
    assert prunable and prunable[0].size == 4  # grouped conv: 4 whole conv groups
    plan = {prunable[0].id: [0, 2]}
    slim = gp.apply(model, dg, plan)
    assert gp.verify(model, x, plan, dg=dg, slim=slim) <= 1e-5
    # the grouped conv lost two of its four groups; slices and split sizes follow
    conv_nodes = [n for n in slim.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert conv_nodes[-1].args[-1] == 2
    before, after = gp.count(model, x), gp.count(slim, x)
    assert after.params < before.params and 0 < after.macs < before.macs


def test_shape_dependent_model_keeps_its_conv_groups_by_default():
    model, x = ShapeBranch().eval(), torch.randn(2, 3, 8, 8)
    dg = gp.DependencyGraph.build(model, x)  # grouped="channels": positions within the 4 conv groups
    plan = {g.id: list(range(0, g.size, 2)) for g in dg.groups if g.prunable and g.size > 1}
    assert plan
    slim = gp.apply(model, dg, plan)
    assert gp.verify(model, x, plan, dg=dg, slim=slim) <= 1e-5
    conv = [n for n in slim.graph.nodes if n.target is torch.ops.aten.conv2d.default][-1]
    assert conv.args[-1] == 4 and gp.count(slim, x).params < gp.count(model, x).params


def test_data_dependent_model_names_both_causes():
    with pytest.raises(TraceError) as info:
        gp.DependencyGraph.build(DataBranch(), torch.randn(1, 3, 8, 8))
    message = str(info.value)
    assert "control flow" in message and "torch.export" in message


@pytest.mark.parametrize("name", ["resnet20", "mini_mobilenet_v2", "mini_shufflenet_v2", "mini_vit", "msd"])
def test_zoo_models_prune_exactly_from_their_export_graph(name):
    model, x = gp.zoo.create(name)
    exported = _export_trace(model, x, TraceError("forced for the test"))
    dg_fx = gp.DependencyGraph.build(model, x)
    dg = gp.DependencyGraph.build(exported, x)
    assert sum(g.prunable for g in dg.groups) == sum(g.prunable for g in dg_fx.groups)
    rng = np.random.default_rng(0)
    plan = {g.id: sorted(rng.choice(g.size, max(1, g.size // 2), replace=False).tolist())
            for g in dg.groups if g.prunable and g.exact and (g.size > 1 or g.removable)}
    slim = gp.apply(exported, dg, plan)
    assert gp.verify(exported, x, plan, dg=dg, slim=slim) <= 1e-4
    assert gp.count(slim, x).macs < gp.count(exported, x).macs


class Remembers(nn.Module):
    """Caches a tensor and a shape over class-level defaults, as ultralytics' Detect does."""

    anchors = torch.empty(0)
    shape = None

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if self.shape != x.shape:
            self.anchors, self.shape = torch.arange(x.shape[-1], dtype=x.dtype), x.shape
        return self.conv(x) + self.anchors


def test_each_export_attempt_leaves_the_model_as_it_was():
    # graphprune may export twice (a dynamic batch first, then static); what the first attempt
    # stored (fake tensors among it) was read by the second: a cached Detect.anchors became a
    # fake constant of ultralytics YOLO's graph at batch 1
    from graphprune.export_trace import _export
    from graphprune.inputs import BoundInputs

    model = Remembers().eval()
    _export(model, BoundInputs((torch.randn(2, 3, 4, 4),)), dynamic=True)
    assert "anchors" not in vars(model) and "shape" not in vars(model)


def test_a_cache_filled_while_exporting_at_batch_1_is_not_a_constant_of_the_graph():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), Remembers()).eval(), torch.randn(1, 3, 5, 5)
    with pytest.warns(UserWarning, match="batch size is 1"):  # one static export (batch 1 specialises)
        dg = gp.DependencyGraph.build(model, x)
    assert dg.gm.meta.get("graphprune_export") and "anchors" not in vars(model[1])
    plan = {g.id: [0, 2] for g in dg.groups if g.prunable}
    slim = gp.apply(model, dg, plan)
    assert plan and gp.verify(model, x, plan, dg=dg, slim=slim) <= 1e-5


def test_a_batch_of_one_is_exported_once(monkeypatch):
    # torch.export specialises a dimension of size 1, so a dynamic attempt would only give the
    # static graph again at twice the cost (most of building a Hugging Face LLM's graph)
    calls = []
    real = torch.export.export

    def counted(*args, **kwargs):
        calls.append(kwargs.get("dynamic_shapes"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counted)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), Remembers()).eval()
    with pytest.warns(UserWarning, match="batch size is 1"):
        gp.DependencyGraph.build(model, torch.randn(1, 3, 5, 5))
    assert calls == [None]
    calls.clear()
    gp.DependencyGraph.build(model, torch.randn(2, 3, 5, 5))  # a batch of 2 is exported dynamic
    assert len(calls) == 1 and calls[0] is not None
