"""Prune a checkpoint too large for memory: scores and the slim checkpoint, one tensor at a time.

A Hugging Face checkpoint directory (``model.safetensors``, or shards
``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``) is read with
safetensors' ``safe_open``, one tensor at a time; the model itself stays on the ``meta``
device, where ``DependencyGraph.build`` and ``apply`` need shapes only.

- ``score_checkpoint(method, directory, dg)``: magnitude-type scores (``magnitude``, ``l1``,
  ``l2``), the same numbers as ``gp.score(method, model, dg)`` on the loaded model, each
  tensor read once and reduced to one sum per channel of each axis a group slices.
- ``apply_checkpoint(model, dg, plan, directory, out_dir)``: the slim checkpoint, written
  shard by shard (each output shard holds the sliced tensors of the input shard of the same
  name), a new index, and the slim ``config.json`` (from the module form, so the slim
  checkpoint loads with ``from_pretrained``); the other files of the directory
  (``generation_config.json``, tokenizer files) are copied. Peak memory is one output shard
  and one input tensor, plus the graph.

A tensor the file leaves out because it is tied to another (``lm_head.weight`` to the
embedding) is read under the name the file has; it stays left out of the slim checkpoint.
A tensor that is missing, has another shape than the model's, or that the model does not
have raises ``InputError`` naming it.

The worked example, from a config to a slim sharded checkpoint, is in docs/scale.md.

>>> import tempfile, torch, graphprune as gp
>>> from safetensors.torch import save_file
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
>>> src, out = tempfile.mkdtemp(), tempfile.mkdtemp()
>>> save_file(model.state_dict(), src + "/model.safetensors")
>>> dg = gp.DependencyGraph.build(model, torch.zeros(1, 2))
>>> bool((gp.score_checkpoint("l1", src, dg)[0] == gp.score("l1", model, dg)[0]).all())
True
>>> written = gp.apply_checkpoint(model, dg, {0: [1]}, src, out, config=False)
>>> [s["file"] for s in written.shards], written.bytes_after < written.bytes_before
(['model.safetensors'], True)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from graphprune.errors import InputError, PlanError, RewriteError
from graphprune.importance.magnitude import axis_norms, group_norms, member_axes, needed_params
from graphprune.plan import Plan
from graphprune.removal import Removal
from graphprune.rewrite import _sliced
from graphprune.tracing import named_state

__all__ = ["score_checkpoint", "apply_checkpoint", "SlimCheckpoint", "Checkpoint"]

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_STREAMED = {"magnitude": None, "l1": 1, "l2": 2}  # criterion -> fixed p (None: the option, default 2)


class Checkpoint:
    """The tensors of a safetensors checkpoint directory, by name, without reading them.

    ``shards`` lists the files in order with the names each holds; ``shape(name)`` reads
    a header only; ``tensors(shard)`` yields ``(name, tensor)`` one at a time, each read
    from a memory-mapped file that is unmapped again before the next.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        from safetensors import safe_open

        self._open = safe_open
        self.directory = Path(directory)
        label = f"checkpoint directory {os.fspath(directory)!r}"
        if not self.directory.is_dir():
            raise InputError(f"{label}: no such directory")
        index = self.directory / INDEX
        self.index_metadata: dict[str, Any] | None = None
        if index.is_file():
            try:
                blob = json.loads(index.read_text())
                weight_map = dict(blob["weight_map"])
            except Exception as exc:
                raise InputError(f"{label}: {INDEX} is not a safetensors index (a JSON object with a "
                                 f"'weight_map'): {type(exc).__name__}: {exc}") from exc
            self.index_metadata = dict(blob.get("metadata") or {})
            files = list(dict.fromkeys(sorted(weight_map.values())))
        elif (self.directory / SINGLE).is_file():
            files, weight_map = [SINGLE], None
        else:
            raise InputError(f"{label} has neither {SINGLE} nor {INDEX} (only safetensors checkpoints are "
                             "streamed; save one with save_pretrained(..., safe_serialization=True))")
        self.shards: dict[str, list[str]] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self.file_of: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            path = self.directory / file
            if not path.is_file():
                raise InputError(f"{label}: {INDEX} names shard {file!r}, which is not there")
            try:
                with safe_open(str(path), framework="pt") as f:
                    names = list(f.keys())
                    self.metadata[file] = dict(f.metadata() or {})
                    self._shapes.update({n: tuple(f.get_slice(n).get_shape()) for n in names})
            except Exception as exc:
                raise InputError(f"{label}: {file} cannot be read as safetensors: {type(exc).__name__}: "
                                 f"{exc}") from exc
            if weight_map is not None:
                strays = [n for n in names if weight_map.get(n) != file]
                if strays:
                    raise InputError(f"{label}: {file} holds {strays[0]!r}, which {INDEX} places elsewhere "
                                     f"({weight_map.get(strays[0])!r})")
            self.shards[file] = names
            self.file_of.update({n: file for n in names})
        if weight_map is not None:
            lost = [n for n in weight_map if n not in self.file_of]
            if lost:
                raise InputError(f"{label}: {INDEX} places tensor {lost[0]!r} in {weight_map[lost[0]]}, which "
                                 f"does not hold it ({len(lost)} such tensors)")

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def tensors(self, shard: str, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of ``shard`` (or of ``names`` in it), each read when asked for.

        The file is mapped again for each tensor: pages of a mapped file that were read stay
        in the process's resident memory until it is unmapped, which would add up to the
        whole shard.
        """
        for name in (self.shards[shard] if names is None else names):
            with self._open(str(self.directory / shard), framework="pt") as f:
                t = f.get_tensor(name)
            yield name, t


def _aliases(module: torch.nn.Module) -> dict[str, str]:
    """Every name of every parameter and buffer -> the name the graph uses for it (the first
    one: ``named_state``); tied tensors have several names."""
    first = {id(t): name for name, t in named_state(module).items()}
    out = {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        if id(t) in first:
            out[name] = first[id(t)]
    return out


def _located(ckpt: Checkpoint, aliases: Mapping[str, str], dg: Any) -> dict[str, str]:
    """Graph name -> the file's name for it, every file tensor checked: known and of the model's shape."""
    where: dict[str, str] = {}
    for name in ckpt.file_of:
        canonical = aliases.get(name, name)
        if canonical not in dg.state_shapes:
            raise InputError(f"checkpoint tensor {name!r} ({ckpt.file_of[name]}) is not a parameter or buffer of "
                             "the model the graph was built from; was the checkpoint saved from this "
                             "architecture and config?")
        want, got = dg.state_shapes[canonical], ckpt.shape(name)
        if tuple(want) != tuple(got):
            raise InputError(f"checkpoint tensor {name!r} ({ckpt.file_of[name]}) has shape {tuple(got)}, the "
                             f"model's {canonical!r} has {tuple(want)}; was the checkpoint saved from this "
                             "config?")
        where.setdefault(canonical, name)
    return where


def _missing(names: Iterable[str], where: Mapping[str, str], aliases: Mapping[str, str], ckpt: Checkpoint) -> None:
    lost = [n for n in names if n not in where]
    if lost:
        others = sorted(a for a, c in aliases.items() if c == lost[0] and a != lost[0])
        also = f" (nor under its tied name{'s' if len(others) > 1 else ''} {', '.join(others)})" if others else ""
        raise InputError(f"checkpoint {os.fspath(ckpt.directory)!r} has no tensor {lost[0]!r}{also}"
                         + (f" and {len(lost) - 1} more" if len(lost) > 1 else "")
                         + "; was it saved from this model?")


def score_checkpoint(method: str, directory: str | os.PathLike, dg: Any, *, p: int | None = None,
                     roles: Iterable[str] = ("out", "in"), normalize: bool | str | None = False,
                     progress: bool | None = None) -> dict[int, np.ndarray]:
    """Scores of ``dg``'s prunable groups from the checkpoint in ``directory``, read one tensor at a time.

    ``method`` is ``"magnitude"`` (``p=1|2``, default 2), ``"l1"`` or ``"l2"``; the scores equal
    ``gp.score(method, model, dg, ...)`` on the model loaded from ``directory``. ``dg`` is
    built from the model on the meta device (or any model of the same architecture).
    Only the tensors the groups slice are read, each once; what stays in memory is one
    number per channel of each sliced axis. ``progress=None`` shows a bar over the tensors
    on a terminal, ``True`` always, ``False`` never.

    >>> import tempfile, torch, graphprune as gp
    >>> from safetensors.torch import save_file
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> src = tempfile.mkdtemp()
    >>> save_file(model.state_dict(), src + "/model.safetensors")
    >>> dg = gp.DependencyGraph.build(model, torch.zeros(1, 2))
    >>> bool((score_checkpoint("l2", src, dg)[0] == gp.score("l2", model, dg)[0]).all())
    True
    """
    if method not in _STREAMED:
        raise InputError(f"score_checkpoint computes the weight-magnitude criteria {sorted(_STREAMED)} from a "
                         f"checkpoint, not {method!r}; criteria that need activations or gradients need the model "
                         "in memory (gp.score)")
    fixed = _STREAMED[method]
    if fixed is not None and p not in (None, fixed):
        raise InputError(f"criterion {method!r} is magnitude with p={fixed}; give p={p} to 'magnitude' instead")
    p = fixed or (2 if p is None else p)
    if p not in (1, 2):
        raise InputError(f"magnitude p must be 1 or 2, got {p!r}")
    ckpt = Checkpoint(directory)
    aliases = _aliases(dg.gm)
    where = _located(ckpt, aliases, dg)
    needed = needed_params(dg, roles)
    _missing(needed, where, aliases, ckpt)
    axes = member_axes(dg)
    per_axis: dict[tuple[str, int], np.ndarray] = {}
    by_file: dict[str, list[str]] = {}
    for param in needed:
        by_file.setdefault(ckpt.file_of[where[param]], []).append(param)
    bar = _bar(len(needed), progress, "scoring tensors")
    for file, params in by_file.items():
        for param, (_, t) in zip(params, ckpt.tensors(file, [where[q] for q in params])):
            per_axis.update({(param, d): v for d, v in axis_norms(t, axes[param], p, inplace=True).items()})
            del t
            bar.update(1)
    bar.close()
    return group_norms(dg, per_axis, p=p, roles=roles, normalize=normalize)


@dataclass
class SlimCheckpoint:
    """What ``apply_checkpoint`` wrote: the directory, each shard's tensor count and bytes
    (before and after), the slim config's changed fields, and a note."""

    directory: str
    shards: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def bytes_before(self) -> int:
        return sum(s["bytes_before"] for s in self.shards)

    @property
    def bytes_after(self) -> int:
        return sum(s["bytes_after"] for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _slim_config(model: torch.nn.Module, dg: Any, plan: Plan, attributes: Mapping[str, Any] | None
                 ) -> tuple[dict[str, Any] | None, dict[str, tuple[int, ...]]]:
    """The slim config's changed fields and the slim state shapes, from the module form on meta."""
    from graphprune.rewrite import apply

    try:
        slim = apply(model, dg, plan, output="module", attributes=dict(attributes or {}))
    except RewriteError as exc:
        raise RewriteError(f"{exc}. A slim checkpoint needs a config that from_pretrained can build: prune "
                           "widths the config can express (the same count in every layer, whole heads), or write "
                           "the weights alone with apply_checkpoint(..., config=False): the slim architecture is then "
                           "the GraphModule gp.apply(model, dg, plan)") from exc
    before = getattr(getattr(model, "config", None), "to_dict", None)
    after = getattr(getattr(slim, "config", None), "to_dict", None)
    changed = None
    if before is not None and after is not None:
        old, new = before(), after()
        changed = {k: v for k, v in new.items() if old.get(k) != v}
    return changed, {k: tuple(v.shape) for k, v in slim.state_dict().items()}


def apply_checkpoint(model: torch.nn.Module, dg: Any, plan: Plan | Mapping[int, Any], directory: str | os.PathLike,
                     out_dir: str | os.PathLike, *, config: bool = True, attributes: Mapping[str, Any] | None = None,
                     progress: bool | None = None) -> SlimCheckpoint:
    """Write the slim checkpoint of ``plan`` to ``out_dir``, one input shard at a time.

    ``model`` is the model ``dg`` was built from, on the meta device (nothing of it is
    read but its structure and config); ``directory`` holds its weights (see the module
    docstring). Each output shard has the name of its input shard and its tensors, sliced
    along the plan's cuts; the index (when the input has one) gets the new sizes. With
    ``config`` (default) the slim model in the model's own classes is built on meta first
    (``gp.apply(model, dg, plan, output="module")``): the fields of the directory's
    ``config.json`` that changed are updated, so the result loads with
    ``from_pretrained(out_dir)``; a width the config cannot express raises
    ``RewriteError`` before anything is written. ``config=False`` writes the weights for the
    slim GraphModule (``gp.apply(model, dg, plan)``) and no config.

    ``out_dir`` must be new or empty; ``progress`` as in ``score_checkpoint``. Peak memory:
    one output shard plus one input tensor (plus the graph).
    """
    out = Path(out_dir)
    src = Path(directory)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise InputError(f"out_dir {os.fspath(out_dir)!r} is the checkpoint directory; write the slim checkpoint "
                         "elsewhere")
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"out_dir {os.fspath(out_dir)!r} is not empty; give a new or empty directory (shards of "
                         "another checkpoint left there would be mixed with the slim ones)")
    plan = plan if isinstance(plan, Plan) else Plan(plan)
    plan.validate(dg)
    removal = Removal(dg, plan)
    if removal.vanished:
        raise PlanError(f"the plan removes whole layers ({', '.join(sorted(removal.vanished)[:4])}); a checkpoint "
                        "keeps every tensor of the architecture, so keep at least one channel in them")
    ckpt = Checkpoint(directory)
    aliases = _aliases(model)
    where = _located(ckpt, aliases, dg)
    cuts = removal.cuts()
    persistent = {aliases.get(k, k) for k in model.state_dict()}
    _missing([c for c in cuts if c in persistent], where, aliases, ckpt)
    changed, slim_shapes = _slim_config(model, dg, plan, attributes) if config else (None, {})
    note = ("" if config else "no config.json: the slim architecture is the GraphModule gp.apply(model, dg, plan), "
            "whose state dict has these tensors under the same names (load_state_dict(state, strict=False, "
            "assign=True)); buffers the model does not save (rotary frequencies) and tied names are not in the "
            "checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    result = SlimCheckpoint(directory=os.fspath(out), config=changed or {}, note=note)
    from safetensors.torch import save_file

    bar = _bar(len(ckpt.file_of), progress, "writing tensors")
    weight_map: dict[str, str] = {}
    for file, names in ckpt.shards.items():
        slim: dict[str, torch.Tensor] = {}
        before = 0
        for name, t in ckpt.tensors(file):
            before += t.numel() * t.element_size()
            dims = cuts.get(aliases.get(name, name))
            slim[name] = (_sliced(t, dims) if dims else t).contiguous()
            del t
            want = slim_shapes.get(name)
            if want is not None and tuple(slim[name].shape) != want:  # the module form disagrees: a bug here
                raise RewriteError(f"{name!r} sliced to {tuple(slim[name].shape)}, but the slim model has {want}")
            weight_map[name] = file
            bar.update(1)
        after = sum(t.numel() * t.element_size() for t in slim.values())
        save_file(slim, str(out / file), metadata=ckpt.metadata[file] or {"format": "pt"})
        del slim
        result.shards.append({"file": file, "tensors": len(names), "bytes_before": before, "bytes_after": after})
    bar.close()
    if ckpt.index_metadata is not None:
        meta = dict(ckpt.index_metadata)
        meta["total_size"] = result.bytes_after
        if "total_parameters" in meta:
            meta["total_parameters"] = _parameters(out, ckpt)
        (out / INDEX).write_text(json.dumps({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))},
                                            indent=2) + "\n")
    _copy_others(src, out, changed if config else None, model)
    return result


def _parameters(out: Path, ckpt: Checkpoint) -> int:
    from safetensors import safe_open

    total = 0
    for file, names in ckpt.shards.items():
        with safe_open(str(out / file), framework="pt") as f:
            total += sum(int(np.prod(f.get_slice(n).get_shape())) for n in names)
    return total


def _copy_others(src: Path, out: Path, changed: dict[str, Any] | None, model: torch.nn.Module) -> None:
    """Copy the directory's other files (tokenizer, generation config); write the slim config.json."""
    for path in src.iterdir():
        if not path.is_file() or path.name in (INDEX, "config.json") or path.name.endswith(_WEIGHT_SUFFIXES) \
                or path.name.endswith(".index.json"):
            continue
        shutil.copy2(path, out / path.name)
    if changed is None:
        return
    source = src / "config.json"
    if source.is_file():
        blob = json.loads(source.read_text())
        blob.update(changed)
    else:  # no config in the directory: the model's own, with the new widths
        blob = model.config.to_dict()
        blob.update(changed)
        blob.setdefault("architectures", [type(model).__name__])
    (out / "config.json").write_text(json.dumps(blob, indent=2, sort_keys=True) + "\n")


def _bar(total: int, progress: bool | None, what: str) -> Any:
    return tqdm(total=total, desc=what, unit="tensor", disable=None if progress is None else not progress)
