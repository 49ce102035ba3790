"""graphprune.rewrite: apply refuses a model the graph was not built from; it never mutates the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.errors import InputError


class Gate(nn.Module):
    def __init__(self, act: str = "relu"):
        super().__init__()
        self.act = act
        self.a = nn.Conv2d(3, 8, 1)
        self.h = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.h(torch.relu(y) if self.act == "relu" else torch.sigmoid(y))


class OtherForward(Gate):
    def forward(self, x):  # same parameters, another computation
        return self.h(torch.sigmoid(self.a(x)) * 2)


def test_apply_refuses_a_model_with_other_code():
    # regression: same parameter shapes, different forward: apply mixed the two silently
    model, x = Gate().eval(), torch.randn(2, 3, 4, 4)
    dg = gp.DependencyGraph.build(model, x)
    other = OtherForward().eval()
    other.load_state_dict(model.state_dict())
    with pytest.raises(InputError, match="code"):
        gp.apply(other, dg, {0: [1]})
    configured = Gate(act="sigmoid").eval()  # one class, a setting that picks another path
    configured.load_state_dict(model.state_dict())
    with pytest.raises(InputError):
        gp.apply(configured, dg, {0: [1]})


def test_apply_accepts_a_fine_tuned_copy():
    model, x = Gate().eval(), torch.randn(2, 3, 4, 4)
    dg = gp.DependencyGraph.build(model, x)
    tuned = Gate().eval()
    with torch.no_grad():
        for p in tuned.parameters():
            p.normal_()
    slim = gp.apply(tuned, dg, {0: [1, 2]})
    assert slim.get_submodule("a").out_channels == 6
