"""Unstructured to structured (Han et al. 2015): magnitude-prune single weights, then remove the
channels that the sparsity killed.

A channel is *dead* when either
- all its outgoing weights are zero: every ``in`` member slice (the consumers' input columns);
  removing it is exact whatever the channel computes; or
- all its incoming parameters are zero: every ``out`` and ``pass`` parameter slice (filter rows,
  biases, norm scales and shifts). The channel then computes ``f(0)`` everywhere, so removal is
  exact for activations with ``f(0) = 0`` (ReLU, GELU, SiLU, tanh); ``to_structured`` reports the
  measured deviation so a violation cannot go unnoticed.

``magnitude_sparsify`` zeroes the smallest weights (global or per-tensor threshold) and returns
masks; ``WeightMask`` keeps them zero during retraining (a ``finetune`` plugin).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from graphprune.errors import InputError
from graphprune.graph import DependencyGraph
from graphprune.plan import Plan
from graphprune.rewrite import apply
from graphprune.tracing import bind_inputs, fresh_inputs
from graphprune.train.masking import member_params

__all__ = ["magnitude_sparsify", "WeightMask", "dead_channels", "to_structured", "StructuredResult"]


def magnitude_sparsify(model: nn.Module, sparsity: float, *, scope: str = "global",
                       include_1d: bool = False, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Zero the ``sparsity`` fraction of smallest-magnitude weights in place; return the keep masks.

    Weights of 2+ dimensions (conv/linear) by default; ``include_1d`` adds biases and norm
    parameters. ``scope="global"`` uses one threshold over all of them, ``"layer"`` one per tensor.
    """
    if not 0 <= sparsity < 1:
        raise InputError(f"sparsity must be in [0, 1), got {sparsity!r}")
    chosen = set(names) if names is not None else None
    params = {n: p for n, p in model.named_parameters()
              if (chosen is None or n in chosen) and (p.dim() >= 2 or include_1d)}
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if scope == "global":
            allw = torch.cat([p.detach().abs().flatten() for p in params.values()]) if params else torch.zeros(0)
            k = int(sparsity * allw.numel())
            thr = allw.kthvalue(k).values if k > 0 else torch.tensor(-1.0)
            for n, p in params.items():
                masks[n] = p.detach().abs() > thr
        elif scope == "layer":
            for n, p in params.items():
                k = int(sparsity * p.numel())
                thr = p.detach().abs().flatten().kthvalue(k).values if k > 0 else torch.tensor(-1.0)
                masks[n] = p.detach().abs() > thr
        else:
            raise InputError(f"scope must be 'global' or 'layer', got {scope!r}")
        for n, p in params.items():
            p.mul_(masks[n])
    return masks


class WeightMask:
    """``finetune`` plugin that keeps pruned weights at zero (gradients and values)."""

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks

    def after_backward(self, model: nn.Module) -> None:
        params = member_params(model, buffers=False)
        for n, m in self.masks.items():
            p = params.get(n)
            if p is not None and p.grad is not None:
                p.grad.mul_(m)

    def after_step(self, model: nn.Module) -> None:
        params = member_params(model, buffers=False)
        with torch.no_grad():
            for n, m in self.masks.items():
                if n in params:
                    params[n].mul_(m)


def _zero_slice(t: torch.Tensor, dim: int, positions: list[int], atol: float) -> bool:
    if not positions:
        return True
    return bool((t.detach().index_select(dim, torch.as_tensor(positions, device=t.device)).abs() <= atol).all())


def dead_channels(model: nn.Module, dg: DependencyGraph, *, atol: float = 0.0,
                  mode: str = "both") -> Plan:
    """Plan removing the dead channels of every prunable group (see the module notes).

    ``mode``: ``"outgoing"``, ``"incoming"`` or ``"both"``. Each group keeps at least one channel
    unless it may vanish entirely (``removable``).
    """
    if mode not in ("outgoing", "incoming", "both"):
        raise InputError(f"mode must be 'outgoing', 'incoming' or 'both', got {mode!r}")
    state = member_params(model)
    params = member_params(model, buffers=False)
    removed: dict[int, list[int]] = {}
    for g in dg.groups:
        if not g.prunable:
            continue
        ins = [m for m in g.members if m.role == "in"]
        feeds = [m for m in g.members if m.role in ("out", "pass") and m.param in params]
        if any(m.param not in state for m in ins):
            ins = []  # a consumer we cannot read: outgoing test not possible
        dead = []
        for c in range(g.size):
            out_dead = bool(ins) and all(_zero_slice(state[m.param], m.dim, m.indices([c]), atol) for m in ins)
            in_dead = bool(feeds) and all(_zero_slice(params[m.param], m.dim, m.indices([c]), atol)
                                          for m in feeds)
            if (mode in ("outgoing", "both") and out_dead) or (mode in ("incoming", "both") and in_dead):
                dead.append(c)
        if len(dead) == g.size and not g.removable:
            dead = dead[1:]
        if dead:
            removed[g.id] = dead
    return Plan(removed)


@dataclass
class StructuredResult:
    """Slim model, the plan of dead channels, and max |sparse - slim| on the example inputs."""

    model: torch.fx.GraphModule
    plan: Plan
    max_error: float


def to_structured(model: nn.Module, example_inputs: Any, *, dg: DependencyGraph | None = None,
                  atol: float = 0.0, mode: str = "both") -> StructuredResult:
    """Remove ``model``'s dead channels (``model`` untouched) and measure the deviation."""
    bound = bind_inputs(model, example_inputs)
    inputs = bound.tensors
    dg = dg or DependencyGraph.build(model, example_inputs)
    plan = dead_channels(model, dg, atol=atol, mode=mode)
    slim = apply(model, dg, plan)
    was, swas = model.training, slim.training
    model.eval()
    slim.eval()
    try:
        with torch.no_grad():
            a, b = bound.run(model, fresh_inputs(inputs)), slim(*fresh_inputs(inputs))
    finally:
        model.train(was)
        slim.train(swas)
    flat = lambda o: [o] if isinstance(o, torch.Tensor) else [t for x in o for t in flat(x)]  # noqa: E731
    err = max((float((x.double() - y.double()).abs().max()) for x, y in zip(flat(a), flat(b)) if x.numel()),
              default=0.0)
    return StructuredResult(slim, plan, err)
