"""Channel masks during training, and per-channel views of a group's member slices.

A masked channel must behave exactly as a removed one. ``ChannelMasker`` multiplies the
*input columns* that read each channel (the ``in``-role member slices: conv/linear weight
dim 1, flatten expansions included) by the channel's mask, through
``torch.nn.utils.parametrize``. For channel-separable models that computes exactly what
``gp.apply`` with the same plan computes (``gp.verify.masked_model`` zeroes every slice a
removed channel owns, producer rows included, and is the reference for the others);
the producer rows and norm parameters are left intact, so a channel that is unmasked again
(SPP's Bernoulli draws) resumes where it was. Gradients of masked columns are zero, so they
do not drift while masked. ``remove()`` takes the parametrizations off again (the stored
weights are the unmasked ones), after which ``plan()`` + ``gp.apply`` slim the model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

from graphprune.plan import Plan
from graphprune.rewrite import apply

__all__ = ["ChannelMasker", "channel_rows", "member_params", "position_keys"]


def _plain(name: str) -> str:
    return re.sub(r"(^|\.)parametrizations\.([^.]+)\.original$", r"\1\2", name)


def member_params(model: nn.Module, buffers: bool = True) -> dict[str, torch.Tensor]:
    """Parameters (and buffers) of ``model`` by their plain qualified names: a parametrized weight
    is listed as ``conv.weight`` (its stored, unmasked tensor), not ``conv.parametrizations...``."""
    state: dict[str, torch.Tensor] = {_plain(n): p for n, p in model.named_parameters()}
    if buffers:
        state.update({_plain(n): b for n, b in model.named_buffers()})
    return state


def position_keys(member, cluster_of: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of ``member`` and a key per position: ``cluster_of[channel] * k + j`` where ``j`` is
    the position's rank among its channel's positions (channels spanning several positions, e.g.
    flatten expansions or grouped-conv groups, are matched position by position)."""
    pos = np.asarray(member.positions, dtype=np.int64)
    ch = np.asarray(member.channels, dtype=np.int64)
    rank = np.zeros(len(ch), dtype=np.int64)
    seen: dict[int, int] = {}
    for i in np.argsort(pos, kind="stable"):
        c = int(ch[i])
        rank[i] = seen.get(c, 0)
        seen[c] = rank[i] + 1
    k = int(rank.max()) + 1 if len(rank) else 1
    return torch.as_tensor(pos), torch.as_tensor(cluster_of[ch] * k + rank)


def channel_rows(group, state: dict[str, torch.Tensor], roles: Iterable[str] = ("out",),
                 params_only: bool = True) -> torch.Tensor:
    """Per-channel feature matrix ``[size, D]``: every member slice of ``roles``, flattened and joined.

    Differentiable in the parameters (used by regularisers and criteria).
    """
    parts = []
    roles = tuple(roles)
    for m in group.members:
        t = state.get(m.param)
        if m.role not in roles or t is None or (params_only and not isinstance(t, nn.Parameter)):
            continue
        pos = torch.as_tensor(m.positions, device=t.device)
        sl = t.movedim(m.dim, 0).index_select(0, pos).reshape(len(m.positions), -1)
        # Channels with several positions: place each position's slice in its own column block.
        ch = np.asarray(m.channels)
        counts = np.bincount(ch, minlength=group.size)
        width = int(counts.max()) if counts.size else 1
        if width == 1 and len(ch) == group.size and (np.sort(ch) == np.arange(group.size)).all():
            order = torch.as_tensor(np.argsort(ch), device=t.device)
            parts.append(sl.index_select(0, order))
            continue
        out = sl.new_zeros(group.size, width * sl.shape[1])
        pk = position_keys(m, np.arange(group.size))[1].numpy() % width
        for i, (c, j) in enumerate(zip(ch, pk)):
            out[c, j * sl.shape[1]:(j + 1) * sl.shape[1]] = sl[i]
        parts.append(out)
    if not parts:
        return torch.zeros(group.size, 0)
    return torch.cat(parts, dim=1)


class _ColumnMask(nn.Module):
    """Parametrization: ``W * multiplier`` along ``dim``, the multiplier read from the group masks."""

    def __init__(self, masker: ChannelMasker, entries: list[tuple[int, torch.Tensor, torch.Tensor]],
                 dim: int) -> None:
        super().__init__()
        self.masker, self.entries, self.dim = [masker], entries, dim  # list: not a submodule

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        masks = self.masker[0].masks
        mult = torch.ones(w.shape[self.dim], dtype=w.dtype, device=w.device)
        for gid, pos, ch in self.entries:
            mult[pos.to(w.device)] = masks[gid].to(w)[ch.to(w.device)]
        shape = [1] * w.dim()
        shape[self.dim] = -1
        return w * mult.view(shape)


class ChannelMasker:
    """Mask channels of a model's groups during training by zeroing the columns that read them.

    ``masks[gid]`` is a float tensor of the group's size (1 keep, 0 masked; the current draw);
    ``pruned[gid]`` the set of channels masked for good (always 0 in ``masks`` after ``refresh``).

    >>> import torch, graphprune as gp
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> dg = gp.DependencyGraph.build(model, torch.randn(1, 3))
    >>> masker = ChannelMasker(model, dg)
    >>> masker.prune(0, [1, 2])
    >>> x = torch.randn(5, 3)
    >>> torch.allclose(model(x), masker.slim()(x))
    True
    >>> masker.remove()
    """

    def __init__(self, model: nn.Module, dg, groups: Iterable[int] | None = None) -> None:
        self.model, self.dg = model, dg
        ids = [g.id for g in dg.groups if g.prunable] if groups is None else list(groups)
        self.groups = ids
        self.masks: dict[int, torch.Tensor] = {gid: torch.ones(dg.groups[gid].size) for gid in ids}
        self.pruned: dict[int, set[int]] = {gid: set() for gid in ids}
        params = member_params(model, buffers=False)
        per_param: dict[tuple[str, int], list] = {}
        self.unmaskable: list[int] = []
        for gid in ids:
            for m in dg.groups[gid].members:
                if m.role != "in":
                    continue
                if m.param not in params:
                    self.unmaskable.append(gid)
                    continue
                per_param.setdefault((m.param, m.dim), []).append(
                    (gid, torch.as_tensor(m.positions), torch.as_tensor(m.channels)))
        self._specs: list[tuple[nn.Module, str, int, list]] = []
        for (name, dim), entries in per_param.items():
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            self._specs.append((module, attr, dim, entries))
        self.active = False
        self.attach()

    def attach(self) -> None:
        """Register the parametrizations (done on construction)."""
        if not self.active:
            for module, attr, dim, entries in self._specs:
                parametrize.register_parametrization(module, attr, _ColumnMask(self, entries, dim),
                                                     unsafe=True)
            self.active = True

    def remove(self) -> None:
        """Take the parametrizations off; the model keeps its unmasked stored weights."""
        if self.active:
            for module, attr, _, _ in self._specs:
                if parametrize.is_parametrized(module, attr):
                    parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
            self.active = False

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """The plain model (no parametrizations) inside the block, e.g. to copy or rewrite it."""
        was = self.active
        self.remove()
        try:
            yield
        finally:
            if was:
                self.attach()

    def slim(self) -> torch.fx.GraphModule:
        """``gp.apply`` of ``plan()`` to the model (the model itself stays masked)."""

        with self.suspended():
            return apply(self.model, self.dg, self.plan())

    def set(self, gid: int, mask: torch.Tensor | np.ndarray) -> None:
        """Set group ``gid``'s current mask (permanently pruned channels stay 0)."""
        m = torch.as_tensor(np.asarray(mask, dtype=np.float32)).float().clone()
        if self.pruned[gid]:
            m[list(self.pruned[gid])] = 0.0
        self.masks[gid] = m

    def prune(self, gid: int, channels: Iterable[int]) -> None:
        """Mask ``channels`` of group ``gid`` for good."""
        self.pruned[gid] |= {int(c) for c in channels}
        self.set(gid, self.masks[gid])

    def refresh(self) -> None:
        """Reset every current mask to 'all kept except the pruned channels'."""
        for gid in self.groups:
            self.set(gid, torch.ones(self.dg.groups[gid].size))

    @contextmanager
    def override(self, masks: dict[int, torch.Tensor]) -> Iterator[None]:
        """Temporarily use other masks for some groups (pruned channels stay masked)."""
        saved = {gid: self.masks[gid] for gid in masks}
        try:
            for gid, m in masks.items():
                self.set(gid, m)
            yield
        finally:
            self.masks.update(saved)

    def plan(self) -> Plan:
        """Plan removing the permanently pruned channels (on ``dg``)."""
        return Plan({gid: sorted(ch) for gid, ch in self.pruned.items() if ch})


def train_then_slim(model: nn.Module, data, plugin, *, epochs: int, finetune_epochs: int, train: dict):
    """Train with a masking ``plugin`` (it has ``masker``, ``stop``, ``finish()`` and maybe
    ``close()``), slim the masked model, optionally fine-tune the slim one.

    Returns ``(slim, plan, reached, history)``; the masks and hooks are removed from
    ``model`` whatever happens.
    """
    from graphprune.train.finetune import finetune

    try:
        res = finetune(model, data, epochs=epochs, plugins=[plugin], **train)
        reached = plugin.stop
        plan = plugin.finish()
        slim = plugin.masker.slim()
    finally:
        plugin.masker.remove()
        if hasattr(plugin, "close"):
            plugin.close()
    history = res.history
    if finetune_epochs:
        history = history + finetune(slim, data, epochs=finetune_epochs, **train).history
    return slim, plan, reached, history
