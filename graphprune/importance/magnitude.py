"""Weight magnitude (Li et al. 2017, "Pruning filters for efficient ConvNets"), per group.

A channel's score is the Lp norm of every parameter slice it owns in its group:
producer rows, consumer columns and per-channel state, all concatenated.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from graphprune.errors import InputError
from graphprune.importance.base import normalize_scores


def magnitude(
    model: torch.nn.Module,
    dg: Any,
    *,
    p: int = 2,
    roles: Iterable[str] = ("out", "in"),
    normalize: bool | str | None = False,
    **_: Any,
) -> dict[int, np.ndarray]:
    """Lp norm of each channel's slices; ``roles`` picks which member kinds count.

    ``normalize`` rescales each group (``"max"``, ``"mean"``, ``"sum"``, ``"std"``; ``True``
    is ``"max"``) so scores compare across groups in a global ranking.

    >>> import torch, graphprune as gp
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.fill_(1.0), model[0].weight[1].zero_(), model[1].weight.fill_(1.0)
    >>> dg = gp.DependencyGraph.build(model, torch.randn(1, 2))
    >>> int(np.argmin(magnitude(model, dg, p=1)[0]))
    1
    """
    if p not in (1, 2):
        raise InputError(f"magnitude p must be 1 or 2, got {p!r}")
    roles = set(roles)
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    per_axis: dict[tuple[str, int], np.ndarray] = {}  # a tensor axis can serve several groups

    def axis_norms(param: str, dim: int) -> np.ndarray:
        if (param, dim) not in per_axis:
            t = state[param].detach()
            other = [d for d in range(t.dim()) if d != dim]
            # float32 sums (torch sums pairwise): several times faster than float64 ones
            v = t.abs() if p == 1 else t.float().square()
            v = v.sum(other) if other else v
            per_axis[(param, dim)] = v.double().cpu().numpy()
        return per_axis[(param, dim)]

    scores: dict[int, np.ndarray] = {}
    for g in dg.groups:
        if not g.prunable:
            continue
        total = np.zeros(g.size)
        for m in g.members:
            if m.role not in roles or m.param not in state:
                continue
            np.add.at(total, np.asarray(m.channels), axis_norms(m.param, m.dim)[list(m.positions)])
        scores[g.id] = total if p == 1 else np.sqrt(total)
    return normalize_scores(scores, normalize)
