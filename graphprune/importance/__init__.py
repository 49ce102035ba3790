"""Channel importance criteria. Each returns ``{group id: scores}``, higher = keep.

Criteria are looked up by name in ``CRITERIA``; ``score(method, ...)`` dispatches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from graphprune.errors import InputError
from graphprune.importance.magnitude import magnitude
from graphprune.importance.random import random_scores

__all__ = ["CRITERIA", "score", "magnitude", "random_scores"]

CRITERIA: dict[str, Callable[..., dict[int, np.ndarray]]] = {
    "magnitude": magnitude,
    "l1": lambda model, dg, **kw: magnitude(model, dg, p=1, **kw),
    "l2": lambda model, dg, **kw: magnitude(model, dg, p=2, **kw),
    "random": random_scores,
}


def score(method: str, model: Any, dg: Any, **options: Any) -> dict[int, np.ndarray]:
    """Scores of every prunable group's channels by criterion ``method``."""
    if method not in CRITERIA:
        raise InputError(f"unknown method {method!r}; choose one of {sorted(CRITERIA)}")
    return CRITERIA[method](model, dg, **options)
