"""apply's fast module copy (``rewrite._copy_module``) behaves as ``copy.deepcopy``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations

from graphprune.copying import copy_module


class WithState(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("scale", torch.rand(4), persistent=False)
        self.names = ["a", "b"]                # mutable attributes must not be shared
        self.table = {"k": torch.ones(2)}

    def forward(self, x):
        return self.fc(x) * self.scale + self.table["k"].sum()


def _shared():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.BatchNorm1d(4))
    model[3].running_mean.uniform_(-1, 1)
    return model


def _tied():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    return model


def _hooked():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    model[0].register_forward_hook(lambda mod, args, out: out * 2)
    return model



CASES = {
    "state": WithState,
    "shared": _shared,
    "tied": _tied,
    "hooked": _hooked,
    "weight_norm": lambda: parametrizations.weight_norm(nn.Linear(4, 4)),
    "lstm": lambda: nn.LSTM(4, 3, batch_first=True),
    "frozen": lambda: nn.Sequential(nn.Linear(4, 4).requires_grad_(False), nn.Dropout(0.5)).eval(),
}


def _outputs(model, x):
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_copy_matches_deepcopy(name):
    torch.manual_seed(0)
    model = CASES[name]()
    x = torch.randn(3, 2, 4) if name == "lstm" else torch.randn(3, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast, ref = copy_module(model, {}), copy.deepcopy(model)
    assert type(fast) is type(ref)
    assert list(fast.state_dict()) == list(ref.state_dict())
    for (k, a), b, orig in zip(fast.state_dict().items(), ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b), k
        assert a.data_ptr() != orig.data_ptr(), f"{k} shares memory with the original"
    assert [p.requires_grad for p in fast.parameters()] == [p.requires_grad for p in model.parameters()]
    assert [m.training for m in fast.modules()] == [m.training for m in model.modules()]
    with torch.no_grad():
        assert torch.equal(_outputs(fast, x), _outputs(ref, x))
    if name == "shared":
        assert fast[0] is fast[2] and fast[0] is not model[0]
    if name == "tied":
        assert fast[0].weight is fast[1].weight and fast[0].weight is not model[0].weight
    if name == "state":
        assert fast.names == model.names and fast.names is not model.names
        assert fast.table["k"] is not model.table["k"] and "scale" not in fast.state_dict()
    if name == "hooked":
        assert len(fast[0]._forward_hooks) == 1
    # the original is untouched by the copies' forward passes and by writes to the copy
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(1.0)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
