"""Selection: from channel scores to a ``Plan`` under a target.

``select(dg, scores, ratio, ...)`` removes the lowest-scored channels: the same fraction
of every group (``scope="local"``) or one ranking of all channels (``"global"``), of the
channels or of the model's MACs or parameters (``target``), with per-group floors
(``min_keep``), ceilings (``ceilings``), multiples (``round_to``) and ignored groups.
MACs and parameter targets are searched with the exact estimator
(``graphprune.metrics.CountEstimator``: no model is built during the search); given the
model, the result is checked once with ``apply`` + ``count``. Plans that would empty an
axis that must keep a channel are repaired (``graphprune.removal.repair``).

>>> import torch, numpy as np, graphprune as gp
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
...                             torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> dg = gp.DependencyGraph.build(model, torch.randn(1, 4))
>>> scores = {0: np.arange(8.0), 1: np.arange(8.0)[::-1].copy()}
>>> select(dg, scores, 0.5)
Plan({0: 4 ch, 1: 4 ch})
>>> select(dg, scores, 0.5)[1], select(dg, scores, 0.5, ceilings={1: 0.25})[1]
((4, 5, 6, 7), (6, 7))
>>> plan = select(dg, scores, 0.5, target="macs")
>>> abs(1 - gp.metrics.estimate(dg, plan).macs / gp.metrics.estimate(dg, {}).macs - 0.5) <= 0.01
True
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from graphprune.errors import InputError, PlanError, warn_user
from graphprune.importance.base import normalize_scores
from graphprune.metrics import CountEstimator, count
from graphprune.plan import Plan
from graphprune.removal import EmptiedAxes, Removal, repair
from graphprune.rewrite import apply
from graphprune.uniform import Pooled, families

__all__ = ["select", "resolve_ignore", "resolve_ratios", "module_names", "SCOPES", "TARGETS"]


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

    Unit ``i`` removes ``chans[start[i]:stop[i]]`` of group ``gid[i]``, which stands for
    ``mult[i]`` groups (a family of repeated blocks, ``uniform=True``). Slicing gives
    another ``_Units``; iterating gives ``_Unit`` objects.
    """

    def __init__(self, gid: np.ndarray, frac: np.ndarray, start: np.ndarray, stop: np.ndarray,
                 chans: np.ndarray, mult: np.ndarray) -> None:
        self.gid, self.frac, self.start, self.stop, self.chans, self.mult = gid, frac, start, stop, chans, mult

    def __len__(self) -> int:
        return len(self.gid)

    def __getitem__(self, index: slice | np.ndarray) -> _Units:
        return _Units(self.gid[index], self.frac[index], self.start[index], self.stop[index], self.chans,
                      self.mult[index])

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


def module_names(dg: Any, module: torch.nn.Module, model: torch.nn.Module | None = None) -> list[str]:
    """Every qualified name of ``module`` in ``model`` (or in the traced graph ``dg.gm``, which
    shares its submodules with the model); ``InputError`` if it is in neither."""
    names = [n for root in (model, getattr(dg, "gm", None)) if root is not None
             for n, m in root.named_modules(remove_duplicate=False) if m is module]
    if not names:
        raise InputError(f"the module {type(module).__name__} given is not a submodule of the model "
                         "(its traced graph); give a module of that model, or its name")
    return list(dict.fromkeys(names))


def _matches(key: str, name: str) -> bool:
    """Whether module name or glob pattern ``key`` names parameter ``name`` or a module around it."""
    pattern = any(c in key for c in "*?[")
    while name:
        if (fnmatch.fnmatchcase(name, key) if pattern else name == key):
            return True
        name = name.rpartition(".")[0]
    return False


def _keys(dg: Any, key: Any, what: str, model: torch.nn.Module | None) -> list[Any]:
    """A key as group ids and names: a module becomes its names; anything else is checked."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        if not 0 <= int(key) < len(dg.groups):
            raise InputError(f"{what} names group {key}, but the graph has groups 0..{len(dg.groups) - 1}")
        return [int(key)]
    if isinstance(key, torch.nn.Module):
        return module_names(dg, key, model)
    if not isinstance(key, str):
        raise InputError(f"{what} entries must be group ids, module names (glob patterns allowed) or "
                         f"modules, got {key!r}")
    return [key]


def _covered(dg: Any, key: Any, what: str, model: torch.nn.Module | None = None) -> set[tuple[int, str]]:
    """The (group id, producer) pairs ``key`` selects, a producer being a parameter whose output rows
    are the group's channels (or a producing node); a key that selects nothing raises ``InputError``."""
    hit = {(g.id, p) for k in _keys(dg, key, what, model) for g in dg.groups
           for p in dict.fromkeys([*(m.param for m in g.members if m.role == "out"), *g.producers])
           if (k == g.id if isinstance(k, int) else _matches(k, p))}
    if not hit:
        raise InputError(f"{what} names {key!r}, which produces no group's channels; give a module name "
                         "(as in model.named_modules(), or a glob pattern such as 'layer4.*'), a module "
                         "or a group id")
    return hit


def resolve_ignore(dg: Any, ignore: Iterable[Any], model: torch.nn.Module | None = None) -> set[int]:
    """Group ids to leave whole: ids as given; a name (``"layer1.0.conv1"``) selects every group
    whose channels that module or a module inside it produces (output rows, ``out`` members); a
    pattern (``"layer1.*.conv1"``, ``fnmatch``) those of every matching module; a module object
    (``model.fc``) those of its names. A key that selects nothing raises ``InputError``."""
    return {gid for item in ignore for gid, _ in _covered(dg, item, "ignore", model)}


def resolve_ratios(dg: Any, ratios: Mapping[Any, float], model: torch.nn.Module | None = None, *,
                   strict: bool = True) -> dict[int, float]:
    """Per-module ratios as per-group ratios: ``{group id: ratio}`` for the groups an entry covers.

    Keys are as in ``resolve_ignore`` (group ids, module names, glob patterns, modules). Every
    producer of a group (a layer whose output rows are its channels) takes the most specific
    entry that names it: the one naming the fewest producers in the graph (``"layer4.0.conv1"``
    before ``"layer4"`` before ``"*"``), between equally specific entries the later one. A
    group whose producers take different ratios gets the smallest of them (no layer loses
    more than its entry allows); groups no entry covers are left out. With ``strict=False``
    keys that select nothing are skipped instead of raising ``InputError``.
    """
    entries = []
    for order, (key, r) in enumerate(ratios.items()):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise InputError(f"ratios[{key!r}] must be a number in [0, 1), got {r!r}")
        try:
            hit = _covered(dg, key, "ratios", model)
        except InputError:
            if strict:
                raise
            continue
        entries.append((len(hit), -order, float(r), hit))
    taken: dict[tuple[int, str], float] = {}
    for *_, r, hit in sorted(entries, key=lambda e: e[:2], reverse=True):  # most specific written last
        taken.update(dict.fromkeys(hit, r))
    out: dict[int, float] = {}
    for (gid, _), r in taken.items():
        out[gid] = min(out.get(gid, r), r)
    return out


def _units(dg: Any, scores: Mapping[int, np.ndarray], scope: str, min_keep: int | float,
           round_to: int | None, ceilings: Mapping[int, float] | None = None,
           members: Mapping[int, int] | None = None) -> tuple[_Units, int]:
    """Removal units of every group in scope, ordered for ``scope``; and the channels in scope.

    Taking a prefix of the returned list is a valid plan. ``local`` orders units by the
    fraction of their group removed once they are taken (so a prefix removes the same
    fraction everywhere); ``global`` by score (mean score for ``round_to`` blocks). Ties
    go by mean score, then group id, then position within the group. ``ceilings[gid]``
    caps the fraction of group ``gid`` that may go (it raises that group's floor);
    ``members[gid]`` says how many groups of its size ``gid`` stands for (a family).
    """
    members = members or {}
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("frac", "mean", "gid", "j", "start", "stop", "mult")}
    orders: list[np.ndarray] = []
    whole: list[tuple[float, int]] = []
    n_channels, offset = 0, 0
    for gid, s in scores.items():
        g = dg.groups[gid]
        n_channels += g.size * members.get(gid, 1)
        floor = _floor(g.size, min_keep)
        if ceilings is not None and gid in ceilings:
            floor = max(floor, g.size - math.floor(max(0.0, float(ceilings[gid])) * g.size + 1e-9))
        if g.removable and g.size == 1:
            if ceilings is None or ceilings.get(gid, 1.0) >= 1.0:
                whole.append((float(s[0]), gid))
            continue
        order = np.argsort(s, kind="stable")
        kept = np.asarray(_allowed_kept(g.size, min(floor, g.size), round_to))
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
        for key, col in (("frac", frac), ("mean", mean), ("gid", np.full(a.size, gid, dtype=np.int32)),
                         ("j", np.arange(a.size, dtype=np.int32)), ("start", start + offset), ("stop", stop + offset),
                         ("mult", np.full(a.size, members.get(gid, 1), dtype=np.int32))):
            cols[key].append(col)
        orders.append(order)
        offset += g.size
    # Width-1 layers that may vanish are removed whole, ranked among themselves.
    for rank, (sc, gid) in enumerate(sorted(whole)):
        for key, value in (("frac", (rank + 1) / len(whole)), ("mean", sc), ("gid", gid), ("j", 0),
                           ("start", offset), ("stop", offset + 1), ("mult", members.get(gid, 1))):
            cols[key].append(np.array([value]))
        orders.append(np.array([0]))
        offset += 1
    if not orders:
        return _Units(*(np.zeros(0, np.int64),) * 6), n_channels
    c = {k: np.concatenate(cols.pop(k)) for k in list(cols)}  # one column's pieces alive at a time
    keys = (c["j"], c["gid"], c["mean"]) if scope == "global" else (c["j"], c["gid"], c["mean"], c["frac"])
    rank = np.lexsort(keys)
    del keys, c["j"], c["mean"]  # sort keys only
    gid, frac, start, stop, mult = (c.pop(k)[rank] for k in ("gid", "frac", "start", "stop", "mult"))
    return _Units(gid, frac, start, stop, np.concatenate(orders), mult), n_channels


def _plan_of(units: _Units | Iterable[_Unit]) -> Plan:
    if isinstance(units, _Units):
        return Plan(units.removed())
    removed: dict[int, list[np.ndarray]] = {}
    for u in units:
        removed.setdefault(u.gid, []).append(u.channels)
    return Plan({gid: np.concatenate(parts).tolist() for gid, parts in removed.items()})


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
    ceilings: Mapping[int, float] | None = None,
    ratios: Mapping[Any, float] | None = None,
    max_ratio: float | None = None,
    uniform: bool = False,
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
    - ``ceilings`` maps group ids to the largest fraction of their channels that may go
      (from sensitivity analysis, a redundancy estimate or by hand); ``max_ratio`` is a
      ceiling for every group.
    - ``ratios`` gives per-module ratios: keys are module names, glob patterns
      (``"layer4.*"``), module objects or group ids, matched as in ``resolve_ratios`` (the
      most specific entry wins; a group whose producers disagree takes the smallest).
      With ``target="channels"`` and ``scope="local"`` a covered group loses exactly its
      ratio and the others ``ratio`` (which may then be left out: 0). Otherwise ``ratio``
      is the overall amount and the per-module ratios are ceilings of their groups.
    - ``ignore`` lists group ids, module names, glob patterns or modules to leave whole; groups without scores
      (a criterion may skip some, as ``bn_scale`` skips groups with no norm layer) and
      unprunable groups are left whole too.
    - ``uniform=True``: repeated blocks keep one width. Groups that are the same layer of
      different blocks (same size, same producer names once layer indices are replaced by
      ``*``: ``model.layers.*.mlp.up_proj``; see ``graphprune.uniform``) form a family that
      is selected as one group, on the mean of its members' sorted scores, under the rules
      above (a family's ceiling is its strictest member's); every member loses the same
      count, each its own lowest-scored channels.

    For MACs/params targets the counts of candidate plans are computed from the graph
    (``CountEstimator``, exact for every rule with a ``macs`` facet), relative to the
    slim model of the empty plan; with ``model`` and ``example_inputs`` the result is
    checked once with ``apply`` + ``count``, and should the two ever disagree the search
    repeats on exact counts, with a warning.

    >>> import torch, graphprune as gp
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> dg = gp.DependencyGraph.build(model, torch.randn(1, 4))
    >>> select(dg, {0: np.arange(8.0)}, 0.5)[0]
    (0, 1, 2, 3)
    >>> select(dg, {0: np.arange(8.0)}, ratios={"0": 0.25})[0]
    (0, 1)
    """
    if ratio is None and ratios:
        if scope != "local" or target != "channels":
            raise InputError(f"with scope={scope!r} and target={target!r} per-module ratios are ceilings: give the "
                             "overall amount as ratio too")
        ratio = 0.0
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
    if max_ratio is not None and (isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float))
                                  or not 0 <= max_ratio <= 1):
        raise InputError(f"max_ratio must be a number in [0, 1] or None, got {max_ratio!r}")
    if not isinstance(uniform, bool):
        raise InputError(f"uniform must be True or False, got {uniform!r}")
    skip = resolve_ignore(dg, ignore)
    per_group = resolve_ratios(dg, ratios) if ratios else {}

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
    caps = dict(ceilings or {})
    if max_ratio is not None:
        caps = {gid: min(caps.get(gid, 1.0), max_ratio) for gid in scoped}
    if per_group and target == "channels" and scope == "local":
        # exact per-group fractions: the largest is the ratio, the others are ceilings
        wanted = {gid: per_group.get(gid, ratio) for gid in scoped}
        ratio = max(wanted.values(), default=ratio)
        per_group = {gid: r for gid, r in wanted.items() if r < ratio}
    for gid, r in per_group.items():
        caps[gid] = min(caps.get(gid, 1.0), r)
    pooled = Pooled(scoped, families(dg, scoped) if uniform else ())
    units, n_channels = _units(dg, pooled.scores, scope, min_keep, round_to, pooled.caps(caps) or None,
                               pooled.members)

    axes = EmptiedAxes(dg)

    def valid(taken: _Units | Iterable[_Unit]) -> Plan:
        return repair(dg, Plan(pooled.plan(_plan_of(taken))), scoped, axes)

    if target == "channels" or ratio == 0:
        if scope == "local":
            return pooled.check(valid(units[units.frac <= ratio + 1e-9]))
        # take units in order while the channels removed before each, plus half of it, stay within the goal
        lengths = (units.stop - units.start) * units.mult
        over = np.flatnonzero(np.cumsum(lengths) - lengths / 2 > ratio * n_channels + 1e-9)
        return pooled.check(valid(units[:over[0]] if over.size else units))

    est = CountEstimator(dg)

    def estimated(plan: Plan) -> int:
        return getattr(est.estimate(Removal(dg, plan)), target)

    base = estimated(Plan())
    goal = (1 - ratio) * base
    tol = tolerance * base
    plan = valid(_search(units, lambda t: estimated(valid(t)), goal, tol))
    got = estimated(plan)
    if model is not None:
        def exact(plan: Plan) -> int:
            return getattr(count(apply(model, dg, plan, check=False), example_inputs), target)

        checked = exact(plan)
        if abs(checked - got) > tol / 4:
            warn_user(f"select: the estimated {target} ({got}) differ from the slim model's ({checked}); "
                      "searching on exact counts (slow)", RuntimeWarning)
            base = exact(Plan())
            goal, tol = (1 - ratio) * base, tolerance * base
            plan = valid(_search(units, lambda t: exact(valid(t)), goal, tol))
            checked = exact(plan)
        got = checked
    if abs(got - goal) > tol:
        warn_user(f"select: asked to remove {ratio:.1%} of the {target}, the closest plan removes "
                  f"{1 - got / base:.1%} (floors, round_to, ignored or unscored groups limit it)",
                  RuntimeWarning)
    return pooled.check(plan)
