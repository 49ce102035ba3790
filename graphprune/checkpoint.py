"""Trained weights for a model built from its code: ``load_checkpoint(model, path)``.

The command line's ``--checkpoint FILE`` (``graphprune.sources.resolve(..., checkpoint=)``)
goes through here: a state dict saved with ``torch.save`` (read with
``weights_only=True``, so no pickled code runs) or a ``.safetensors`` file.

>>> import torch, tempfile, os
>>> model = torch.nn.Linear(2, 3)
>>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
>>> torch.save({"state_dict": torch.nn.Linear(2, 3).state_dict(), "epoch": 7}, path)
>>> load_checkpoint(model, path) is model
True
>>> load_checkpoint(torch.nn.Linear(2, 4), path)
Traceback (most recent call last):
...
graphprune.errors.InputError: checkpoint '...' does not fit Linear: 2 wrong shape (weight is (3, 2) in the file, (4, 2) in the model, ...
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from graphprune.errors import InputError

__all__ = ["load_checkpoint"]

_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "net")  # {"state_dict": {...}, "epoch": 3}


def _state_dict(blob: Any, label: str) -> dict[str, torch.Tensor]:
    if isinstance(blob, Mapping) and not any(isinstance(v, torch.Tensor) for v in blob.values()):
        inner = [blob[k] for k in _WRAPPERS if isinstance(blob.get(k), Mapping)]
        blob = inner[0] if inner else blob
    if not isinstance(blob, Mapping) or not blob or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in blob.items()):
        raise InputError(f"{label} holds a {type(blob).__name__}, not a state dict (parameter names -> "
                         "tensors, as saved by torch.save(model.state_dict(), path))")
    state = dict(blob)
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load trained weights from ``path`` into ``model`` (in place) and return it.

    ``path`` is a ``torch.save`` file (read with ``weights_only=True``) or a ``.safetensors``
    file holding a state dict, possibly wrapped as ``{"state_dict": ...}`` or ``{"model": ...}``
    and with DataParallel's ``module.`` prefixes. Every parameter and buffer must be there
    with its shape; raises ``InputError`` naming what does not fit.
    """
    label = f"checkpoint {os.fspath(path)!r}"
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{label}: no such file")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            blob: Any = load_file(str(file))
        else:
            blob = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        what = " ".join(str(exc).split())[:200]
        raise InputError(f"{label} cannot be read as a state dict (torch.load with weights_only=True, or "
                         f"safetensors): {type(exc).__name__}: {what}") from exc
    state = _state_dict(blob, label)
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    shapes = [f"{k} is {tuple(v.shape)} in the file, {tuple(want[k].shape)} in the model"
              for k, v in state.items() if k in want and v.shape != want[k].shape]
    problems = []
    for what, items in (("missing", missing), ("unexpected", extra), ("wrong shape", shapes)):
        if items:
            problems.append(f"{len(items)} {what} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
    if problems:
        raise InputError(f"{label} does not fit {type(model).__name__}: {'; '.join(problems)}; was it saved "
                         "from this model with these --kwargs?")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model
