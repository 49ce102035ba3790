"""Plans: which channels of which group to remove.

A ``Plan`` is a read-only mapping ``group id -> sorted removed channel indices`` that
round-trips through JSON. ``Plan.validate(dg)`` checks it against a dependency graph.
Plans are made by ``graphprune.select`` (from scores) or by hand.

>>> plan = Plan({0: [3, 1]})
>>> plan[0], Plan.from_json(plan.to_json()) == plan
((1, 3), True)
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from graphprune.errors import PlanError

__all__ = ["Plan"]

# Names that lived here before selection, counting and the pruning loop got modules of
# their own; still importable from here.
_MOVED = {"select": "graphprune.select", "resolve_ignore": "graphprune.select",
          "CountEstimator": "graphprune.metrics", "StepPlans": "graphprune.steps",
          "check_schedule": "graphprune.steps"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _as_index(value: Any, *, text: bool = False) -> int:
    """An int from an int or numpy integer; no floats, bools or strings.

    With ``text`` (group ids: JSON object keys are strings) a string is accepted when it
    is an integer written canonically, as ``str(int)`` writes it: ``"12"``, ``"-1"``; not
    ``"012"``, ``"+1"``, ``" 1"``, ``"1_0"`` or non-ASCII digits, which could name the same
    group as another key.
    """
    if isinstance(value, bool):
        raise TypeError("bool is not an index")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if text and isinstance(value, str) and re.fullmatch(r"-?(0|[1-9][0-9]*)", value) and value != "-0":
        return int(value)
    raise TypeError(f"{value!r} is not an integer index")


def _channel_list(gid: Any, channels: Any) -> list[int]:
    """The channel indices of one plan entry: an iterable of ints (list, tuple, range, set,
    numpy array), never a string (whose characters would read as digits) or a mapping."""
    if isinstance(channels, (str, bytes, bytearray, Mapping)) or not isinstance(channels, Iterable):
        raise PlanError(f"plan entry for group {gid}: {channels!r} is not a list of channel indices; "
                        "write group id -> list of ints, e.g. {0: [1, 5]}")
    if isinstance(channels, np.ndarray) and channels.ndim == 1 and channels.dtype.kind in "iu":  # from select
        return np.unique(channels).tolist()
    if type(channels) is list and all(type(c) is int for c in channels):  # noqa: E721 - exact ints, no bools
        return sorted(set(channels))
    try:
        return sorted({_as_index(c) for c in channels})
    except TypeError as exc:
        raise PlanError(f"plan entry for group {gid}: {channels!r} is not a list of ints ({exc})") from exc


class Plan(Mapping):
    """Read-only mapping: group id -> removed channel indices (sorted, unique)."""

    def __init__(self, removed: Mapping[int, Any] | None = None) -> None:
        if removed is not None and not isinstance(removed, Mapping):
            hint = " (for JSON text use gp.Plan.from_json)" if isinstance(removed, str) else ""
            raise PlanError(f"a plan is a mapping group id -> channel indices, got "
                            f"{type(removed).__name__}{hint}")
        data: dict[int, tuple[int, ...]] = {}
        seen: dict[int, Any] = {}
        for gid, channels in (removed or {}).items():
            try:
                key = _as_index(gid, text=True)
            except TypeError as exc:
                raise PlanError(f"plan key {gid!r} is not a group id: write it as an int "
                                "(or, in JSON, its canonical decimal string such as \"3\")") from exc
            if key in seen:
                raise PlanError(f"plan names group {key} more than once (as {seen[key]!r} and {gid!r}); "
                                "give each group one entry")
            seen[key] = gid
            chans = _channel_list(key, channels)
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
        """The plan that ``to_json`` wrote. Keys are canonical decimal group ids, each once;
        values are lists of ints; anything else raises ``PlanError``."""
        def pairs(items: list[tuple[str, Any]]) -> _Pairs:
            return _Pairs(items)

        try:
            raw = json.loads(text, object_pairs_hook=pairs)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan JSON is malformed: {exc}") from exc
        except TypeError as exc:  # not str/bytes
            raise PlanError(f"plan JSON must be text, got {type(text).__name__}") from exc
        if not isinstance(raw, _Pairs):
            raise PlanError("plan JSON must be an object {group id: [channels]}")
        seen: set[str] = set()
        for key, value in raw.items:
            if key in seen:
                raise PlanError(f"plan JSON names group {key} more than once; give each group one entry")
            seen.add(key)
            if isinstance(value, _Pairs):  # an object where a list of ints belongs
                raise PlanError(f"plan entry for group {key}: an object is not a list of channel indices")
        return cls(dict(raw.items))

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


class _Pairs:
    """A JSON object as its list of (key, value) pairs, repeated keys included."""

    def __init__(self, items: list[tuple[str, Any]]) -> None:
        self.items = items
