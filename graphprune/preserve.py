"""Leave a user's model exactly as it was while graphprune runs its forward.

Tracing calls ``forward`` with proxies (torch.fx) or fake tensors (torch.export), and
records shapes with one real run; a forward that stores an activation on ``self``
(``self.last = y``, ``self.cache.append(y)``, ``self.calls += 1``) would leave a proxy, a
fake tensor or a real activation behind. ``untouched(model)`` snapshots, for every
submodule, its attribute table and, shallowly, every list, dict and set reachable from it
through containers (the parameter, buffer, submodule and hook tables among them), and
puts back whatever changed: new attributes go, rebound ones return, container contents
are restored in place (so references the user holds stay valid). Tensor *values* are
the caller's business (``tracing.propagate_shapes`` restores buffers).

``structural_copy(model)`` is for tools that rebind a model's tensors while they run
(non-strict ``torch.export`` swaps parameters for fake tensors in the module tables): new
module objects with their own tables and containers, holding the same tensors, so
nothing another thread reads from the user's model changes, not even for a moment.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["untouched", "structural_copy"]

_MAX_DEPTH = 6
_MAX_CONTAINERS = 200_000


class _Snapshot:
    """Attribute tables of the modules and shallow copies of the containers they reach.

    Most containers are a module's empty hook tables: they are remembered as empty (no
    copy) and, on restore, emptied only if something was added.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.tables: list[tuple[dict[str, Any], tuple, tuple]] = []
        self.containers: list[tuple[Any, Any]] = []
        self.empty: list[Any] = []
        self._seen: set[int] = set()
        walk, walked, seen, empty = self._walk, _WALKED, self._seen, self.empty
        for m in model.modules():
            table = m.__dict__
            values = tuple(table.values())
            self.tables.append((table, tuple(table), values))
            for value in values:
                if not isinstance(value, walked):
                    continue
                if not value and type(value) is not tuple:  # an empty hook table (most of them)
                    if id(value) not in seen:
                        seen.add(id(value))
                        empty.append(value)
                else:
                    walk(value, 0)

    def _walk(self, value: Any, depth: int) -> None:
        if depth > _MAX_DEPTH or len(self.containers) + len(self.empty) >= _MAX_CONTAINERS:
            return
        if isinstance(value, (list, dict, set)):
            if id(value) in self._seen:
                return
            self._seen.add(id(value))
            if not value:
                self.empty.append(value)
                return
            if isinstance(value, dict):
                self.containers.append((value, (tuple(value), tuple(value.values()))))
                items = value.values()
            else:
                self.containers.append((value, _copy(value)))
                items = value
            walked = _WALKED
            for item in items:
                if isinstance(item, walked):
                    self._walk(item, depth + 1)
        elif type(value) is tuple:
            for item in value:
                self._walk(item, depth + 1)

    def restore(self) -> None:
        for table, keys, values in self.tables:
            _restore_dict(table, keys, values)
        for container in self.empty:
            if container:
                try:
                    container.clear()
                except (TypeError, AttributeError, NotImplementedError):  # read-only containers
                    continue
        for container, saved in self.containers:
            try:
                if isinstance(container, dict):
                    _restore_dict(container, *saved)
                elif isinstance(container, list):
                    if len(container) != len(saved) or any(a is not b for a, b in zip(container, saved)):
                        container[:] = saved
                elif container != saved:
                    container.clear()
                    container.update(saved)
            except (TypeError, AttributeError, NotImplementedError):  # read-only containers
                continue


_WALKED = (list, dict, set, tuple)


def _copy(value: list | set) -> list | set:
    return list(value) if isinstance(value, list) else set(value)


def _restore_dict(table: dict, keys: tuple, values: tuple) -> None:
    """Put ``table`` back to the ``keys`` and ``values`` (in order) it had; untouched if it has them."""
    if len(table) == len(keys) and tuple(table) == keys and all(map(operator.is_, table.values(), values)):
        return
    table.clear()
    table.update(zip(keys, values))


@contextlib.contextmanager
def untouched(model: torch.nn.Module) -> Iterator[None]:
    """Run the body, then put every attribute and container of ``model`` back as it was."""
    snapshot = _Snapshot(model)
    try:
        yield
    finally:
        snapshot.restore()


def structural_copy(model: torch.nn.Module) -> torch.nn.Module:
    """New module objects with the structure, attributes and (shared) tensors of ``model``;
    their attribute tables and the lists, dicts and sets in them are copies."""
    memo: dict[int, torch.nn.Module] = {}

    def copy_module(m: torch.nn.Module) -> torch.nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        new = type(m).__new__(type(m))
        memo[id(m)] = new
        table = {}
        for key, value in m.__dict__.items():
            if key == "_modules":
                value = {k: None if c is None else copy_module(c) for k, c in value.items()}
            elif isinstance(value, (list, dict, set)):
                value = copy.copy(value)
            table[key] = value
        new.__dict__.update(table)
        return new

    return copy_module(model)
