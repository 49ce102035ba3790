"""Channel importance criteria. Each returns ``{group id: scores}``, higher = keep.

Every criterion has the signature ``fn(model, dg, *, data=None, loss_fn=None,
**options) -> dict[int, np.ndarray]`` with one score per channel of each prunable
group it scores. A group's score combines all its member slices (producer rows,
consumer columns, per-channel state). Criteria are looked up by name in ``CRITERIA``;
``score(method, ...)`` dispatches and checks the result.

==============  ===========================================================  ====
name            what                                                         data
==============  ===========================================================  ====
``magnitude``   L1/L2 norm of the member slices (``p=1|2``, ``normalize``)   no
``l1``/``l2``   ``magnitude`` with ``p`` fixed                               no
``bn_scale``    ``|gamma|`` of the group's norm layers (network slimming)    no
``random``      uniform, seeded (``seed``)                                   no
``taylor``      first-order Taylor ``(sum g*w)^2`` (Molchanov et al. 2019)   yes
``hessian``     OBD ``1/2 sum h w^2``, Fisher or Hutchinson diagonal         yes
``oracle``      exact loss change of removing each channel alone             yes
``shapley``     permutation-sampled Shapley value (Ancona et al. 2020)       yes
``activation``  Wanda ``|W| * ||X||`` on calibration data (Sun et al. 2023)  yes
==============  ===========================================================  ====

Data-driven criteria take ``data`` (an iterable of ``(inputs, targets)``) and
``loss_fn(outputs, targets) -> scalar``; they evaluate the model in eval mode and never
modify it. ``activation`` needs no loss: its batches may also be bare inputs or dicts of
keyword arguments (Hugging Face style).

Options are checked: every criterion takes ``data`` and ``loss_fn`` (the common
signature) plus its own keyword parameters; ``score`` raises ``InputError`` for any other
option, naming the valid ones (``criterion_options``). A criterion whose catch-all is
``**_`` ignores the common options it does not use; a callable whose catch-all has another
name (``**options``) receives every option unchecked.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from graphprune.errors import InputError, PlanError
from graphprune.importance.activation import activation
from graphprune.importance.base import LossError, normalize_scores
from graphprune.importance.bn_scale import bn_scale
from graphprune.importance.hessian import hessian
from graphprune.importance.magnitude import magnitude
from graphprune.importance.oracle import oracle
from graphprune.importance.random import random_scores
from graphprune.importance.shapley import shapley
from graphprune.importance.taylor import taylor
from graphprune.tracing import require_values

__all__ = [
    "CRITERIA", "DATA_DRIVEN", "LossError", "score", "magnitude", "random_scores", "bn_scale",
    "taylor", "hessian", "oracle", "shapley", "activation", "normalize_scores", "COMMON_OPTIONS", "criterion_options",
    "check_options",
]

COMMON_OPTIONS = ("data", "loss_fn")  # every criterion takes them (data-free ones ignore them)


def _fixed(fn: Callable, name: str, **fixed: Any) -> Callable:
    """``fn`` with some keyword options fixed (``l1`` is ``magnitude`` with ``p=1``); its
    signature lists the options that remain."""
    def criterion(model: Any, dg: Any, **options: Any) -> dict[int, np.ndarray]:
        return fn(model, dg, **{**options, **fixed})

    sig = inspect.signature(fn)
    criterion.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name not in fixed])
    criterion.__name__ = criterion.__qualname__ = name
    criterion.__doc__ = f"``{fn.__name__}`` with {', '.join(f'{k}={v!r}' for k, v in fixed.items())}."
    return criterion

CRITERIA: dict[str, Callable[..., dict[int, np.ndarray]]] = {
    "magnitude": magnitude,
    "l1": _fixed(magnitude, "l1", p=1),
    "l2": _fixed(magnitude, "l2", p=2),
    "bn_scale": bn_scale,
    "random": random_scores,
    "taylor": taylor,
    "hessian": hessian,
    "oracle": oracle,
    "shapley": shapley,
    "activation": activation,
}

DATA_DRIVEN = {"taylor", "hessian", "oracle", "shapley", "activation"}


def _criterion(method: str | Callable) -> tuple[Callable, str]:
    if callable(method):
        return method, getattr(method, "__name__", "criterion")
    if isinstance(method, str) and method in CRITERIA:
        return CRITERIA[method], method
    raise InputError(f"unknown method {method!r}; choose one of {sorted(CRITERIA)}")


def criterion_options(method: str | Callable) -> tuple[str, ...] | None:
    """The keyword options criterion ``method`` takes, ``data`` and ``loss_fn`` included;
    None when it takes any option (a catch-all ``**kwargs`` not named ``_``).

    >>> criterion_options("l1")
    ('data', 'loss_fn', 'roles', 'normalize')
    >>> criterion_options(lambda model, dg, **options: {}) is None
    True
    """
    fn, _ = _criterion(method)
    try:
        params = list(inspect.signature(fn).parameters.values())[2:]  # after (model, dg)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check against
        return None
    if any(p.kind is p.VAR_KEYWORD and not p.name.startswith("_") for p in params):
        return None
    own = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return tuple(dict.fromkeys([*COMMON_OPTIONS, *own]))


def check_options(method: str | Callable, options: Iterable[str] | Mapping[str, Any], *,
                  also: Iterable[str] = (), caller: str = "score") -> None:
    """Raise ``InputError`` naming every option in ``options`` that criterion ``method`` does
    not take (nor ``also``, the caller's own keywords), with the valid ones and close matches.

    >>> check_options("magnitude", {"p": 1})
    >>> check_options("magnitude", {"pp": 3})
    Traceback (most recent call last):
    ...
    graphprune.errors.InputError: score got unknown option 'pp' (did you mean 'p'?); criterion 'magnitude' takes data, loss_fn, p, roles, normalize
    """
    valid = criterion_options(method)
    if valid is None:
        return
    also = tuple(also)
    unknown = [k for k in options if k not in valid and k not in also]
    if not unknown:
        return
    _, name = _criterion(method)
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, [*also, *valid], n=1, cutoff=0.6)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    what = "option" if len(unknown) == 1 else "options"
    raise InputError(f"{caller} got unknown {what} {', '.join(hints)}; criterion {name!r} takes "
                     f"{', '.join(valid)}" + (f"; {caller} itself takes {', '.join(also)}" if also else ""))


def score(method: str | Callable, model: Any, dg: Any, **options: Any) -> dict[int, np.ndarray]:
    """Scores of the prunable groups' channels by criterion ``method`` (a name or a callable).

    ``options`` go to the criterion; one it does not take raises ``InputError``
    (see ``check_options``).

    >>> import torch, graphprune as gp
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> dg = gp.DependencyGraph.build(model, torch.randn(1, 2))
    >>> sorted(score("random", model, dg, seed=1))
    [0]
    """
    fn, name = _criterion(method)
    check_options(method, options)
    if name != "random":
        require_values(model, f"criterion {name!r}")
    raw = fn(model, dg, **options)
    out: dict[int, np.ndarray] = {}
    for gid, s in raw.items():
        gid = int(gid)
        s = np.asarray(s, dtype=np.float64)
        if not 0 <= gid < len(dg.groups) or s.shape != (dg.groups[gid].size,):
            raise PlanError(f"criterion {name!r} returned scores of shape {s.shape} for group {gid}, "
                            f"which does not fit the graph")
        out[gid] = s
    return out
