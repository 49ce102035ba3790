"""The on-disk ``.gp`` file: write it, read it back, and check every field before use.

Format 3 (written): a safetensors file whose metadata holds ``format``, the JSON
``spec`` and a SHA-256 ``sha256`` over the spec and every tensor (name, dtype, shape,
bytes). Complex tensors are stored as real views (``torch.view_as_real``) and noted
in ``spec['views']`` by dtype; every other dtype (integers, bool, bfloat16) is stored
as it is. Format 1 (read only): a ``torch.save`` zip holding ``format``, ``spec`` and
``state_dict``, read with ``torch.load(weights_only=True)``. Format 2 is format 3 made
when ``grouped="groups"`` was the build default: a spec of format 1 or 2 that leaves
``grouped`` out was built with ``"groups"``, one of format 3 with ``"channels"``.

Public entries: ``write(path, spec, state)`` and ``read(path) -> (spec, tensors)``; both
are used by ``graphprune.io`` (``gp.save`` / ``gp.load``), which rebuilds the model.
``read`` raises ``SerializationError`` for anything it cannot vouch for, and allocates
nothing a spec declares (``input_shapes`` checks sizes against a limit first).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from graphprune.errors import SerializationError

__all__ = ["write", "read", "input_shapes", "FORMAT", "FORMAT_VERSION", "MAX_PLANS"]

FORMAT = "graphprune-slim"
# 1: torch.save zip (still read); 2: safetensors with the spec in its metadata; 3: as 2, and build
# options left out of the spec mean grouped="channels" (in 1 and 2 they meant grouped="groups")
FORMAT_VERSION = 3
MAX_PLANS = 1000  # plans in one file: each costs a trace and a rewrite on load
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)}
_COMPLEX = {"complex32": torch.complex32, "complex64": torch.complex64, "complex128": torch.complex128}
_BUILD_KEYS = {"leaf_modules", "factor", "grouped"}
ORIGIN_KEYS = {"zoo", "factory", "kwargs"} | _BUILD_KEYS
_DAMAGED = "the file is damaged or was not written by gp.save"


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def input_shapes(specs: Any, max_bytes: int) -> list[tuple[list[int], torch.dtype]]:
    """Check an ``inputs`` spec without allocating: shapes, dtypes and the total size."""
    if not isinstance(specs, Sequence) or isinstance(specs, str) or not 0 < len(specs) <= 64:
        raise SerializationError("inputs must be a list of 1 to 64 {'shape': [...], 'dtype': ...} entries")
    total, out = 0, []
    for i, s in enumerate(specs):
        shape = s.get("shape") if isinstance(s, Mapping) else None
        if not (isinstance(shape, list) and len(shape) <= 16 and all(_int(n) and n >= 0 for n in shape)):
            raise SerializationError(f"inputs[{i}] shape {str(shape)[:80]} is not a list of at most 16 "
                                     "non-negative integers")
        name = s.get("dtype")
        dtype = _DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise SerializationError(f"inputs[{i}] dtype {str(name)[:40]!r} is not one of {', '.join(_DTYPES)}")
        numel = 1
        for n in shape:
            numel *= n
        total += numel * dtype.itemsize
        if total > max_bytes:
            raise SerializationError(f"the example inputs would take {total / 2**30:.3g} GiB, over the limit of "
                                     f"{max_bytes / 2**30:.3g} GiB; pass max_bytes= if you expect inputs this big")
        out.append((shape, dtype))
    return out


def _check_spec(spec: Any, where: str) -> dict[str, Any]:
    """Check every key of a spec read from a file; raise SerializationError naming the first bad one."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise SerializationError(f"{where}: {what}; {_DAMAGED}")

    need(isinstance(spec, dict), "the spec is not a JSON object")
    need(spec.get("format", FORMAT) == FORMAT, f"format is {str(spec.get('format'))[:40]!r}")
    version = spec.get("version", 1)
    need(_int(version) and version >= 1, "'version' is not a positive integer")
    if version > FORMAT_VERSION:
        raise SerializationError(f"{where} was written by a newer graphprune (format {version}); upgrade "
                                 "graphprune to load it")
    org = spec.get("origin")
    need(isinstance(org, dict) and set(org) <= ORIGIN_KEYS, "'origin' is not an object with keys "
         "zoo or factory, kwargs, leaf_modules, factor, grouped")
    need(("zoo" in org) != ("factory" in org), "'origin' needs exactly one of 'zoo' and 'factory'")
    need(isinstance(org.get("zoo", org.get("factory")), str), "'origin' zoo/factory is not a string")
    need(isinstance(org.get("kwargs", {}), dict), "'origin.kwargs' is not an object")
    plans = spec.get("plans")
    need(isinstance(plans, list) and 0 < len(plans) <= MAX_PLANS and all(isinstance(p, str) for p in plans),
         f"'plans' is not a list of 1 to {MAX_PLANS} plan JSON strings")
    builds = spec.get("builds", [None] * len(plans))
    need(isinstance(builds, list) and len(builds) == len(plans), "'builds' does not have one entry per plan")
    for i, b in enumerate([org, *builds]):
        label = "origin" if i == 0 else f"builds[{i - 1}]"
        need(b is None and i > 0 or isinstance(b, dict), f"'{label}' is not an object")
        if b is None:
            continue
        need(i == 0 or set(b) <= _BUILD_KEYS, f"'{label}' has keys other than {sorted(_BUILD_KEYS)}")
        leaves = b.get("leaf_modules", [])
        need(isinstance(leaves, list) and all(isinstance(n, str) for n in leaves),
             f"'{label}.leaf_modules' is not a list of strings")
        need(all(isinstance(b.get(k, ""), str) for k in ("factor", "grouped")),
             f"'{label}' factor/grouped is not a string")
    try:
        input_shapes(spec.get("inputs"), 2**62)
    except SerializationError as exc:
        raise SerializationError(f"{where}: {exc}; {_DAMAGED}") from None
    views = spec.get("views", {})
    need(isinstance(views, dict) and all(v in _COMPLEX for v in views.values()),
         f"'views' is not an object of {sorted(_COMPLEX)}")
    need(isinstance(spec.get("training", False), bool), "'training' is not true or false")
    need(all(isinstance(spec.get(k, ""), str) for k in ("graphprune", "torch", "class_name")),
         "'graphprune', 'torch' or 'class_name' is not a string")
    return spec


def _digest(text: str, tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256(text.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _encode(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors can store (own memory each); complex ones as real views, noted by dtype."""
    tensors, views = {}, {}
    for name, t in state.items():
        t = t.detach().cpu()
        if t.is_complex():
            views[name] = str(t.dtype).removeprefix("torch.")
            t = torch.view_as_real(t)
        tensors[name] = t.contiguous().clone()
    return tensors, views


def write(path: Path, spec: dict[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tensors, views = _encode(state)
    if views:
        spec = {**spec, "views": views}
    text = json.dumps(spec, allow_nan=False)
    save_file(tensors, str(path), metadata={"format": FORMAT, "spec": text, "sha256": _digest(text, tensors)})


def _read_v2(path: Path, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT or not isinstance(meta.get("spec"), str):
            raise SerializationError(f"{where} is a safetensors file but not a graphprune file (made by gp.save)")
        spec = _check_spec(json.loads(meta["spec"]), where)
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("sha256") != _digest(meta["spec"], tensors):
        raise SerializationError(f"{where}: the checksum does not match its contents; {_DAMAGED} (copy it again)")
    for name, dtype in spec.get("views", {}).items():
        t = tensors.get(name)
        if t is None or t.dim() == 0 or t.shape[-1] != 2 or not t.is_floating_point():
            raise SerializationError(f"{where}: tensor {name!r} is noted {dtype} but is not a real view; {_DAMAGED}")
        tensors[name] = torch.view_as_complex(t.clone()).to(_COMPLEX[dtype])  # a fresh, aligned copy
    return spec, tensors


def read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    where = repr(str(path))
    if not path.is_file():
        raise SerializationError(f"no such file: {where}")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":  # format 1: a torch.save zip
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise SerializationError(f"{where} is not a graphprune file: torch.load(weights_only=True) refused "
                                     f"it ({type(exc).__name__}); graphprune files hold only tensors and JSON") from exc
        if not isinstance(blob, dict) or blob.get("format") != FORMAT or not isinstance(blob.get("spec"), str):
            raise SerializationError(f"{where} is not a graphprune file (made by gp.save)")
        state = blob.get("state_dict", {})
        if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in state.items())):
            raise SerializationError(f"{where}: 'state_dict' is not a dict of tensors; {_DAMAGED}")
        return _check_spec(json.loads(blob["spec"]), where), state
    if len(head) < 9 or head[8:9] != b"{":
        raise SerializationError(f"{where} is not a graphprune file (made by gp.save)")
    return _read_v2(path, where)
