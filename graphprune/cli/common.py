"""What the ``graphprune`` subcommands share: errors, MODEL arguments, options, output.

``resolve(spec, input_shapes, kwargs, trust, checkpoint)`` turns a MODEL argument into a
model and example inputs (through ``graphprune.sources``); ``prune_options`` maps the
pruning flags onto ``gp.prune``; ``writable`` checks an output path before the work
starts; the rest parses options and data files and writes to the terminal.

>>> parse_ratios("layer1=0.3, fc=0.1")
{'layer1': 0.3, 'fc': 0.1}
>>> parse_ignore("3"), parse_ignore("layer1.0.conv1"), parse_min_keep("0.25"), parse_min_keep("8")
(3, 'layer1.0.conv1', 0.25, 8)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import inspect
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from graphprune import sources
from graphprune.sources import Source

PROG = "graphprune"


class CLIError(Exception):
    """A problem with the command line or its files: reported in one line, exit 1."""


class _UsageError(Exception):
    pass


# --- models ----------------------------------------------------------------------------------
_SHAPE = re.compile(r"^\s*\d+(\s*,\s*\d+)*\s*(:\s*[a-z0-9]+)?\s*$")


def parse_shape(text: str) -> tuple[tuple[int, ...], torch.dtype]:
    """'1,3,32,32' or '4,16:int64' -> (shape, dtype)."""
    if not _SHAPE.match(text):
        raise CLIError(f"--input-shape {text!r} is not a comma-separated list of sizes like 1,3,32,32 "
                       "(optionally with a dtype: 4,16:int64)")
    dims, _, dtype_name = text.partition(":")
    dtype = getattr(torch, dtype_name.strip() or "float32", None)
    if not isinstance(dtype, torch.dtype):
        raise CLIError(f"--input-shape {text!r}: unknown dtype {dtype_name.strip()!r}")
    return tuple(int(d) for d in dims.split(",")), dtype


def _make_inputs(shapes: Sequence[str]) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for s in shapes:
        shape, dtype = parse_shape(s)
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dtype))
        else:
            out.append(torch.zeros(shape, dtype=dtype))
    return tuple(out)


def _kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CLIError(f"--kwargs must be a JSON object like '{{\"num_classes\": 100}}': {exc}") from exc
    if not isinstance(value, dict):
        raise CLIError("--kwargs must be a JSON object like '{\"num_classes\": 100}'")
    return value


def resolve(spec: str, input_shapes: Sequence[str] = (), kwargs: dict[str, Any] | None = None,
            trust: Sequence[str] = (), checkpoint: str | None = None) -> Source:
    """Turn a MODEL argument into a model and example inputs (``graphprune.sources.resolve``).

    The current directory is importable, as under ``python -m``; import specs on the
    command line are the user's own choice, names read from saved files need ``--trust``.
    ``checkpoint`` is a state dict file of trained weights (``--checkpoint``).
    """
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    given = _make_inputs(input_shapes) if input_shapes else None
    return sources.resolve(spec, example_inputs=given, kwargs=kwargs, trust=tuple(trust), checkpoint=checkpoint)


# --- pruning options -----------------------------------------------------------------------------
def parse_ratios(text: str) -> dict[str, float]:
    """``'layer1=0.3,fc=0.1'`` -> ``{'layer1': 0.3, 'fc': 0.1}`` (argparse type of ``--ratios``)."""
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.rpartition("=")
        try:
            ratio = float(value)
        except ValueError:
            ratio = -1.0
        if not sep or not name.strip() or not 0 <= ratio < 1:
            raise argparse.ArgumentTypeError(f"{item!r} is not LAYER=RATIO with a ratio in [0, 1), "
                                             "e.g. layer1=0.3,fc1=0.1")
        out[name.strip()] = ratio
    if not out:
        raise argparse.ArgumentTypeError("give LAYER=RATIO pairs, e.g. layer1=0.3,fc1=0.1")
    return out


def parse_ignore(text: str) -> int | str:
    """A group id (digits) or a module name (argparse type of ``--ignore``)."""
    return int(text) if text.isdigit() else text


def parse_min_keep(text: str) -> int | float:
    """An integer >= 1, or a fraction in (0, 1) (argparse type of ``--min-keep``)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value >= 1 and value.is_integer():
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"{text!r} is neither a channel count >= 1 nor a fraction in (0, 1)")


#: flags that need an option ``gp.prune`` may not have: flag -> gp.prune keyword
_NEWER_OPTIONS = {"--max-ratio": "max_ratio", "--ratios": "ratios", "--factor": "factor", "--uniform": "uniform"}


def prune_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``gp.prune`` that the pruning flags ask for.

    ``--max-ratio``, ``--ratios``, ``--factor`` and ``--uniform`` pass through only when this
    graphprune's ``gp.prune`` takes them; otherwise the command stops with a message.
    """
    out: dict[str, Any] = {"ignore": list(args.ignore), "scope": args.scope, "round_to": args.round_to,
                           "min_keep": args.min_keep, "steps": args.steps}
    ratios: dict[str, float] = {}
    for d in args.ratios:
        ratios.update(d)
    given = {"--max-ratio": args.max_ratio, "--ratios": ratios or None, "--factor": args.factor,
             "--uniform": True if getattr(args, "uniform", False) else None}
    accepted = inspect.signature(_gp().prune).parameters
    for flag, key in _NEWER_OPTIONS.items():
        if given[flag] is None:
            continue
        if key not in accepted:
            raise CLIError(f"{flag} needs gp.prune({key}=...), which this version of graphprune "
                           f"({_gp().__version__}) does not have; leave {flag} out")
        out[key] = given[flag]
    return out


def _gp() -> Any:
    import graphprune

    return graphprune


# --- output files ----------------------------------------------------------------------------------
def writable(path: str | Path | None, flag: str, *, folder: bool = False) -> None:
    """Check, before any work, that ``path`` (a file, or with ``folder`` a directory) can be
    written: create its folder and probe it; raise ``CLIError`` naming ``flag`` otherwise."""
    if not path:
        return
    target = Path(path)
    where = target if folder else target.parent
    try:
        if target.is_dir() and not folder:
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(target))
        if folder and target.exists() and not target.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(target))
        where.mkdir(parents=True, exist_ok=True)
        if not os.access(where, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied", str(where))
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise CLIError(f"{flag} {str(path)!r}: cannot write there ({why}"
                       f"{': ' + str(exc.filename) if exc.filename and str(exc.filename) != str(path) else ''})") from exc


# --- output helpers --------------------------------------------------------------------------------
def _out(text: str = "") -> None:
    print(text, flush=True)


@contextlib.contextmanager
def _progress(total: int, desc: str) -> Iterator[Any]:
    """A tqdm bar on stderr (only on a terminal) that steps through named stages."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, disable=None,
               bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| {elapsed}")
    try:
        yield bar
    finally:
        bar.close()


def _step(bar: Any, text: str) -> None:
    bar.set_description_str(text)
    bar.refresh()


def _terminal_width() -> int:
    return max(80, shutil.get_terminal_size((120, 24)).columns)


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise CLIError(f"--option {pair!r} must look like name=value (e.g. p=1)")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


_LOSSES = ("cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss",
           "binary_cross_entropy_with_logits")


def load_data(path: str, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(inputs, targets)`` from a torch file holding {'inputs': T, 'targets': T} or (T, T)."""
    if not Path(path).is_file():
        raise CLIError(f"--data {path!r}: no such file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CLIError(f"--data {path!r} cannot be read with torch.load(weights_only=True) "
                       f"({type(exc).__name__})") from exc
    if isinstance(blob, dict) and {"inputs", "targets"} <= set(blob):
        inputs, targets = blob["inputs"], blob["targets"]
    elif isinstance(blob, (tuple, list)) and len(blob) == 2:
        inputs, targets = blob
    else:
        raise CLIError(f"--data {path!r} must hold {{'inputs': tensor, 'targets': tensor}} or a pair "
                       "(inputs, targets), saved with torch.save")
    if not (isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor)) or len(inputs) != len(targets):
        raise CLIError(f"--data {path!r}: inputs and targets must be tensors with the same first dimension")
    return [(inputs[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]


def _data_options(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from graphprune import importance

    needs_data = args.method in getattr(importance, "DATA_DRIVEN", ())
    if not getattr(args, "data", None):
        if needs_data:
            raise CLIError(f"method {args.method!r} scores channels on data: pass --data FILE (a torch file "
                           "with {'inputs': tensor, 'targets': tensor}) and --loss (default cross_entropy)")
        return None, {}
    import torch.nn.functional as F

    return load_data(args.data, args.batch_size), {"loss_fn": getattr(F, args.loss)}
