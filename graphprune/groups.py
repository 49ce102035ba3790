"""The plain data a ``DependencyGraph`` holds: a ``Group`` of channels pruned together and
each ``Member``, the slice of one parameter or buffer those channels own.

>>> import numpy as np
>>> m = Member("conv.weight", 0, "out", np.array([0, 1, 2, 3]), np.array([0, 0, 1, 1]))
>>> m.indices([1])
[2, 3]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Group", "Member"]


@dataclass(frozen=True, eq=False)
class Member:
    """A slice of one parameter or buffer that a group's channels own.

    ``param`` is the qualified name in the original model, ``dim`` the sliced axis,
    ``role`` one of ``out`` (a producer's output rows), ``in`` (a consumer's input
    columns) or ``pass`` (per-channel state such as BatchNorm's). ``positions`` (along
    ``dim``, ascending) and ``channels`` (the group channel at each position) are
    integer arrays of equal length (int32, or int64 in a graph too large for it); treat
    them as read-only.
    """

    param: str
    dim: int
    role: str
    positions: np.ndarray
    channels: np.ndarray

    def indices(self, channels: Iterable[int]) -> list[int]:
        """Positions along ``dim`` that the given group channels occupy, ascending."""
        wanted = np.fromiter((int(c) for c in channels), dtype=np.int64)
        return self.positions[np.isin(self.channels, wanted)].tolist()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Member):
            return NotImplemented
        return (self.param, self.dim, self.role) == (other.param, other.dim, other.role) and \
            np.array_equal(self.positions, other.positions) and np.array_equal(self.channels, other.channels)

    def __hash__(self) -> int:
        return hash((self.param, self.dim, self.role, self.positions.tobytes(), self.channels.tobytes()))

    def to_dict(self) -> dict[str, Any]:
        return {"param": self.param, "dim": self.dim, "role": self.role,
                "positions": len(self.positions)}


@dataclass(frozen=True)
class Group:
    """Channels that must be pruned together, and every tensor slice they own."""

    id: int
    size: int
    prunable: bool
    reason: str
    members: list[Member] = field(default_factory=list)
    producers: tuple[str, ...] = ()
    removable: bool = False
    exact: bool = True
    inexact_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "size": self.size, "prunable": self.prunable,
                "reason": self.reason, "removable": self.removable, "exact": self.exact,
                "inexact_reason": self.inexact_reason,
                "producers": list(self.producers),
                "members": [m.to_dict() for m in self.members]}
