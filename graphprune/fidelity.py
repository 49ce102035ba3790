"""Does a traced graph compute what the model computes?

Symbolic tracing replays ``forward`` with proxies, and a few Python constructs record
something other than what eager execution does. An augmented assignment through an alias
(``y = x; y += 1``) changes ``x`` eagerly, but a Proxy has no ``__iadd__``, so Python falls
back to ``y = y + 1`` and later reads of ``x`` see the unchanged input. ``trace`` therefore
runs the model once more, eagerly, on copies of the same inputs from the same random
state, and compares the two outputs with ``outputs_differ``; a graph that differs is
replaced by the ``torch.export`` graph (which functionalises in-place updates) or refused.

>>> import torch
>>> outputs_differ((torch.ones(2),), (torch.ones(2),)) is None
True
>>> outputs_differ(torch.ones(2), torch.zeros(2))
'output 0 differs by 1 (largest |value| 0)'
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["outputs_differ", "same_random_state", "TOLERANCE"]

TOLERANCE = 1e-4
"""Largest difference allowed, relative to ``max(1, largest |value|)`` of the output."""


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def outputs_differ(got: Any, want: Any, tolerance: float = TOLERANCE) -> str | None:
    """``None`` if the tensors in ``got`` match those in ``want`` (same count, shapes and
    dtypes; values within ``tolerance`` relative to the output's scale, equal infinities and
    NaNs at the same places), else a sentence naming the first difference."""
    got_t, want_t = _tensors(got), _tensors(want)
    if len(got_t) != len(want_t):
        return f"the graph returns {len(got_t)} tensor(s), the model {len(want_t)}"
    for i, (a, b) in enumerate(zip(got_t, want_t)):
        if isinstance(a, FakeTensor):
            return f"output {i} is a fake tensor left from tracing (a tensor the forward cached on a module)"
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {i} is {a.dtype} {tuple(a.shape)} in the graph, {b.dtype} {tuple(b.shape)} in the model"
        if a.device.type == "meta" or b.numel() == 0:
            continue
        if not (a.is_floating_point() or a.is_complex()):
            if not torch.equal(a, b):
                return f"output {i} ({a.dtype}) differs at {int((a != b).sum())} place(s)"
            continue
        a, b = a.detach().double(), b.detach().double()
        same = (a == b) | (a.isnan() & b.isnan())
        if bool(same.all()):
            continue
        finite = b.isfinite()
        if bool((~same & ~(finite & a.isfinite())).any()):
            return f"output {i} has infinities or NaNs at other places than the model's"
        diff = float((a - b).abs()[~same].max())
        scale = float(b[finite].abs().max()) if bool(finite.any()) else 0.0
        if diff > tolerance * max(1.0, scale):
            return f"output {i} differs by {diff:.3g} (largest |value| {scale:.3g})"
    return None


@contextlib.contextmanager
def same_random_state(seed: int = 0) -> Iterator[None]:
    """Run the body from a fixed random state, leaving the global generators as they were
    (so two runs that draw the same random numbers in the same order agree)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
