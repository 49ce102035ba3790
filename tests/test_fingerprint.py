"""fingerprint: digests of a model's code that tell models with the same parameters but other
forward code apart, without tracing; check_same_code names the module that differs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.errors import InputError
from graphprune.tracing import check_same_code, code_fingerprint, code_fingerprints


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class TwoLayersSigmoid(TwoLayers):
    def forward(self, x):
        return self.b(torch.sigmoid(self.a(x)))


class TwoLayersHelper(TwoLayers):
    def forward(self, x):
        return self.b(self.act(self.a(x)))

    def act(self, x):
        return torch.relu(x)


class TwoLayersHelperTanh(TwoLayersHelper):
    def act(self, x):
        return torch.tanh(x)


class NoTrace(TwoLayers):
    def forward(self, x):
        raise AssertionError("fingerprinting must not run or trace forward")


def test_code_fingerprint_tells_models_apart_by_their_code():
    a, b = TwoLayers(), TwoLayersSigmoid()
    b.load_state_dict(a.state_dict())
    assert code_fingerprint(a) == code_fingerprint(copy.deepcopy(a)) == code_fingerprint(TwoLayers())
    assert code_fingerprint(a) != code_fingerprint(b)  # same parameters, other forward
    assert code_fingerprint(TwoLayersHelper()) != code_fingerprint(TwoLayersHelperTanh())  # a helper method
    swapped = TwoLayers()
    swapped.a = nn.Sequential(nn.Linear(4, 8))  # other submodule class, same shapes under other names
    assert code_fingerprint(swapped) != code_fingerprint(a)
    slope = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.1))
    assert code_fingerprint(slope) != code_fingerprint(nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2)))
    patched = TwoLayers()
    patched.forward = lambda x: patched.b(patched.a(x))  # an instance-level forward
    assert code_fingerprint(patched) != code_fingerprint(a)
    trained = TwoLayers().train()
    assert code_fingerprint(trained) == code_fingerprint(TwoLayers().eval())  # mode is not code
    code_fingerprint(NoTrace())


def test_code_fingerprints_name_the_module_that_differs():
    a, b = TwoLayers(), TwoLayers()
    b.b = nn.Linear(8, 2, bias=False)  # other attribute values
    recorded = code_fingerprints(a)
    assert set(recorded) == {"", "a", "b"}
    check_same_code(copy.deepcopy(a), recorded)
    with pytest.raises(InputError, match=r"'b'.*Linear.*build the DependencyGraph"):
        check_same_code(b, recorded)
    with pytest.raises(InputError, match=r"TwoLayersSigmoid"):
        check_same_code(TwoLayersSigmoid(), recorded)


def test_code_fingerprint_of_graph_modules_follows_their_graph():
    model, x = gp.zoo.create("mlp")
    dg = gp.DependencyGraph.build(model, x)
    g = next(g for g in dg.groups if g.prunable)
    one, two = gp.apply(model, dg, {g.id: [0]}), gp.apply(model, dg, {g.id: [0, 1]})
    assert code_fingerprint(one) == code_fingerprint(gp.apply(model, dg, {g.id: [1]}))
    traced = torch.fx.symbolic_trace(TwoLayers())
    other = torch.fx.symbolic_trace(TwoLayersSigmoid())
    assert code_fingerprint(traced) != code_fingerprint(other)
    assert code_fingerprint(one) != code_fingerprint(two)  # widths are part of the modules' code
    assert code_fingerprint(one) != code_fingerprint(model)
