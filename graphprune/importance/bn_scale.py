"""Normalisation scale (network slimming, Liu et al. ICCV 2017): ``|gamma|`` per channel.

A channel's score is the mean ``|gamma|`` over the normalisation layers of its group
(the ``weight`` operands of ops whose rule is a ``NORM``: BatchNorm, InstanceNorm,
GroupNorm, LayerNorm and RMSNorm with per-channel affine weights, module or functional;
a residual group holds one per branch). Groups without such a layer are not scored, so
selection leaves them whole.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from graphprune.errors import InputError
from graphprune.rules.base import NORM

__all__ = ["bn_scale"]

def bn_scale(model: torch.nn.Module, dg: Any, *, reduce: str = "mean", **_: Any) -> dict[int, np.ndarray]:
    """Mean (or ``reduce="sum"``/``"max"``) ``|gamma|`` of each channel's norm layers.

    >>> import graphprune as gp
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4),
    ...                             torch.nn.Conv2d(4, 2, 1))
    >>> with torch.no_grad():
    ...     _ = model[1].weight.copy_(torch.tensor([0.5, -2.0, 0.25, 1.0]))
    >>> bn_scale(model, gp.DependencyGraph.build(model, torch.randn(1, 3, 4, 4)))[0].tolist()
    [0.5, 2.0, 0.25, 1.0]
    """
    if reduce not in ("mean", "sum", "max"):
        raise InputError(f"bn_scale: reduce must be 'mean', 'sum' or 'max', got {reduce!r}")
    params = dict(model.named_parameters())
    scores: dict[int, np.ndarray] = {}
    for g in dg.groups:
        if not g.prunable:
            continue
        rows = []
        for m in dg.operand_members(g, NORM, "weight"):
            if m.param not in params:
                continue
            w = params[m.param].detach().double()
            if w.dim() != 1:
                continue
            row = np.full(g.size, np.nan)
            row[m.channels] = w[torch.as_tensor(m.positions, device=w.device)].abs().cpu().numpy()
            rows.append(row)
        if rows:
            stack = np.vstack(rows)
            fn = {"mean": np.nanmean, "sum": np.nansum, "max": np.nanmax}[reduce]
            with warnings.catch_warnings():  # channels of the group no norm layer covers
                warnings.simplefilter("ignore", RuntimeWarning)
                s = fn(stack, axis=0)
            scores[g.id] = np.nan_to_num(s, nan=0.0)
    return scores
