"""One call that runs the pipeline: trace, group, score, select, rewrite, count.

``prune(model, example_inputs, method, ratio, ...)`` picks the step planner for
``method`` (a criterion, or LEAN) and runs the one pruning loop (``graphprune.steps``).

>>> import graphprune as gp
>>> model, x = gp.zoo.create("resnet20")
>>> result = gp.prune(model, x, method="magnitude", ratio=0.5)
>>> result.after.macs < result.before.macs
True
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from graphprune.errors import InputError
from graphprune.graph import DependencyGraph
from graphprune.importance import check_options, score
from graphprune.lean import prune as lean_prune
from graphprune.metrics import count
from graphprune.plan import Plan
from graphprune.select import TARGETS, module_names, resolve_ratios, select
from graphprune.steps import Pruner, PruneResult, Step, check_schedule

__all__ = ["PruneResult", "prune", "ScorePlanner", "BUILD_OPTIONS", "step_share"]


BUILD_OPTIONS = ("leaf_modules", "factor", "grouped")  # DependencyGraph.build options gp.prune takes
FACTORS, GROUPED = ("largest", "heads"), ("groups", "channels")


def step_share(r: float, step: Step) -> float:
    """The fraction of what is left that step ``k`` of ``n`` removes so that, after it, ``r * k / n``
    of the original is gone (``r`` after the last step)."""
    n, k = step.steps, step.index
    return 1 - (1 - r * k / n) / (1 - r * (k - 1) / n)


@dataclass
class ScorePlanner:
    """Each step: score with a criterion, then ``select`` the step's share of ``ratio``.

    Step ``k`` of ``n`` brings the amount removed to ``ratio * k / n`` of the original
    (channels of every group, or the model's MACs or parameters); per-module ``ratios``
    and ``max_ratio`` are spread over the steps the same way.
    """

    method: str | Callable
    ratio: float
    example_inputs: Any
    data: Iterable | None = None
    target: str = "channels"
    select_options: dict[str, Any] = field(default_factory=dict)
    criterion_options: dict[str, Any] = field(default_factory=dict)
    tolerance: float = 0.01
    base: int | None = None  # MACs or parameters of the original model, for those targets
    ratios: dict[Any, float] = field(default_factory=dict)  # module names or group ids -> ratio
    max_ratio: float | None = None

    def plan(self, model: torch.nn.Module, dg: DependencyGraph, step: Step) -> Plan:
        scores = score(self.method, model, dg, data=self.data, **self.criterion_options)
        per_group = resolve_ratios(dg, self.ratios, model, strict=step.index == 1) if self.ratios else {}
        options = dict(self.select_options, ignore=step.ignore,
                       ratios={gid: step_share(r, step) for gid, r in per_group.items()} or None,
                       max_ratio=None if self.max_ratio is None else step_share(self.max_ratio, step))
        if self.target == "channels":
            return select(dg, scores, step_share(self.ratio, step), **options)
        n, k = step.steps, step.index
        goal = self.ratio * k / n
        now = getattr(count(model, self.example_inputs), self.target)
        if self.base is None:
            self.base = now
        r = min(max(0.0, 1 - self.base * (1 - goal) / now), 0.999999) if now else 0.0
        return select(dg, scores, r, target=self.target, model=model, example_inputs=self.example_inputs,
                      tolerance=self.tolerance * self.base / max(now, 1), **options)


def prune(
    model: torch.nn.Module,
    example_inputs: Any,
    method: str | Callable = "magnitude",
    ratio: float | Mapping[Any, float] = 0.5,
    data: Iterable | None = None,
    *,
    ratios: Mapping[Any, float] | None = None,
    max_ratio: float | None = None,
    ignore: Iterable[Any] = (),
    leaf_modules: Iterable[type | str] = (),
    factor: str = "largest",
    grouped: str = "groups",
    target: str = "channels",
    scope: str = "local",
    round_to: int | None = None,
    min_keep: int | float = 1,
    normalize: str | bool | None = None,
    uniform: bool = False,
    steps: int = 1,
    callback: Callable[[torch.fx.GraphModule, int], Any] | None = None,
    tolerance: float = 0.01,
    **options: Any,
) -> PruneResult:
    """Prune ``model``: score channels with ``method``, select, rewrite, count.

    Parameters
    ----------
    method
        A criterion in ``graphprune.importance.CRITERIA`` (``magnitude``, ``bn_scale``,
        ``taylor``, ``hessian``, ``oracle``, ``shapley``, ``random`` ...), a callable with
        the criterion signature, or ``"lean"``. ``options`` go to the criterion (``p=1``,
        ``seed=0``, ``loss_fn=...``, ``permutations=5`` ...); an option that neither
        ``prune`` nor the criterion takes raises ``InputError`` naming the valid ones.
        Data-driven criteria need ``data`` (iterable of ``(inputs, targets)``) and ``loss_fn``.
    ratio
        What to remove (see ``target``), or a mapping of per-module ratios (as ``ratios``,
        with nothing removed elsewhere; only with ``target="channels"``, ``scope="local"``).
    ratios
        Per-module ratios: ``{"layer4": 0.7, "fc": 0.0, "blocks.*.mlp": 0.3, model.conv1: 0.2}``
        (names as in ``model.named_modules()`` and everything inside them, glob patterns,
        module objects, or group ids). The most specific entry wins, and a group whose
        producing layers disagree takes the smallest ratio (``gp.select.resolve_ratios``).
        With ``target="channels"`` and ``scope="local"`` the groups they cover lose exactly
        that fraction; otherwise they are ceilings on those groups (the ranking or the
        MACs/params search decides, but never removes more).
    max_ratio
        No group loses more than this fraction of its channels (any scope or target).
    ignore
        Group ids, module names, glob patterns or modules (``[model.fc]``) to leave whole.
    leaf_modules, factor, grouped
        ``DependencyGraph.build`` options: modules kept whole in the trace; ``factor="heads"``
        prunes whole attention heads, ``"largest"`` (default) the per-head dimension;
        ``grouped="channels"`` shrinks grouped convolutions inside every group instead of
        removing whole groups.
    target, scope, tolerance
        ``"channels"`` (of every group with ``scope="local"``, of all channels with
        ``"global"``), ``"macs"`` or ``"params"`` (of the whole model, hit within
        ``tolerance``).
    round_to, min_keep, normalize
        As in ``gp.select``: keep multiples of ``round_to``, at least ``min_keep`` per group,
        rescale scores per group for a global ranking.
    uniform
        Repeated blocks keep one width: the groups that are one layer of different blocks
        (same size, same producer names up to layer indices, ``model.layers.*.mlp.up_proj``)
        each lose the same count, decided from their pooled scores (``gp.select(uniform=True)``),
        as configs (``intermediate_size``, ``num_key_value_heads``) and kernels expect.
    steps, callback
        ``steps=N`` prunes iteratively: each step removes ``ratio / N`` of the original
        amount from the current slim model, re-tracing and re-scoring it, then calls
        ``callback(slim_model, step)`` (step = 1..N, after the last step too), e.g. to
        fine-tune it; a module the callback returns replaces the slim model. To step
        through the loop yourself, iterate a ``graphprune.steps.Pruner``.

    ``method="lean"``: LEAN (``graphprune.lean.prune``); ``ratio`` is the fraction of
    kernels removed, ``steps`` its geometric schedule; options ``criterion``, ``n``,
    ``exclude``, ``mask_kernels``, ``schedule``, ``max_paths``, ``progress``; it takes none of
    the selection options (``ratios``, ``target`` ...), nor ``factor`` or ``grouped``.

    ``model`` is not modified. ``result.plan`` is on the original model's graph
    (``result.graph``): applying it to ``model`` gives the architecture of
    ``result.model``.

    Examples
    --------
    >>> import graphprune as gp
    >>> model, x = gp.zoo.create("mlp")  # fc1 (128) -> fc2 (64) -> fc3 (10)
    >>> r = gp.prune(model, x, ratio=0.5, ratios={"fc2": 0.25}, ignore=[model.fc1])
    >>> r.model.fc1.out_features, r.model.fc2.out_features
    (128, 48)
    >>> gp.prune(model, x, round_to_=8)
    Traceback (most recent call last):
    ...
    graphprune.errors.InputError: gp.prune got unknown option 'round_to_' (did you mean 'round_to'?); ...
    """
    mapped = isinstance(ratio, Mapping)
    if mapped and ratios is not None:
        raise InputError("give per-module ratios once: as ratio={...} or as ratios={...} next to a number ratio")
    if mapped and (scope != "local" or target != "channels") and method != "lean":
        raise InputError(f"with target={target!r} and scope={scope!r} per-module ratios are ceilings and the "
                         "overall amount is a number: pass ratio=0.5 (say) and ratios={...}")
    ratios, ratio = (dict(ratio), 0.0) if mapped else (dict(ratios or {}), ratio)
    check_schedule(ratio, steps, callback)
    if factor not in FACTORS:
        raise InputError(f"factor must be one of {FACTORS}, got {factor!r}")
    if grouped not in GROUPED:
        raise InputError(f"grouped must be one of {GROUPED}, got {grouped!r}")
    names = _own_keywords()
    if method == "lean":  # LEAN keeps kernels along chains, then channels: see graphprune.lean.prune
        _check_lean(options, names, data=data, ratios=ratios or None, max_ratio=max_ratio, target=target,
                    scope=scope, round_to=round_to, min_keep=min_keep, normalize=normalize,
                    tolerance=tolerance, factor=factor, grouped=grouped, uniform=uniform)
        return lean_prune(model, example_inputs, ratio, steps=steps, callback=callback, ignore=ignore,
                          leaf_modules=leaf_modules, **options)
    check_options(method, options, also=names, caller="gp.prune")
    if target not in TARGETS:
        raise InputError(f"target must be 'channels', 'macs' or 'params', got {target!r}")
    if steps > 1 and any(isinstance(k, int) for k in ratios):
        raise InputError("ratios keyed by group id work with steps=1 only (group ids change as the model is "
                         "re-traced); key them by module name")
    named: dict[Any, float] = {}
    for key, r in ratios.items():  # module objects by name: the slim models of later steps keep names
        for k in (module_names(None, key, model) if isinstance(key, torch.nn.Module) else [key]):
            named[k] = r
    if steps > 1 and data is not None and iter(data) is data:
        data = list(data)  # a one-shot iterator: every step scores on the same batches
    planner = ScorePlanner(method, ratio, example_inputs, data, target,
                           dict(scope=scope, min_keep=min_keep, round_to=round_to, normalize=normalize,
                                uniform=uniform),
                           options, tolerance, ratios=named, max_ratio=max_ratio)
    return Pruner(model, example_inputs, planner, steps=steps, ignore=ignore,
                  leaf_modules=leaf_modules, factor=factor, grouped=grouped).run(callback)


def _own_keywords() -> tuple[str, ...]:
    params = inspect.signature(prune).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY or p.name in ("method", "ratio", "data"))


_LEAN_DEFAULTS = dict(data=None, ratios=None, max_ratio=None, target="channels", scope="local", round_to=None,
                      min_keep=1, normalize=None, tolerance=0.01, factor="largest", grouped="groups",
                      uniform=False)


def _check_lean(options: Mapping[str, Any], names: tuple[str, ...], **given: Any) -> None:
    """LEAN takes its own options and none of the selection or build options it would ignore."""
    ignored = [k for k, v in given.items() if v != _LEAN_DEFAULTS[k]]
    if ignored:
        raise InputError(f"method='lean' does not take {', '.join(ignored)} (it keeps kernels along chains; "
                         "see graphprune.lean.prune)")
    params = inspect.signature(lean_prune).parameters
    valid = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k not in names]
    unknown = [k for k in options if k not in valid]
    if unknown:
        hints = [f"{k!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, [*names, *valid], 1))
                             else "") for k in unknown]
        raise InputError(f"gp.prune got unknown option{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                         f"method='lean' takes {', '.join(valid)}")
