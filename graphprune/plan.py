"""Plans: which channels of which group to remove; and selection of a plan from scores.

A ``Plan`` is a read-only mapping ``group id -> sorted removed channel indices`` that
round-trips through JSON. ``Plan.validate(dg)`` checks it against a dependency graph.

>>> plan = Plan({0: [3, 1]})
>>> plan[0], Plan.from_json(plan.to_json()) == plan
((1, 3), True)
"""

from __future__ import annotations

import json
import math
import operator
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from graphprune.errors import InputError, PlanError

__all__ = ["Plan", "select", "resolve_ignore", "CountEstimator", "StepPlans", "check_schedule"]


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
        keys = [k for k, _ in raw.items]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise PlanError(f"plan JSON names group {repeated[0]} more than once; give each group one entry")
        for key, value in raw.items:
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


SCOPES = ("local", "global")
TARGETS = ("channels", "macs", "params")


@dataclass(slots=True)
class _Unit:
    """Channels of one group removed in one step (one channel, or a ``round_to`` block);
    ``frac`` is the fraction of its group removed once it is taken."""

    gid: int
    channels: np.ndarray
    frac: float


class _Units:
    """An ordered sequence of ``_Unit``s held as arrays (there is one per channel).

    Unit ``i`` removes ``chans[start[i]:stop[i]]`` of group ``gid[i]``. Slicing gives
    another ``_Units``; iterating gives ``_Unit`` objects.
    """

    def __init__(self, gid: np.ndarray, frac: np.ndarray, start: np.ndarray, stop: np.ndarray,
                 chans: np.ndarray) -> None:
        self.gid, self.frac, self.start, self.stop, self.chans = gid, frac, start, stop, chans

    def __len__(self) -> int:
        return len(self.gid)

    def __getitem__(self, index: slice | np.ndarray) -> _Units:
        return _Units(self.gid[index], self.frac[index], self.start[index], self.stop[index], self.chans)

    def __iter__(self):
        for g, f, a, b in zip(self.gid.tolist(), self.frac.tolist(), self.start.tolist(), self.stop.tolist()):
            yield _Unit(g, self.chans[a:b], f)

    def removed(self) -> dict[int, list[int]]:
        """Channels every group loses when all these units are taken."""
        lengths = self.stop - self.start
        at = np.repeat(self.start - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        gids = np.repeat(self.gid, lengths)
        order = np.argsort(gids, kind="stable")
        gids, chans = gids[order], self.chans[at[order]]
        cuts = np.flatnonzero(np.diff(gids)) + 1
        return {int(g[0]): c.tolist() for g, c in zip(np.split(gids, cuts), np.split(chans, cuts)) if g.size}


def _floor(size: int, min_keep: int | float) -> int:
    if isinstance(min_keep, float) and 0 < min_keep < 1:
        return max(1, int(np.ceil(size * min_keep - 1e-9)))
    return max(1, int(min_keep))


def _allowed_kept(size: int, floor: int, round_to: int | None) -> list[int]:
    """Channel counts a group may keep, descending from ``size``."""
    if not round_to or round_to <= 1:
        return list(range(size, floor - 1, -1))
    multiples = [m for m in range(round_to * (size // round_to), 0, -round_to) if m >= floor and m < size]
    return [size] + multiples


def resolve_ignore(dg: Any, ignore: Iterable[int | str]) -> set[int]:
    """Group ids to leave whole: ids as given; names match the groups a layer produces.

    A name (``"layer1.0.conv1"``) selects every group that owns output rows (``out``
    members) of that module or of modules inside it; unknown names raise ``InputError``.
    """
    out: set[int] = set()
    for item in ignore:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not 0 <= int(item) < len(dg.groups):
                raise InputError(f"ignore names group {item}, but the graph has groups 0..{len(dg.groups) - 1}")
            out.add(int(item))
            continue
        if not isinstance(item, str):
            raise InputError(f"ignore entries must be group ids or module names, got {item!r}")
        hit = {g.id for g in dg.groups for m in g.members
               if m.role == "out" and (m.param == item or m.param.startswith(item + "."))}
        hit |= {g.id for g in dg.groups if item in g.producers}
        if not hit:
            raise InputError(f"ignore names {item!r}, which produces no group's channels; "
                             "give a module name (as in model.named_modules()) or a group id")
        out |= hit
    return out


def _units(dg: Any, scores: Mapping[int, np.ndarray], scope: str, min_keep: int | float,
           round_to: int | None) -> tuple[_Units, int]:
    """Removal units of every group in scope, ordered for ``scope``; and the channels in scope.

    Taking a prefix of the returned list is a valid plan. ``local`` orders units by the
    fraction of their group removed once they are taken (so a prefix removes the same
    fraction everywhere); ``global`` by score (mean score for ``round_to`` blocks). Ties
    go by mean score, then group id, then position within the group.
    """
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("frac", "mean", "gid", "j", "start", "stop")}
    orders: list[np.ndarray] = []
    whole: list[tuple[float, int]] = []
    n_channels, offset = 0, 0
    for gid, s in scores.items():
        g = dg.groups[gid]
        n_channels += g.size
        if g.removable and g.size == 1:
            whole.append((float(s[0]), gid))
            continue
        order = np.argsort(s, kind="stable")
        kept = np.asarray(_allowed_kept(g.size, min(_floor(g.size, min_keep), g.size), round_to))
        a, b = kept[:-1], kept[1:]
        if not a.size:
            continue
        start, stop = g.size - a, g.size - b  # block j is order[start[j]:stop[j]]
        ranked = s[order]
        # blocks are consecutive from 0, so reduceat over ranked[:stop[-1]] sums each one
        mean = np.add.reduceat(ranked[:stop[-1]], start) / (stop - start) if (stop - start > 1).any() else ranked[start]
        # one channel: floor(size * ratio) channels, as without rounding; a block: nearest
        # allowed count (ties keep more), so it is taken once the ratio passes its middle
        frac = np.where(stop - start == 1, stop / g.size, (start + stop) / (2 * g.size) + 1e-6)
        for key, col in (("frac", frac), ("mean", mean), ("gid", np.full(a.size, gid)),
                         ("j", np.arange(a.size)), ("start", start + offset), ("stop", stop + offset)):
            cols[key].append(col)
        orders.append(order)
        offset += g.size
    # Width-1 layers that may vanish are removed whole, ranked among themselves.
    for rank, (sc, gid) in enumerate(sorted(whole)):
        for key, value in (("frac", (rank + 1) / len(whole)), ("mean", sc), ("gid", gid), ("j", 0),
                           ("start", offset), ("stop", offset + 1)):
            cols[key].append(np.array([value]))
        orders.append(np.array([0]))
        offset += 1
    if not orders:
        return _Units(*(np.zeros(0, np.int64),) * 5), n_channels
    c = {k: np.concatenate(v) for k, v in cols.items()}
    keys = (c["j"], c["gid"], c["mean"]) if scope == "global" else (c["j"], c["gid"], c["mean"], c["frac"])
    rank = np.lexsort(keys)
    return _Units(c["gid"][rank], c["frac"][rank], c["start"][rank], c["stop"][rank],
                  np.concatenate(orders)), n_channels


def _plan_of(units: _Units | Iterable[_Unit]) -> Plan:
    if isinstance(units, _Units):
        return Plan(units.removed())
    removed: dict[int, list[np.ndarray]] = {}
    for u in units:
        removed.setdefault(u.gid, []).append(u.channels)
    return Plan({gid: np.concatenate(parts).tolist() for gid, parts in removed.items()})


class _AxisIndex:
    """Every labelled axis of every node, flattened, to find emptied axes in one pass."""

    def __init__(self, dg: Any) -> None:
        from graphprune.graph import iter_arrays

        arrays = [a for n in dg.gm.graph.nodes for a in iter_arrays(dg.node_labels.get(n.name)) if a.size]
        self.dg = dg
        self.labels = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        self.segment = np.repeat(np.arange(len(arrays)), [len(a) for a in arrays])
        self.n = len(arrays)

    def any_empty(self, removed: np.ndarray) -> bool:
        kept = np.bincount(self.segment, weights=self.dg.keep_mask(self.labels, removed), minlength=self.n)
        return bool((kept == 0).any())


def _repair(dg: Any, plan: Plan, scores: Mapping[int, np.ndarray], axes: _AxisIndex | None = None) -> Plan:
    """Give back the best-scored channels of any tensor axis the plan would empty.

    A group that keeps channels can still empty an axis where it is split (a
    ``chunk`` of a channel-shuffled tensor); such a plan cannot be rewritten unless the
    emptied layer only feeds concatenations.
    """
    from graphprune.graph import iter_arrays

    if axes is not None and not axes.any_empty(dg.removed_classes(plan)):
        return plan
    removed_sets = {gid: set(ch) for gid, ch in plan.items()}
    nodes = {n.name: n for n in dg.gm.graph.nodes}
    for _ in range(10_000):
        removed = dg.removed_classes({g: sorted(c) for g, c in removed_sets.items()})
        vanished, problems = dg.vanish_blockers(removed)
        if not problems:
            break
        restored = False
        for name in vanished:
            node = nodes[name]
            if all(u.name in vanished or (u.op == "call_function" and u.target in (torch.cat, torch.concat))
                   for u in node.users):
                continue
            for arr in iter_arrays(dg.node_labels.get(name)):
                if not arr.size or dg.keep_mask(arr, removed).any():
                    continue
                cls = dg.cls[arr]
                best = max(((float(scores[g][c]) if g in scores else 0.0, int(g), int(c))
                            for g, c in zip(dg.group_of_cls[cls], dg.chan_of_cls[cls])
                            if g >= 0 and int(c) in removed_sets.get(int(g), ())), default=None)
                if best is not None:
                    removed_sets[best[1]].discard(best[2])
                    restored = True
                    break
            if restored:
                break
        if not restored:
            break
    return Plan({g: sorted(c) for g, c in removed_sets.items()})


class CountEstimator:
    """Parameters and MACs of the slim model a plan would give, without building it.

    Mirrors ``graphprune.metrics.count`` on the shapes the rewrite produces: every
    labelled axis of a node output or parameter shrinks by the removed channels. It
    is exact for the built-in layers; ``select`` checks its final answer with
    ``apply`` + ``count`` when given the model.
    """

    def __init__(self, dg: Any) -> None:
        self.dg = dg
        gm = dg.gm
        modules = dict(gm.named_modules())
        self.params = [n for n, _ in gm.named_parameters()]
        shapes = {n: tuple(p.shape) for n, p in gm.named_parameters()}
        self.param_shapes = shapes
        self.terms: list[tuple[str, Any]] = []
        for node in gm.graph.nodes:
            if node.op == "call_module":
                mod = modules.get(node.target)
                w = f"{node.target}.weight"
                if isinstance(mod, nn.modules.conv._ConvTransposeNd):
                    self.terms.append(("in_w1+", (node.args[0], w)))
                elif isinstance(mod, nn.modules.conv._ConvNd):
                    self.terms.append(("out_w1+", (node, w)))
                elif isinstance(mod, nn.Linear):
                    self.terms.append(("out_w1", (node, w)))
                elif isinstance(mod, nn.Bilinear):
                    self.terms.append(("out_w1+", (node, w)))
            elif node.op in ("call_function", "call_method"):
                t = node.target
                if t in (F.conv1d, F.conv2d, F.conv3d) or t is F.linear:
                    wn = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
                    self.terms.append(("out_n1+", (node, wn)))
                elif t in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
                    self.terms.append(("in_n1+", (node.args[0], node.args[1])))
                elif t in (torch.matmul, torch.bmm, torch.mm, operator.matmul, "matmul", "bmm", "mm"):
                    self.terms.append(("matmul", (node, node.args[0])))

    def _removed(self, plan: Mapping[int, Iterable[int]]) -> np.ndarray:
        return self.dg.removed_classes(plan)

    def _node_shape(self, node: Any, removed: np.ndarray) -> tuple[int, ...] | None:
        if not isinstance(node, torch.fx.Node):
            return None
        shape = node.meta.get("shape")
        if not isinstance(shape, torch.Size):
            return None
        labels = self.dg.node_labels.get(node.name)
        if type(labels) is not tuple:
            return tuple(shape)
        return tuple(int(self.dg.keep_mask(lab, removed).sum()) if isinstance(lab, np.ndarray) else s
                     for s, lab in zip(shape, labels + (None,) * (len(shape) - len(labels))))

    def _param_shape(self, name: str, removed: np.ndarray) -> tuple[int, ...] | None:
        shape = self.param_shapes.get(name) or self.dg.state_shapes.get(name)
        if shape is None:
            return None
        return tuple(int(self.dg.keep_mask(self.dg.member_labels[(name, d)], removed).sum())
                     if (name, d) in self.dg.member_labels else s for d, s in enumerate(shape))

    def counts(self, plan: Mapping[int, Iterable[int]]) -> tuple[int, int]:
        """``(params, macs)`` of the model ``plan`` would give."""
        removed = self._removed(plan)
        params = sum(math.prod(self._param_shape(n, removed) or ()) for n in self.params)
        macs = 0
        for kind, (a, b) in self.terms:
            x = self._node_shape(a, removed)
            w = self._param_shape(b, removed) if isinstance(b, str) else self._node_shape(b, removed)
            if x is None or w is None:
                continue
            if kind == "matmul":
                macs += math.prod(x) * (w[-1] if w else 1)
            elif kind == "out_w1":
                macs += math.prod(x) * w[1]
            else:
                macs += math.prod(x) * math.prod(w[1:])
        return int(params), int(macs)


def _search(units: _Units, measure: Callable[[_Units | list[_Unit]], float], goal: float,
            tol: float) -> _Units | list[_Unit]:
    """Units to take so that ``measure`` (remaining size) lands on ``goal``, within ``tol``.

    Bisection over prefixes of ``units`` (measure decreases along them), then, if the
    step at the crossing is too coarse, a greedy pass over the following units that
    takes each one that does not overshoot (a group's later units follow its first
    skipped one out).
    """
    def at(k: int) -> float:
        return measure(units[:k])

    lo, hi = 0, len(units)
    if at(hi) >= goal:
        return units
    while hi - lo > 1:  # invariant: at(lo) >= goal > at(hi)
        mid = (lo + hi) // 2
        if at(mid) >= goal:
            lo = mid
        else:
            hi = mid
    taken, cur = list(units[:lo]), at(lo)
    over = at(hi)
    if goal - over <= cur - goal and goal - over <= tol:
        return units[:hi]
    if cur - goal <= tol / 4:
        return taken
    blocked: set[int] = set()
    for u in units[lo:]:
        if u.gid in blocked:
            continue
        value = measure(taken + [u])
        if value >= goal:
            taken.append(u)
            cur = value
            if cur - goal <= tol / 4:
                break
        else:
            blocked.add(u.gid)
    return taken


def select(
    dg: Any,
    scores: Mapping[int, np.ndarray],
    ratio: float | None = None,
    *,
    scope: str = "local",
    min_keep: int | float = 1,
    round_to: int | None = None,
    ignore: Iterable[int | str] = (),
    target: str = "channels",
    model: torch.nn.Module | None = None,
    example_inputs: Any = None,
    normalize: str | bool | None = None,
    tolerance: float = 0.01,
) -> Plan:
    """Choose the channels to remove: lowest scores first, under a target.

    - ``target="channels"``: remove ``ratio`` of the channels; ``"macs"``/``"params"``:
      remove ``ratio`` of the model's MACs or parameters, hit within ``tolerance``
      (a fraction of the original count) by search where the structure allows.
    - ``scope="local"``: the same fraction of every group; ``"global"``: one ranking
      of all channels, so scores must compare across groups (``normalize`` rescales
      each group's scores first: ``"max"``, ``"mean"``, ``"sum"``, ``"std"``).
    - Every group keeps at least ``min_keep`` channels (an int, or a fraction of the
      group in (0, 1)), and never fewer than one; with ``round_to`` every group keeps
      a multiple of it (or all its channels).
    - Groups of one channel that may vanish entirely (a width-1 layer whose output only
      reaches concatenations) are ranked among themselves and removed whole.
    - ``ignore`` lists group ids or module names to leave whole; groups without scores
      (a criterion may skip some, as ``bn_scale`` skips groups with no norm layer) and
      unprunable groups are left whole too.

    For MACs/params targets the counts of candidate plans are computed from the graph
    (``CountEstimator``); with ``model`` and ``example_inputs`` the result is checked
    with ``apply`` + ``count`` and the search repeats on exact counts if they differ.

    >>> import torch, graphprune as gp
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> dg = gp.DependencyGraph.build(model, torch.randn(1, 4))
    >>> select(dg, {0: np.arange(8.0)}, 0.5)[0]
    (0, 1, 2, 3)
    """
    if ratio is None or isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise InputError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if scope not in SCOPES:
        raise InputError(f"scope must be one of {SCOPES}, got {scope!r}")
    if target not in TARGETS:
        raise InputError(f"target must be one of {TARGETS}, got {target!r}")
    if round_to is not None and (not isinstance(round_to, (int, np.integer)) or round_to < 1):
        raise InputError(f"round_to must be a positive integer or None, got {round_to!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)) or min_keep <= 0 or (
            isinstance(min_keep, float) and min_keep >= 1 and not min_keep.is_integer()):
        raise InputError(f"min_keep must be an int >= 1 or a fraction in (0, 1), got {min_keep!r}")
    if isinstance(min_keep, float) and min_keep >= 1:
        min_keep = int(min_keep)
    if (model is None) != (example_inputs is None):
        raise InputError("give both model and example_inputs (for exact counts), or neither")
    skip = resolve_ignore(dg, ignore)
    from graphprune.importance.base import normalize_scores  # scores helpers live with the criteria

    scoped: dict[int, np.ndarray] = {}
    for g in dg.groups:
        if not g.prunable or g.id in skip or g.id not in scores:
            continue
        s = np.asarray(scores[g.id], dtype=np.float64)
        if s.shape != (g.size,):
            raise PlanError(f"scores for group {g.id} have shape {s.shape}, expected ({g.size},)")
        if not np.isfinite(s).all():
            raise PlanError(f"scores for group {g.id} contain NaN or inf; check the criterion's inputs")
        scoped[g.id] = s
    scoped = normalize_scores(scoped, normalize)
    units, n_channels = _units(dg, scoped, scope, min_keep, round_to)

    axes = _AxisIndex(dg)

    def valid(taken: _Units | Iterable[_Unit]) -> Plan:
        return _repair(dg, _plan_of(taken), scoped, axes)

    if target == "channels" or ratio == 0:
        if scope == "local":
            return valid(units[units.frac <= ratio + 1e-9])
        # take units in order while the channels removed before each, plus half of it, stay within the goal
        lengths = units.stop - units.start
        over = np.flatnonzero(np.cumsum(lengths) - lengths / 2 > ratio * n_channels + 1e-9)
        return valid(units[:over[0]] if over.size else units)

    which = 0 if target == "params" else 1
    est = CountEstimator(dg)
    base_est = est.counts({})[which]
    exact = None
    if model is not None:
        from graphprune.metrics import count  # late imports: rewrite depends on this module
        from graphprune.rewrite import apply

        def exact(plan: Plan) -> int:
            c = count(apply(model, dg, plan, check=False), example_inputs)
            return c.params if which == 0 else c.macs

        base = exact(Plan())
    else:
        base = base_est
    goal = (1 - ratio) * base
    tol = tolerance * base
    offset = base - base_est  # parameters the graph does not reach (unused modules)
    plan = valid(_search(units, lambda t: est.counts(valid(t))[which] + offset, goal, tol))
    got = est.counts(plan)[which] + offset
    if exact is not None:
        got = exact(plan)
        if abs(got - (est.counts(plan)[which] + offset)) > tol / 4:
            plan = valid(_search(units, lambda t: exact(valid(t)), goal, tol))
            got = exact(plan)
    if abs(got - goal) > tol:
        warnings.warn(f"select: asked to remove {ratio:.1%} of the {target}, the closest plan removes "
                      f"{1 - got / base:.1%} (floors, round_to, ignored or unscored groups limit it)",
                      RuntimeWarning, stacklevel=2)
    return plan


class StepPlans:
    """Bookkeeping of iterative pruning: each step's plan is on that step's (re-traced)
    graph; this follows the original graph's tensor slices through the steps.

    - ``skip(dg)``: group ids of ``dg`` to leave alone (the ignored groups of the
      original graph, found by the slices they own, plus ignored module names);
    - ``record(dg, plan)``: note what a step removed;
    - ``composed()``: one plan on the original graph that removes what all steps did.
    """

    def __init__(self, dg0: Any, ignore: Any = ()) -> None:
        ignore = list(ignore)
        self.dg0 = dg0
        self.names = [i for i in ignore if isinstance(i, str)]
        ids = resolve_ignore(dg0, [i for i in ignore if not isinstance(i, str)])
        self.pinned = {(m.param, m.dim) for gid in ids for m in dg0.groups[gid].members}
        self.kept = {(param, dim): np.arange(dg0.state_shapes[param][dim])
                     for (param, dim) in dg0.member_labels if param in dg0.state_shapes}
        self.history: list[Plan] = []

    def skip(self, dg: Any) -> list[int | str]:
        return [g.id for g in dg.groups if any((m.param, m.dim) in self.pinned for m in g.members)] + self.names

    def record(self, dg: Any, plan: Plan) -> None:
        gone: dict[tuple[str, int], set[int]] = {}
        for gid, channels in plan.items():
            for m in dg.groups[gid].members:
                gone.setdefault((m.param, m.dim), set()).update(m.indices(channels))
        for key, positions in gone.items():
            if key in self.kept:
                self.kept[key] = np.delete(self.kept[key], sorted(positions))
        self.history.append(plan)

    def composed(self) -> Plan:
        if len(self.history) == 1:
            return self.history[0]
        removed: dict[int, list[int]] = {}
        for g in self.dg0.groups:
            gone: set[int] = set()
            for m in g.members:
                alive = self.kept.get((m.param, m.dim))
                if alive is None:
                    continue
                alive = set(alive.tolist())
                dead: dict[int, bool] = {}
                for p, c in zip(m.positions.tolist(), m.channels.tolist()):
                    dead[c] = dead.get(c, True) and p not in alive
                gone |= {c for c, is_dead in dead.items() if is_dead}
            if gone:
                removed[g.id] = sorted(gone)
        return Plan(removed)


def check_schedule(ratio: Any, steps: Any, callback: Any) -> None:
    """Raise ``InputError`` for a ratio outside [0, 1), a bad step count or callback."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise InputError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if callback is not None and not callable(callback):
        raise InputError(f"callback must be callable(model, step), got {type(callback).__name__}")
