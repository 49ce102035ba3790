"""graphprune.tracing: what tracing records (node shapes, the user's model and state left as they were)."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn
from helpers import Block

import graphprune as gp

X = torch.randn(2, 3, 8, 8)


def _interpret(gm, *inputs):
    """Run gm node by node and record each node's value, independently of gp.trace."""
    seen = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            seen[n.name] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return seen


def test_trace_records_every_call_node_shape():
    model = Block().eval()
    gm = gp.trace(model, X)
    assert isinstance(gm, torch.fx.GraphModule)
    values = _interpret(gm, X)
    calls = [n for n in gm.graph.nodes if n.op.startswith("call_")]
    assert len(calls) >= 10
    for n in calls:
        assert "shape" in n.meta, n.name
        if isinstance(values[n.name], torch.Tensor):
            assert tuple(n.meta["shape"]) == tuple(values[n.name].shape), n.name
    with torch.no_grad():
        assert torch.equal(gm(X), model(X))


@pytest.mark.parametrize("entry", ["trace", "build", "count"])
def test_tracing_in_train_mode_keeps_running_stats(entry):
    model = Block().train()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    call = {"trace": gp.trace, "build": gp.DependencyGraph.build, "count": gp.count}[entry]
    call(model, X)
    assert model.training and model.bn.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k
    # the check can fail: a plain forward in train mode does move the statistics
    model(X)
    assert not torch.equal(model.bn.running_mean, snap["bn.running_mean"])
    assert model.bn.num_batches_tracked.item() == snap["bn.num_batches_tracked"].item() + 1


class WithConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.a(x - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))


def test_trace_adds_no_attributes_to_the_user_model():
    model = WithConstant().eval()
    before = set(vars(model))
    gp.trace(model, X)
    gp.DependencyGraph.build(model, X)
    assert set(vars(model)) == before


@pytest.mark.parametrize("name", ["resnet20", "mini_vit_mha", "mini_densenet", "mini_mobilenet_v3"])
def test_named_state_is_torchs_parameters_then_buffers(name):
    from graphprune.tracing import named_state

    model, _ = gp.zoo.create(name)
    tied = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 3))
    tied[2].weight = tied[0].weight  # a tied weight appears once, under its first name
    for m in (model, tied):
        want = dict(m.named_parameters())
        want.update(dict(m.named_buffers()))
        got = named_state(m)
        assert list(got) == list(want) and all(got[k] is want[k] for k in want)
    assert "2.weight" not in named_state(tied)
