"""The three ways to start training a pruned network (Liu et al. 2019; Renda et al. 2020):

- ``"continue"``  fine-tune: the slim model keeps the trained weights of the surviving channels;
- ``"rewind"``    weight rewinding: the surviving channels take their values from an earlier
  checkpoint of the *original* model (``checkpoint``, a state dict saved during training);
- ``"reinit"``    re-initialise: same architecture, fresh weights (every submodule's
  ``reset_parameters``, seeded), i.e. training the small architecture from scratch.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx
from torch import nn

from graphprune.errors import InputError
from graphprune.graph import DependencyGraph
from graphprune.plan import Plan
from graphprune.rewrite import apply

__all__ = ["MODES", "restart", "snapshot", "Snapshot", "reinitialize"]

MODES = ("continue", "rewind", "reinit")


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s state dict (a rewind checkpoint)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Snapshot:
    """Fine-tuning plugin that saves ``snapshot(model)`` at the end of epoch ``epoch`` (0-based)."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch
        self.state: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        if epoch == self.epoch:
            self.state = snapshot(model)


def reinitialize(model: nn.Module, seed: int | None = 0) -> nn.Module:
    """Reset every submodule that has ``reset_parameters`` (in place; seeded); returns ``model``."""
    gen_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        for m in model.modules():
            if m is not model and hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
    finally:
        if seed is not None:
            torch.random.set_rng_state(gen_state)
    return model


def restart(
    model: nn.Module,
    dg: DependencyGraph,
    plan: Plan | dict,
    mode: str = "continue",
    *,
    checkpoint: dict[str, Any] | None = None,
    seed: int | None = 0,
) -> torch.fx.GraphModule:
    """The slim model of ``plan`` on ``model`` (graph ``dg``), initialised per ``mode``.

    ``model`` is not modified. ``"rewind"`` needs ``checkpoint``: a state dict of ``model`` from
    earlier in training (``snapshot`` / ``Snapshot``).
    """
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    plan = plan if isinstance(plan, Plan) else Plan(plan)
    if mode == "rewind":
        if checkpoint is None:
            raise InputError("mode='rewind' needs checkpoint=<state dict of the model from earlier>")
        source = copy.deepcopy(model)
        source.load_state_dict(checkpoint)
        return apply(source, dg, plan)
    slim = apply(model, dg, plan)
    if mode == "reinit":
        reinitialize(slim, seed)
    return slim
