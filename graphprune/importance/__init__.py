"""Channel importance criteria. Each returns ``{group id: scores}``, higher = keep.

Every criterion has the signature ``fn(model, dg, *, data=None, loss_fn=None,
**options) -> dict[int, np.ndarray]`` with one score per channel of each prunable
group it scores. A group's score combines all its member slices (producer rows,
consumer columns, per-channel state). Criteria are looked up by name in ``CRITERIA``;
``score(method, ...)`` dispatches and checks the result.

=============  ==========================================================  ========
name           what                                                        data
=============  ==========================================================  ========
``magnitude``  L1/L2 norm of the member slices (``p=1|2``, ``normalize``)  no
``l1``/``l2``  ``magnitude`` with ``p`` fixed                              no
``bn_scale``   ``|gamma|`` of the group's norm layers (network slimming)   no
``random``     uniform, seeded (``seed``)                                  no
``taylor``     first-order Taylor ``(sum g*w)^2`` (Molchanov et al. 2019)  yes
``hessian``    OBD ``1/2 sum h w^2``, Fisher or Hutchinson diagonal        yes
``oracle``     exact loss change of removing each channel alone            yes
``shapley``    permutation-sampled Shapley value (Ancona et al. 2020)      yes
=============  ==========================================================  ========

Data-driven criteria take ``data`` (an iterable of ``(inputs, targets)``) and
``loss_fn(outputs, targets) -> scalar``; they evaluate the model in eval mode and never
modify it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from graphprune.errors import InputError, PlanError
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
    "taylor", "hessian", "oracle", "shapley", "normalize_scores",
]

CRITERIA: dict[str, Callable[..., dict[int, np.ndarray]]] = {
    "magnitude": magnitude,
    "l1": lambda model, dg, **kw: magnitude(model, dg, **{**kw, "p": 1}),
    "l2": lambda model, dg, **kw: magnitude(model, dg, **{**kw, "p": 2}),
    "bn_scale": bn_scale,
    "random": random_scores,
    "taylor": taylor,
    "hessian": hessian,
    "oracle": oracle,
    "shapley": shapley,
}

DATA_DRIVEN = {"taylor", "hessian", "oracle", "shapley"}


def score(method: str | Callable, model: Any, dg: Any, **options: Any) -> dict[int, np.ndarray]:
    """Scores of the prunable groups' channels by criterion ``method`` (a name or a callable).

    >>> import torch, graphprune as gp
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> dg = gp.DependencyGraph.build(model, torch.randn(1, 2))
    >>> sorted(score("random", model, dg, seed=1))
    [0]
    """
    if callable(method):
        fn, name = method, getattr(method, "__name__", "criterion")
    elif method in CRITERIA:
        fn, name = CRITERIA[method], method
    else:
        raise InputError(f"unknown method {method!r}; choose one of {sorted(CRITERIA)}")
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
