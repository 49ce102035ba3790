"""Regularisers over groups, as ``finetune`` plugins (``plugins=[GroupLasso(dg, 1e-3)]``).

Each plugin targets the channels of a dependency graph's prunable groups (or the ``groups`` given)
and acts on the parameter slices those channels own, by role: ``out`` (producer rows, conv/linear
biases), ``pass`` (norm scales/shifts, depthwise weights) and ``in`` (consumer columns).

- ``L1`` / ``L2``: elementwise penalty ``s * sum |w|`` / ``s * sum w**2`` over those slices.
- ``GroupLasso``: ``s * sum_c ||slices of channel c||_2`` (Wen et al. 2016): drives whole channels to 0.
- ``BNSparsity``: network slimming (Liu et al. 2017): the L1 subgradient ``s * sign(gamma)`` added to
  the gradients of the groups' norm-layer scales.
- ``AutoBalanced``: auto-balanced regularisation (Ding et al. 2018): in every group the weakest
  ``ratio`` of channels get a positive L2 penalty, the others a *negative* one whose strength is
  balanced so that both terms have the same magnitude (``beta_g = sum_weak ||w||^2 / sum_strong
  ||w||^2``); the group polarises, and pruning the weak channels afterwards costs little.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from graphprune.rules.base import NORM
from graphprune.train.masking import channel_rows

__all__ = ["GroupRegularizer", "L1", "L2", "GroupLasso", "BNSparsity", "AutoBalanced"]

ALL_ROLES = ("out", "pass", "in")


class GroupRegularizer:
    """Base: the groups targeted and the roles of the slices penalised."""

    def __init__(self, dg, strength: float, *, groups: Iterable[int] | None = None,
                 roles: Iterable[str] = ALL_ROLES) -> None:
        self.dg, self.strength, self.roles = dg, float(strength), tuple(roles)
        self.groups = [g.id for g in dg.groups if g.prunable] if groups is None else list(groups)

    def slices(self, model: nn.Module) -> list[torch.Tensor]:
        """The targeted parameter slices (differentiable views), one per group member."""
        params = dict(model.named_parameters())
        out = []
        for gid in self.groups:
            for m in self.dg.groups[gid].members:
                if m.role in self.roles and m.param in params:
                    w = params[m.param]
                    out.append(w.index_select(m.dim, torch.as_tensor(m.positions, device=w.device)))
        return out

    def group_rows(self, model: nn.Module, gid: int) -> torch.Tensor:
        """``[size, D]``: channel ``c``'s targeted slices in row ``c``."""
        return channel_rows(self.dg.groups[gid], dict(model.named_parameters()), self.roles)

    def value(self, model: nn.Module) -> float:
        """The unscaled regularised quantity (for monitoring)."""
        fn = getattr(self, "penalty", None)
        if fn is None or not self.strength:
            return 0.0
        with torch.no_grad():
            return float(fn(model)) / self.strength


class L1(GroupRegularizer):
    """``strength * sum |w|`` over the targeted slices."""

    def penalty(self, model: nn.Module) -> torch.Tensor:
        return self.strength * sum((s.abs().sum() for s in self.slices(model)), torch.zeros(()))


class L2(GroupRegularizer):
    """``strength * sum w**2`` over the targeted slices."""

    def penalty(self, model: nn.Module) -> torch.Tensor:
        return self.strength * sum((s.pow(2).sum() for s in self.slices(model)), torch.zeros(()))


class GroupLasso(GroupRegularizer):
    """``strength * sum over channels of the L2 norm of all the channel's slices``."""

    def penalty(self, model: nn.Module) -> torch.Tensor:
        total = torch.zeros(())
        for gid in self.groups:
            rows = self.group_rows(model, gid)
            if rows.numel():
                total = total + (rows.pow(2).sum(1) + 1e-12).sqrt().sum()
        return self.strength * total


class BNSparsity(GroupRegularizer):
    """Network slimming: L1 subgradient on the groups' norm scales, applied to the gradients."""

    def __init__(self, dg, strength: float = 1e-4, *, groups: Iterable[int] | None = None) -> None:
        super().__init__(dg, strength, groups=groups, roles=("pass",))
        self._names: list[tuple[str, torch.Tensor]] | None = None

    def _scales(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        params = dict(model.named_parameters())
        out = []
        for gid in self.groups:
            for m in self.dg.operand_members(self.dg.groups[gid], NORM, "weight"):
                if m.param in params:
                    out.append((params[m.param], torch.as_tensor(m.positions)))
        return out

    penalty = None  # the subgradient is added in ``after_backward``, not through the loss

    def value(self, model: nn.Module) -> float:
        with torch.no_grad():
            return float(sum((w[p].abs().sum() for w, p in self._scales(model)), torch.zeros(())))

    def after_backward(self, model: nn.Module) -> None:
        with torch.no_grad():
            for w, pos in self._scales(model):
                if w.grad is None:
                    w.grad = torch.zeros_like(w)
                w.grad[pos] += self.strength * torch.sign(w[pos])




class AutoBalanced(GroupRegularizer):
    """Positive L2 on each group's weakest ``ratio`` channels, balanced negative L2 on the rest.

    The weak set is chosen by the L2 norm of the targeted slices on the first call (``reselect=True``
    chooses it again after every epoch). ``weak[gid]`` lists the weak channels (prune those).
    """

    def __init__(self, dg, ratio: float, strength: float = 1e-3, *, groups: Iterable[int] | None = None,
                 roles: Iterable[str] = ("out", "pass"), reselect: bool = False) -> None:
        super().__init__(dg, strength, groups=groups, roles=roles)
        self.ratio, self.reselect = float(ratio), reselect
        self.weak: dict[int, np.ndarray] = {}

    def _choose(self, model: nn.Module) -> None:
        with torch.no_grad():
            for gid in self.groups:
                rows = self.group_rows(model, gid)
                n = int(np.floor(rows.shape[0] * self.ratio))
                n = min(n, rows.shape[0] - 1)
                order = torch.argsort(rows.pow(2).sum(1), stable=True).numpy()
                self.weak[gid] = np.sort(order[:n])

    def penalty(self, model: nn.Module) -> torch.Tensor:
        if not self.weak:
            self._choose(model)
        total = torch.zeros(())
        for gid in self.groups:
            rows = self.group_rows(model, gid)
            sq = rows.pow(2).sum(1)
            weak = torch.zeros(len(sq), dtype=torch.bool)
            weak[torch.as_tensor(self.weak[gid], dtype=torch.long)] = True
            if not weak.any() or weak.all():
                continue
            w_sum, s_sum = sq[weak].sum(), sq[~weak].sum()
            beta = (w_sum / s_sum.clamp_min(1e-12)).detach()
            total = total + w_sum - beta * s_sum
        return self.strength * total

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        if self.reselect:
            self._choose(model)
