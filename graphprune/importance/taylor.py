"""First-order Taylor importance (Molchanov et al., "Importance Estimation for Neural
Network Pruning", CVPR 2019), per group.

For a batch, ``g`` is the gradient of the mean loss and the group's score of channel
``c`` is ``(sum over the channel's member slices of g * w)^2``; scores are averaged over
the batches (weighted by batch size).

Which slices: by default the ``in`` members, the input columns of the layers that read
the channel. Zeroing them removes the channel exactly (see
:mod:`graphprune.importance.base`), so ``-sum(g * w)`` over them is the first-order
Taylor expansion of the loss change of that removal; it equals the gradient of a gate
on the channel's activation (Molchanov's best-performing variant). ``roles=("out", "in",
"pass")`` sums every parameter slice of the group instead, as torch-pruning does.
With ``square=False`` the score is the signed first-order estimate of the loss
increase, ``-sum(g * w)``, in the units of ``oracle``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from graphprune.importance.base import (
    check_loss,
    eval_mode,
    iterate_data,
    members_with_roles,
    model_device,
    per_channel,
    reduce_sum,
    require_loss_fn,
)

__all__ = ["taylor", "gradients"]


def gradients(
    model: torch.nn.Module, names: Iterable[str], inputs: tuple, targets: Any,
    loss_fn: Callable, name: str, where: str, *, create_graph: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Loss and its gradient w.r.t. the named parameters, without touching ``.grad``."""
    state = dict(model.named_parameters())
    leaves = {n: state[n].detach().requires_grad_(True) for n in names}
    out = torch.func.functional_call(model, leaves, inputs)
    loss = check_loss(loss_fn(out, targets), name, where)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, create_graph=create_graph)
    return loss, leaves, {n: (g if g is not None else torch.zeros_like(leaves[n]))
                          for n, g in zip(leaves, grads)}


def taylor(
    model: torch.nn.Module,
    dg: Any,
    *,
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    roles: Iterable[str] = ("in",),
    square: bool = True,
    max_batches: int | None = None,
    **_: Any,
) -> dict[int, np.ndarray]:
    """First-order Taylor score per channel; higher = more important."""
    loss_fn = require_loss_fn(loss_fn, "taylor")
    params = dict(model.named_parameters())
    groups = [g for g in dg.groups if g.prunable]
    members = {g.id: members_with_roles(g, roles, params) for g in groups}
    names = sorted({m.param for ms in members.values() for m in ms})
    acc = {g.id: np.zeros(g.size) for g in groups}
    total = 0
    with eval_mode(model):
        for i, (inputs, targets, n) in enumerate(
                iterate_data(data, "taylor", model_device(model), max_batches)):
            _, leaves, grads = gradients(model, names, inputs, targets, loss_fn, "taylor", f"on batch {i}")
            prod = {k: (grads[k] * leaves[k]).detach() for k in names}
            for g in groups:
                s = sum((per_channel(m, prod[m.param], g.size) for m in members[g.id]), np.zeros(g.size))
                acc[g.id] += n * (s * s if square else -s)
            total += n
    acc, total = reduce_sum(acc, total)  # over the processes sharing the data (identity in one)
    return {gid: a / total for gid, a in acc.items()}
