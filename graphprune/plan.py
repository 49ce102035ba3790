"""Plans: which channels of which group to remove; and selection of a plan from scores.

A ``Plan`` is a read-only mapping ``group id -> sorted removed channel indices`` that
round-trips through JSON. ``Plan.validate(dg)`` checks it against a dependency graph.

>>> plan = Plan({0: [3, 1]})
>>> plan[0], Plan.from_json(plan.to_json()) == plan
((1, 3), True)
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from graphprune.errors import InputError, PlanError

__all__ = ["Plan", "select"]


class Plan(Mapping):
    """Read-only mapping: group id -> removed channel indices (sorted, unique)."""

    def __init__(self, removed: Mapping[int, Any] | None = None) -> None:
        data: dict[int, tuple[int, ...]] = {}
        for gid, channels in (removed or {}).items():
            try:
                key = int(gid)
                chans = sorted({int(c) for c in channels})
            except (TypeError, ValueError) as exc:
                raise PlanError(f"plan entry {gid!r}: {channels!r} is not group id -> list of ints") from exc
            if any(c < 0 for c in chans):
                raise PlanError(f"plan removes negative channel index in group {key}: {chans}")
            if chans:
                data[key] = tuple(chans)
        self._data = dict(sorted(data.items()))

    def __getitem__(self, gid: int) -> tuple[int, ...]:
        return self._data[gid]

    def __iter__(self) -> Iterator[int]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == {k: tuple(v) for k, v in other.items()}

    def __hash__(self) -> int:
        return hash(tuple(self._data.items()))

    def __repr__(self) -> str:
        return f"Plan({{{', '.join(f'{k}: {len(v)} ch' for k, v in self._data.items())}}})"

    @property
    def n_removed(self) -> int:
        return sum(len(v) for v in self._data.values())

    def to_json(self) -> str:
        return json.dumps({str(k): list(v) for k, v in self._data.items()})

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan JSON is malformed: {exc}") from exc
        if not isinstance(raw, dict):
            raise PlanError("plan JSON must be an object {group id: [channels]}")
        return cls(raw)

    def validate(self, dg: Any) -> None:
        """Raise ``PlanError`` unless every entry fits ``dg``'s groups."""
        n = len(dg.groups)
        for gid, chans in self._data.items():
            if not 0 <= gid < n:
                raise PlanError(f"plan names group {gid}, but the graph has groups 0..{n - 1}")
            g = dg.groups[gid]
            if not g.prunable:
                raise PlanError(f"group {gid} is not prunable ({g.reason}); leave it out of the plan")
            if chans[-1] >= g.size:
                raise PlanError(f"group {gid} has {g.size} channels; plan removes index {chans[-1]}")
            if len(chans) == g.size and not g.removable:
                raise PlanError(
                    f"plan removes all {g.size} channels of group {gid} (producers: "
                    f"{', '.join(g.producers)}); its output feeds layers that need at least one "
                    "channel, so keep one or more")


def _n_remove(size: int, ratio: float, min_keep: int) -> int:
    return max(0, min(int(np.floor(size * ratio + 1e-9)), size - min_keep))


def select(
    dg: Any,
    scores: Mapping[int, np.ndarray],
    ratio: float,
    *,
    ignore: set[int] | frozenset[int] = frozenset(),
    min_keep: int = 1,
) -> Plan:
    """Remove the lowest-scored ``ratio`` of channels in every prunable group (local scope).

    Groups of one channel that may vanish entirely (a width-1 layer whose output only
    reaches concatenations) are ranked among themselves and removed whole, lowest
    score first, to the same ratio.
    """
    if not 0 <= ratio < 1:
        raise InputError(f"ratio must be in [0, 1), got {ratio}")
    removed: dict[int, list[int]] = {}
    whole: list[tuple[float, int]] = []
    for g in dg.groups:
        if not g.prunable or g.id in ignore:
            continue
        s = np.asarray(scores[g.id], dtype=np.float64)
        if s.shape != (g.size,):
            raise PlanError(f"scores for group {g.id} have shape {s.shape}, expected ({g.size},)")
        if not np.isfinite(s).all():
            raise PlanError(f"scores for group {g.id} contain NaN or inf; check the criterion's inputs")
        if g.removable and g.size == 1:
            whole.append((float(s[0]), g.id))
            continue
        k = _n_remove(g.size, ratio, min_keep)
        if k:
            removed[g.id] = np.argsort(s, kind="stable")[:k].tolist()
    for _, gid in sorted(whole)[: int(np.floor(len(whole) * ratio + 1e-9))]:
        removed[gid] = [0]
    return Plan(removed)
