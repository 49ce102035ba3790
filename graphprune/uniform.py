"""Uniform widths across repeated blocks: groups that are the same layer of different blocks.

Configs and kernels expect every block of a stack to keep one width (Hugging Face
``intermediate_size``, ``num_key_value_heads``; fused kernels with one shape per stack).
``families(dg, group_ids)`` says which groups are "the same layer": groups whose producers
(the parameters whose output rows are their channels, or producing nodes) have the same
names once every layer index is replaced by ``*`` (``model.layers.3.mlp.up_proj.weight``
-> ``model.layers.*.mlp.up_proj.weight``; a path component made of digits only is an
index) and whose sizes are equal. ``Pooled`` lets selection treat each family as one
group: rank ``j`` of the family is the ``j``-th lowest-scored channel of every member,
scored by the mean of those scores, so a family loses the same count from every member,
decided by the same ratio, target and scope rules as a single group; each member then
loses its own lowest-scored channels.

>>> import torch, numpy as np, graphprune as gp
>>> blocks = [torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4)) for _ in range(2)]
>>> model = torch.nn.Sequential(*blocks)
>>> dg = gp.DependencyGraph.build(model, torch.randn(2, 4))
>>> [(g.id, g.size, producers(g), pattern(producers(g)[0])) for g in dg.groups if g.prunable]
[(0, 6, ['0.0.weight'], '*.*.weight'), (1, 4, ['0.2.weight'], '*.*.weight'), (2, 6, ['1.0.weight'], '*.*.weight')]
>>> families(dg, [g.id for g in dg.groups if g.prunable])
[(0, 2)]
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from graphprune.errors import warn_user

__all__ = ["families", "pattern", "producers", "Pooled"]

_INDEX = re.compile(r"(?<![^.])\d+(?![^.])")  # a dotted path component of digits only


def pattern(name: str) -> str:
    """``name`` with every layer index replaced by ``*`` (``layers.3.mlp`` -> ``layers.*.mlp``)."""
    return _INDEX.sub("*", name)


def producers(group: Any) -> list[str]:
    """The parameters whose output rows are ``group``'s channels, then its producing nodes."""
    return list(dict.fromkeys([*(m.param for m in group.members if m.role == "out"), *group.producers]))


def families(dg: Any, group_ids: Iterable[int]) -> list[tuple[int, ...]]:
    """Families of two or more of ``group_ids``: same size, same producer names up to layer
    indices. Groups with no producer belong to none."""
    found: dict[tuple[int, frozenset[str]], list[int]] = {}
    for gid in group_ids:
        g = dg.groups[gid]
        names = producers(g)
        if names:
            found.setdefault((g.size, frozenset(pattern(p) for p in names)), []).append(int(gid))
    return sorted(tuple(sorted(ids)) for ids in found.values() if len(ids) > 1)


class Pooled:
    """Scores with every family merged into one group, under its first member's id.

    ``scores`` are the families' pooled scores (rank ``j``: the mean of the members'
    ``j``-th lowest scores; non-decreasing, so rank ``j`` is that group's channel ``j``)
    next to the other groups' own; ``members[id]`` counts the groups a merged id stands
    for; ``caps`` are ceilings for the merged ids (the strictest of the members');
    ``plan(removed)`` turns removed ranks back into each member's own channels.
    """

    def __init__(self, scores: Mapping[int, np.ndarray], groups: Iterable[tuple[int, ...]]) -> None:
        self.orders: dict[int, list[tuple[int, np.ndarray]]] = {}
        merged = {gid for fam in groups for gid in fam}
        self.scores: dict[int, np.ndarray] = {gid: s for gid, s in scores.items() if gid not in merged}
        self.members: dict[int, int] = {}
        for fam in groups:
            orders = [(gid, np.argsort(scores[gid], kind="stable")) for gid in fam]
            self.scores[fam[0]] = np.mean([scores[gid][order] for gid, order in orders], axis=0)
            self.orders[fam[0]] = orders
            self.members[fam[0]] = len(fam)

    def caps(self, caps: Mapping[int, float]) -> dict[int, float]:
        """Ceilings per merged id: a family may lose no more than its strictest member."""
        out = {gid: c for gid, c in caps.items() if gid in self.scores and gid not in self.orders}
        for rep, orders in self.orders.items():
            given = [caps[gid] for gid, _ in orders if gid in caps]
            if given:
                out[rep] = min(given)
        return out

    def check(self, plan: Any) -> Any:
        """``plan``, with a warning naming any family whose members lose different counts
        (``repair`` gave back channels of a member to keep an axis from emptying)."""
        for orders in self.orders.values():
            counts = [len(plan.get(gid, ())) for gid, _ in orders]
            if len(set(counts)) > 1:
                warn_user(f"uniform: groups {[gid for gid, _ in orders]} (one layer of repeated blocks) lose "
                          f"{counts} channels: the plan was repaired where it would empty a tensor axis")
        return plan

    def plan(self, removed: Mapping[int, Iterable[int]]) -> dict[int, list[int]]:
        """Removed channels per real group, from removed ranks of merged ids."""
        out: dict[int, list[int]] = {}
        for gid, chans in removed.items():
            if gid not in self.orders:
                out[gid] = list(chans)
                continue
            ranks = np.asarray(list(chans), dtype=np.int64)
            for member, order in self.orders[gid]:
                out[member] = sorted(order[ranks].tolist())
        return out
