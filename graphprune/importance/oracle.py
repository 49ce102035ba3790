"""Oracle: the exact loss change when each channel alone is removed.

For every channel ``c`` of every prunable group, ``score[c] = L(model without c) -
L(model)``, the mean loss over ``data`` (batches weighted by their size). Removal is
exact masking (see :mod:`graphprune.importance.base`), so the number equals the loss of
``gp.apply(model, dg, {group: [c]})`` minus the model's loss. It costs one forward of
the downstream part of the network per channel per batch; ``batch_ablations``
ablations run in one vectorised call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from graphprune.importance.base import (
    Ablator,
    model_device,
    prepare_data,
    require_loss_fn,
)

__all__ = ["oracle"]


def oracle(
    model: torch.nn.Module,
    dg: Any,
    *,
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    batch_ablations: int | None = None,
    max_batches: int | None = None,
    groups: Iterable[int] | None = None,
    progress: bool | None = False,
    **_: Any,
) -> dict[int, np.ndarray]:
    """Loss increase of removing each channel alone; higher = more important.

    ``groups`` restricts the work to some group ids; ``progress=None`` shows a bar on
    a terminal, ``True`` always.
    """
    loss_fn = require_loss_fn(loss_fn, "oracle")
    batches = prepare_data(data, "oracle", model_device(model), max_batches)
    wanted = None if groups is None else {int(g) for g in groups}
    todo = [g for g in dg.groups if g.prunable and (wanted is None or g.id in wanted)]
    scores: dict[int, np.ndarray] = {}
    bar = tqdm(todo, desc="oracle", unit="group", disable=None if progress is None else not progress)
    for g in bar:
        ab = Ablator(model, dg, g, batches, loss_fn, name="oracle", chunk=batch_ablations)
        removed = np.vstack([np.zeros(g.size, bool), np.eye(g.size, dtype=bool)])
        losses = ab.losses(removed)
        scores[g.id] = losses[1:] - losses[0]
    return scores
