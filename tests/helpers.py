"""Small helpers shared by the test modules (imported as ``helpers``, like ``strategies``).

The op-rule checks (``build``, ``group_of``, ``member``, ``exact`` ...) are used by
``tests/rules`` and ``tests/test_labels.py``: each rule test checks the group structure the
rules build (sizes, prunable flags, which parameter axes are members, ``Member.indices``)
and that a plan on the model is exact: ``gp.verify`` is tiny, and the slim model also
matches an *independent* reference, a copy of the model whose consumer columns of the
removed channels were zeroed by hand (so a wrong member list cannot hide behind
``verify``'s own masking).
"""

from __future__ import annotations

import copy

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp


def flat_outputs(out) -> list[torch.Tensor]:
    """Every tensor of a nested output (tensor, tuple/list, dict), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in flat_outputs(o)]


def snapshot(model: torch.nn.Module) -> dict:
    """A copy of the model's state_dict to compare against later."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state(model: torch.nn.Module, snap: dict, what: str = "") -> None:
    """The model's state is bitwise what ``snapshot`` recorded."""
    now = model.state_dict()
    assert now.keys() == snap.keys(), f"{what}state gained or lost entries"
    for k, v in snap.items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), f"{what}{k} changed"


# --- op-rule checks ---------------------------------------------------------------------


TOL = 1e-5  # of the op-rule checks (tests/test_exactness.py allows 1e-4 on whole zoo models)


def _inputs(x):
    return x if isinstance(x, tuple) else (x,)


def build(model, x):
    return gp.DependencyGraph.build(model.eval(), _inputs(x))


def keys(g):
    """(param, dim) pairs a group owns."""
    return {(m.param, m.dim) for m in g.members}


def member(g, param, dim):
    found = [m for m in g.members if m.param == param and m.dim == dim]
    assert len(found) == 1, f"{param}[{dim}] not a member of group {g.id}: {sorted(keys(g))}"
    return found[0]


def group_of(dg, param, dim=0):
    """The one group that owns axis ``dim`` of ``param``."""
    found = [g for g in dg.groups if (param, dim) in keys(g)]
    assert len(found) == 1, f"{param}[{dim}] is in {len(found)} groups"
    return found[0]


def exact(model, x, plan, *, dg=None, zero=None, tol=TOL):
    """Apply ``plan``; check verify, output shapes, an independent reference, no mutation.

    ``zero`` maps a parameter name to ``(dim, indices)``: the hand-derived consumer
    slices that read the removed channels. Zeroing them in a copy of the model must
    make it compute what the slim model computes.
    """
    x = _inputs(x)
    model.eval()
    dg = dg or build(model, x)
    snap = snapshot(model)
    with torch.no_grad():
        before = flat_outputs(model(*x))
    slim = gp.apply(model, dg, plan)
    assert isinstance(slim, torch.fx.GraphModule)
    assert gp.verify(model, x, plan, dg=dg, slim=slim) <= tol
    slim.eval()
    with torch.no_grad():
        got = flat_outputs(slim(*x))
    assert [t.shape for t in got] == [t.shape for t in before]
    if zero is not None:
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for name, (dim, idx) in zero.items():
                ref.get_parameter(name).index_fill_(dim, torch.tensor(idx, dtype=torch.long), 0.0)
            want = flat_outputs(ref(*x))
        for a, b in zip(want, got, strict=True):
            assert (a - b).abs().max().item() <= tol
        # and the removed channels did matter: the unmasked model differs
        assert max((a - b).abs().max().item() for a, b in zip(before, got)) > 1e-3
    assert_state(model, snap)
    with torch.no_grad():
        again = flat_outputs(model(*x))
    assert all(torch.equal(a, b) for a, b in zip(before, again))
    return slim


def conv_attrs_agree(conv):
    w = conv.weight
    if conv.transposed:
        assert w.shape[0] == conv.in_channels and w.shape[1] * conv.groups == conv.out_channels
    else:
        assert w.shape[0] == conv.out_channels and w.shape[1] * conv.groups == conv.in_channels
    if conv.bias is not None:
        assert conv.bias.shape[0] == conv.out_channels


def x2d(c=3, hw=8):
    """A batch of two ``c``-channel ``hw`` x ``hw`` images."""
    return torch.randn(2, c, hw, hw)


# --- a model with groups of several kinds (graph inspection, tracing) -------------------


class Block(nn.Module):
    """Residual block, a concat and a pinned branch: groups of several kinds."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        y = y + self.a(y)
        z = torch.cat([self.b(y), torch.cumsum(self.c(y), 1)], dim=1)
        return self.head(z.mean((2, 3)))


# --- small models for LEAN ---------------------------------------------------------------


def mlp(widths, seed=0):
    """A seeded bias-free ReLU MLP of the given widths, in eval mode."""
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b, bias=False), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def small_resnet():
    """The zoo ResNet-20 at width 4, and its inputs."""
    model, x = gp.zoo.create("resnet20", width=4)
    return model, x


def small_cnn():
    """Conv, BatchNorm, depthwise, strided conv, flatten, two Linears: seeded, eval mode, and inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    return model, torch.randn(2, 2, 8, 8)


class InputInPlace(nn.Module):
    """A forward that changes its input in place before using it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.b = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        if self.how == "mul_":
            x.mul_(2.0)
        else:
            self.act(x)  # nn.ReLU(inplace=True) on the input
        return self.b(self.a(x).relu())
