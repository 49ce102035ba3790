"""Second-order (Optimal Brain Damage) importance with a diagonal Hessian estimate.

OBD (LeCun et al. 1990) scores the removal of weights ``w`` by ``1/2 sum h_ii w_i^2``,
the second-order term of the loss change around a trained minimum (where the gradient
term vanishes). A channel's score sums that over its member slices: by default the
``in`` members, whose zeroing removes the channel exactly (see
:mod:`graphprune.importance.base`); ``roles`` picks others.

The Hessian diagonal ``h`` is estimated by

- ``estimator="fisher"`` (default): the empirical Fisher, the mean over samples of the
  squared per-sample gradient (per-sample gradients through ``torch.func.vmap``,
  looped if an op cannot be vectorised); exact for the Gauss-Newton part of
  likelihood losses at a good fit.
- ``estimator="hutchinson"``: ``E[z * (H z)]`` over ``probes`` Rademacher vectors
  ``z`` per batch (Hessian-vector products by double backward), an unbiased
  estimate of the true Hessian diagonal.

Both sums (and the sample count) are summed over the processes sharing the data under
``graphprune.distributed``: the Fisher estimate then equals the one-process estimate on
the union of the shards; with Hutchinson each rank draws its own probes, so the result
is an estimate of the same diagonal, not the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from graphprune.errors import InputError
from graphprune.importance.base import (
    check_loss,
    eval_mode,
    iterate_data,
    members_with_roles,
    model_device,
    per_channel,
    reduce_sum,
    reducer,
    require_loss_fn,
)
from graphprune.importance.taylor import gradients

__all__ = ["hessian", "hessian_diagonal"]


def _per_sample_sq_grads(model: torch.nn.Module, names: list[str], inputs: tuple, targets: Any,
                         loss_fn: Callable, chunk: int, state: dict) -> dict[str, torch.Tensor]:
    """Sum over the batch of squared per-sample gradients (vectorised when possible)."""
    params = {n: dict(model.named_parameters())[n].detach() for n in names}

    def sample_loss(p: dict[str, torch.Tensor], x: tuple, t: Any) -> torch.Tensor:
        x = tuple(v.unsqueeze(0) for v in x)
        t = pytree.tree_map(lambda v: v.unsqueeze(0) if isinstance(v, torch.Tensor) else v, t)
        return loss_fn(torch.func.functional_call(model, p, x), t).reshape(())

    n = inputs[0].shape[0]
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for start in range(0, n, chunk):
        xs = tuple(v[start:start + chunk] for v in inputs)
        ts = pytree.tree_map(lambda v, s=start: v[s:s + chunk] if isinstance(v, torch.Tensor) else v, targets)
        grads = None
        if state.get("vmap", True):
            try:
                grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, xs, ts)
            except Exception:  # no batching rule somewhere: loop over samples
                state["vmap"] = False
        if grads is not None:
            for k in total:
                total[k] += (grads[k] ** 2).sum(0)
            continue
        for i in range(xs[0].shape[0]):
            xi = tuple(v[i:i + 1] for v in xs)
            ti = pytree.tree_map(lambda v, i=i: v[i:i + 1] if isinstance(v, torch.Tensor) else v, ts)
            _, _, g = gradients(model, names, xi, ti, loss_fn, "hessian", f"on sample {start + i}")
            for k in total:
                total[k] += g[k].detach() ** 2
    return total


def hessian_diagonal(
    model: torch.nn.Module,
    names: Iterable[str],
    *,
    data: Iterable | None,
    loss_fn: Callable | None,
    estimator: str = "fisher",
    probes: int = 4,
    seed: int = 0,
    chunk: int = 32,
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Estimate of the diagonal of the Hessian of the mean loss w.r.t. named parameters."""
    if estimator not in ("fisher", "hutchinson"):
        raise InputError(f"hessian: estimator must be 'fisher' or 'hutchinson', got {estimator!r}")
    if not isinstance(probes, int) or probes < 1:
        raise InputError(f"hessian: probes must be a positive integer, got {probes!r}")
    loss_fn = require_loss_fn(loss_fn, "hessian")
    names = list(names)
    params = dict(model.named_parameters())
    acc = {k: torch.zeros_like(params[k], dtype=torch.float64) for k in names}
    # each process draws its own probes (rank 0, or one process, draws those of ``seed``)
    gen = torch.Generator(device=model_device(model)).manual_seed(seed + 7919 * reducer().rank)
    vstate: dict[str, bool] = {}
    total = 0
    with eval_mode(model):
        for i, (inputs, targets, n) in enumerate(
                iterate_data(data, "hessian", model_device(model), max_batches)):
            if estimator == "fisher":
                with torch.no_grad():  # the per-sample losses must be finite too
                    check_loss(loss_fn(model(*inputs), targets), "hessian", f"on batch {i}")
                sq = _per_sample_sq_grads(model, names, inputs, targets, loss_fn, chunk, vstate)
                for k in names:
                    acc[k] += sq[k].double()
            else:
                _, leaves, grads = gradients(model, names, inputs, targets, loss_fn, "hessian",
                                             f"on batch {i}", create_graph=True)
                flat = [grads[k] for k in names]
                for _ in range(probes):
                    zs = [torch.randint(0, 2, g.shape, generator=gen, device=g.device).to(g.dtype) * 2 - 1
                          for g in flat]
                    hz = torch.autograd.grad(flat, [leaves[k] for k in names], grad_outputs=zs,
                                             retain_graph=True, allow_unused=True)
                    for k, z, h in zip(names, zs, hz):
                        if h is not None:
                            acc[k] += (z * h).detach().double() * (n / probes)
            total += n
    acc, total = reduce_sum(acc, total)  # over the processes sharing the data (identity in one)
    return {k: v / total for k, v in acc.items()}


def hessian(
    model: torch.nn.Module,
    dg: Any,
    *,
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    estimator: str = "fisher",
    probes: int = 4,
    roles: Iterable[str] = ("in",),
    seed: int = 0,
    max_batches: int | None = None,
    **_: Any,
) -> dict[int, np.ndarray]:
    """OBD saliency ``1/2 sum h w^2`` per channel; higher = more important."""
    params = dict(model.named_parameters())
    groups = [g for g in dg.groups if g.prunable]
    members = {g.id: members_with_roles(g, roles, params) for g in groups}
    names = sorted({m.param for ms in members.values() for m in ms})
    h = hessian_diagonal(model, names, data=data, loss_fn=loss_fn, estimator=estimator,
                         probes=probes, seed=seed, max_batches=max_batches)
    out = {}
    for g in groups:
        terms = (per_channel(m, h[m.param] * params[m.param].detach().double() ** 2, g.size)
                 for m in members[g.id])
        out[g.id] = 0.5 * sum(terms, np.zeros(g.size))
    return out
