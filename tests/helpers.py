"""Small helpers shared by the test modules (imported as ``helpers``, like ``strategies``)."""

from __future__ import annotations

import torch


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
