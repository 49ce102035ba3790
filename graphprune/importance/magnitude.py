"""Weight magnitude (Li et al. 2017, "Pruning filters for efficient ConvNets"), per group.

A channel's score is the Lp norm of every parameter slice it owns in its group:
producer rows, consumer columns and per-channel state, all concatenated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
    state = named_state(model)
    axes = member_axes(dg)
    per_axis: dict[tuple[str, int], np.ndarray] = {}
    for param in needed_params(dg, roles):
        if param in state:
            per_axis.update({(param, d): v for d, v in axis_norms(state[param].detach(), axes[param], p).items()})
    return group_norms(dg, per_axis, p=p, roles=roles, normalize=normalize)


def member_axes(dg: Any) -> dict[str, list[int]]:
    """The axes of each parameter or buffer that some group's members slice."""
    axes: dict[str, list[int]] = {}
    for param, dim in dg.member_labels:
        axes.setdefault(param, []).append(dim)
    return axes


def needed_params(dg: Any, roles: Iterable[str] = ("out", "in")) -> list[str]:
    """The tensors whose slices the prunable groups' members of ``roles`` own, in member order."""
    roles = set(roles)
    return list(dict.fromkeys(m.param for g in dg.groups if g.prunable for m in g.members if m.role in roles))


def axis_norms(t: torch.Tensor, dims: Iterable[int], p: int, *, inplace: bool = False) -> dict[int, np.ndarray]:
    """``|t|^p`` summed over every axis but one, for each axis in ``dims`` (float64 arrays).

    One pass over the tensor: the axes no group uses (a conv's kernel window) are summed
    first, then each used axis from that small tensor. ``inplace`` lets a float32 ``t``
    that nothing else reads (one just read from a file) be overwritten instead of copied.
    """
    used = sorted(set(dims))
    # at most one new tensor: |t|, or a float32 copy squared in place (the same numbers)
    if inplace and t.dtype == torch.float32:
        v = t.abs_() if p == 1 else t.square_()
    else:
        v = t.abs() if p == 1 else t.to(torch.float32, copy=True).square_()
    free = [d for d in range(t.dim()) if d not in used]
    v = v.sum(free) if free else v
    out = {}
    for k, d in enumerate(used):
        other = [j for j in range(len(used)) if j != k]
        out[d] = (v.sum(other) if other else v).double().cpu().numpy()
    return out


def group_norms(dg: Any, per_axis: Mapping[tuple[str, int], np.ndarray], *, p: int,
                roles: Iterable[str] = ("out", "in"), normalize: bool | str | None = False) -> dict[int, np.ndarray]:
    """Each prunable group's channel norms from the ``(param, dim) -> sum of |w|^p`` arrays
    of ``axis_norms``; members whose axis is not in ``per_axis`` are left out."""
    roles = set(roles)
    scores: dict[int, np.ndarray] = {}
    for g in dg.groups:
        if not g.prunable:
            continue
        total = np.zeros(g.size)
        for m in g.members:
            if m.role not in roles or (m.param, m.dim) not in per_axis:
                continue
            np.add.at(total, m.channels, per_axis[(m.param, m.dim)][m.positions])
        scores[g.id] = total if p == 1 else np.sqrt(total)
    return normalize_scores(scores, normalize)
