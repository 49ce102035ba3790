"""Random scores, seeded: the baseline every criterion must beat."""

from __future__ import annotations

from typing import Any

import numpy as np


def random_scores(model: Any, dg: Any, *, seed: int = 0, **_: Any) -> dict[int, np.ndarray]:
    """Uniform random score per channel, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return {g.id: rng.random(g.size) for g in dg.groups if g.prunable}
