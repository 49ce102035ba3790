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
from graphprune.tracing import named_state


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
    state = named_state(model)
    per_axis: dict[tuple[str, int], np.ndarray] = {}  # a tensor axis can serve several groups
    axes_of: dict[str, list[int]] = {}
    for param, dim in dg.member_labels:
        axes_of.setdefault(param, []).append(dim)

    def axis_norms(param: str, dim: int) -> np.ndarray:
        if (param, dim) not in per_axis:
            # one pass over the tensor: |w|^p summed over the axes no group uses (a conv's
            # kernel window), then each used axis from that small tensor
            t = state[param].detach()
            used = sorted(set(axes_of.get(param, [])) | {dim})
            v = t.abs() if p == 1 else t.float().square()
            free = [d for d in range(t.dim()) if d not in used]
            v = v.sum(free) if free else v
            for k, d in enumerate(used):
                other = [j for j in range(len(used)) if j != k]
                per_axis[(param, d)] = (v.sum(other) if other else v).double().cpu().numpy()
        return per_axis[(param, dim)]

    scores: dict[int, np.ndarray] = {}
    for g in dg.groups:
        if not g.prunable:
            continue
        total = np.zeros(g.size)
        for m in g.members:
            if m.role not in roles or m.param not in state:
                continue
            np.add.at(total, m.channels, axis_norms(m.param, m.dim)[m.positions])
        scores[g.id] = total if p == 1 else np.sqrt(total)
    return normalize_scores(scores, normalize)
