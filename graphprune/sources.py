"""A model named by text: its one job is to turn a name into a model and example inputs.

Public entry: ``resolve(text, ...) -> Source``. ``text`` is one of

- a zoo name: ``"resnet20"`` (``graphprune.zoo.list_models()``);
- an import spec ``"package.module:factory"``: a function or class, importable by
  name, that returns the model or a tuple ``(model, example_inputs)``;
- a file path and a factory in it: ``"path/to/models.py:make_net"`` (loaded with
  importlib from that path);
- a file written by ``gp.save`` (``"slim.gp"``), rebuilt with ``gp.load``;
- ``timm:NAME`` (``timm.create_model``) or ``hf:CONFIG_OR_DIR`` (a Hugging Face
  ``transformers`` model from a local directory, a config file or a Hub config), built
  on this machine by ``graphprune.hub``; their packages are imported only then.

Example inputs come from the zoo, the factory, the saved file or the hub model; a model
that states its input size (timm's ``pretrained_cfg["input_size"]``) gets a random input
of that size. ``checkpoint=`` loads a state dict of trained weights into the model
(``load_checkpoint``).

The same module holds the **trust gate** that ``gp.load`` uses for names read from a
file (``import_trusted``): only zoo models and callables defined in modules the
*caller* names may be called. Names are checked as text before anything is imported,
and the imported object's ``__module__`` is checked again after. Text given to
``resolve`` by the caller is the caller's own choice, so its import spec is trusted.

>>> from graphprune import sources
>>> src = sources.resolve("mlp")
>>> src.kind, src.name, tuple(src.inputs[0].shape)
('zoo', 'mlp', (2, 64))
>>> sources.import_trusted("os:system", trust=["mymodels"])
Traceback (most recent call last):
...
graphprune.errors.InputError: factory 'os:system' is in module 'os', which is not trusted; ...
"""

from __future__ import annotations

import importlib
import importlib.util
import keyword
import os
import re
import sys
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphprune.errors import GraphPruneError, InputError

__all__ = ["Source", "resolve", "import_trusted", "normalize_trust", "build_origin", "leaf_types",
           "importable_by_name", "sample_inputs", "LEAF_TRUST", "MAX_BYTES"]

#: Modules whose ``nn.Module`` classes a saved file may name as leaf types without ``trust``:
#: leaf types are only compared with ``isinstance``, never called.
LEAF_TRUST = ("torch.nn", "graphprune.zoo")
#: Default limit on what one model built from a spec (parameters, buffers, example inputs) may take.
MAX_BYTES = 4 * 2**30
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_SPEC = 400


@dataclass
class Source:
    """A model named by text, its example inputs and how to rebuild it.

    ``origin`` is a dict (``{'zoo' | 'factory': ..., 'kwargs': ...}``) for zoo names,
    import specs and hub models, or the loaded model for saved files (it records its own
    origin). ``kind`` is ``"zoo"``, ``"import"``, ``"path"``, ``"file"``, ``"timm"`` or
    ``"hf"``. ``inputs`` is a tuple of tensors, or a dict of keyword arguments (``hf``).
    """

    name: str
    model: torch.nn.Module
    inputs: tuple[torch.Tensor, ...] | dict[str, Any]
    origin: Any
    kind: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def describe_inputs(self) -> str:
        """The example inputs as text: ``2x3x32x32 float32``, keyword inputs by name."""
        def one(x: Any) -> str:
            if not isinstance(x, torch.Tensor):
                return repr(x)
            return "x".join(map(str, x.shape)) + f" {str(x.dtype).removeprefix('torch.')}"

        if isinstance(self.inputs, dict):
            return ", ".join(f"{k}={one(v)}" for k, v in self.inputs.items())
        return ", ".join(one(x) for x in self.inputs)


# --- trust ------------------------------------------------------------------------------------
def _dunder(part: str) -> bool:
    return part.startswith("__") and part.endswith("__")


def _module_name_ok(name: str) -> bool:
    parts = name.split(".")
    return all(_IDENT.match(p) and not keyword.iskeyword(p) and not _dunder(p) for p in parts)


def normalize_trust(trust: Any) -> tuple[str, ...]:
    """``trust`` (a module name, a module, or a sequence of them) as a tuple of module names."""
    if trust is None:
        return ()
    items = [trust] if isinstance(trust, (str, types.ModuleType)) else trust
    if not isinstance(items, Iterable):
        raise InputError(f"trust must be a module name or a list of module names, got {type(trust).__name__}")
    out = []
    for item in items:
        name = item.__name__ if isinstance(item, types.ModuleType) else item
        if not isinstance(name, str) or not _module_name_ok(name):
            raise InputError(f"trust names modules, like trust=['mymodels']; {item!r} is not a module name "
                             "(no '__main__': move the code into an importable module)")
        out.append(name)
    return tuple(out)


def _within(module: str, trusted: Iterable[str]) -> bool:
    return any(module == t or module.startswith(t + ".") for t in trusted)


def _parse(spec: Any, what: str) -> tuple[str, list[str]]:
    """``'pkg.mod:Attr.sub'`` -> ``('pkg.mod', ['Attr', 'sub'])``, checked as text only."""
    if not isinstance(spec, str) or len(spec) > _MAX_SPEC or spec.count(":") != 1:
        raise InputError(f"{what} {str(spec)[:80]!r} is not an import spec 'package.module:name'")
    module, attr = spec.split(":")
    if not _module_name_ok(module):
        raise InputError(f"{what} {spec!r}: {module!r} is not a module name (dotted identifiers, no dunders)")
    parts = attr.split(".")
    if not all(_IDENT.match(p) and not keyword.iskeyword(p) for p in parts):
        raise InputError(f"{what} {spec!r}: {attr!r} is not a dotted name")
    private = [p for p in parts if p.startswith("_")]
    if private:
        raise InputError(f"{what} {spec!r} reaches the private attribute {private[0]!r}; "
                         "only public names (no leading underscore) can be named")
    return module, parts


def _owner(obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    owner = getattr(obj, "__module__", None)
    return owner if isinstance(owner, str) else "?"


def import_trusted(spec: str, trust: Any, *, what: str = "factory", owner_check: bool = True) -> Any:
    """The object an import spec names, if the caller trusts the module it is defined in.

    Checks the text first (public dotted names only, module inside ``trust``; a trusted
    name covers its submodules), then imports, walks the attribute path through classes
    of trusted modules only, and checks the object's own ``__module__``, so
    ``'mymodels:os.system'`` is refused even when ``mymodels`` imported ``os``.
    ``owner_check=False`` skips the checks after import, for a spec the caller typed
    (``resolve``). Raises ``InputError`` saying what to trust.
    """
    trusted = normalize_trust(trust)
    module_name, parts = _parse(spec, what)
    hint = f"if you trust the code in it, pass trust=['{module_name}'] (graphprune CLI: --trust {module_name})"
    if not _within(module_name, trusted):
        raise InputError(f"{what} {spec!r} is in module {module_name!r}, which is not trusted; "
                         f"a file never chooses what code runs: {hint}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"cannot import module {module_name!r} of {spec!r}: {exc}. "
                         "Check the name and that its folder is on PYTHONPATH") from exc
    except Exception as exc:  # the module's own code failed
        raise InputError(f"importing module {module_name!r} of {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    for i, part in enumerate(parts):
        if i and not isinstance(obj, type) and (owner_check or not isinstance(obj, types.ModuleType)):
            raise InputError(f"{what} {spec!r}: {'.'.join(parts[:i])} is a {type(obj).__name__}; "
                             "past the module, a spec may reach into classes only")
        if owner_check and not _within(_owner(obj), trusted):
            raise InputError(f"{what} {spec!r} passes through {_owner(obj)!r}, which is not trusted; {hint}")
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise InputError(f"module {module_name!r} has no attribute {'.'.join(parts)!r} "
                             f"(from {spec!r})") from exc
    if isinstance(obj, types.ModuleType) or not callable(obj):
        raise InputError(f"{spec!r} is a {type(obj).__name__}, not a function or class")
    if owner_check and not _within(_owner(obj), trusted):
        raise InputError(f"{what} {spec!r} is a {type(obj).__name__} defined in module {_owner(obj)!r}, outside "
                         f"the trusted modules {list(trusted)}; name it where it is defined and trust that module")
    return obj


def leaf_types(names: Iterable[str], trust: Any = ()) -> list[type | str]:
    """``DependencyGraph.build`` leaf modules from their JSON form: qualified module names stay
    strings, ``module:QualName`` entries become ``nn.Module`` classes through the trust gate
    (``LEAF_TRUST`` is always trusted for them)."""
    out: list[type | str] = []
    for n in names:
        if not isinstance(n, str):
            raise InputError(f"leaf_modules entries are strings, got {type(n).__name__}")
        if ":" not in n:
            out.append(n)
            continue
        t = import_trusted(n, (*normalize_trust(trust), *LEAF_TRUST), what="leaf module type")
        if not (isinstance(t, type) and issubclass(t, torch.nn.Module)):
            raise InputError(f"leaf module type {n!r} is not an nn.Module class")
        out.append(t)
    return out


def importable_by_name(module: str) -> bool:
    """Whether another process could import ``module`` by name (found on sys.path, not only in
    ``sys.modules`` as a module loaded from a file path or ``__main__``)."""
    if not _module_name_ok(module):
        return False
    top = module.split(".")[0]
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        try:
            if find is not None and find(top, None) is not None:
                return True
        except Exception:  # a third-party finder that cannot answer
            continue
    return False


# --- building ---------------------------------------------------------------------------------
def _nbytes(made: Any) -> int:
    model, inputs = made if isinstance(made, tuple) and len(made) == 2 else (made, ())
    total, seen = 0, set()
    tensors = list(model.parameters()) + list(model.buffers()) if isinstance(model, torch.nn.Module) else []
    tensors += [x for x in (inputs if isinstance(inputs, (tuple, list)) else (inputs,))
                if isinstance(x, torch.Tensor)]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _check_size(fn: Any, kwargs: Mapping[str, Any], label: str, max_bytes: int) -> None:
    """Build once on the meta device (no memory) and refuse a model larger than ``max_bytes``.

    Only done when keyword arguments come with the origin: they could ask for any width.
    A factory that cannot run on the meta device is skipped here.
    """
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            size = _nbytes(fn(**kwargs))
    except Exception:
        return
    if size > max_bytes:
        raise InputError(f"{label} with kwargs {dict(kwargs)} would allocate {size / 2**30:.1f} GiB, over the "
                         f"limit of {max_bytes / 2**30:.1f} GiB; pass max_bytes= if you expect a model this size")


def build_origin(origin: Mapping[str, Any], *, trust: Any = (), max_bytes: int = MAX_BYTES,
                 _owner_check: bool = True) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...] | None]:
    """Build the model an origin ``{'zoo' | 'factory': ..., 'kwargs': {...}}`` describes.

    Zoo models are always allowed; a factory only when its module is in ``trust``.
    Returns the model and its example inputs when the factory gives them.
    """
    kwargs = origin.get("kwargs") or {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise InputError(f"origin kwargs must be a JSON object with string keys, got {type(kwargs).__name__}")
    kwargs = dict(kwargs)
    if "zoo" in origin:
        from graphprune import zoo

        name = origin["zoo"]
        if not zoo.exists(name):
            raise InputError(f"origin names zoo model {str(name)[:80]!r}, which does not exist; "
                             f"choose one of: {', '.join(zoo.list_models())}")
        name = zoo.canonical(name)  # a former name builds the same model
        if kwargs:
            _check_size(zoo._REGISTRY[name].factory, kwargs, f"zoo model {name!r}", max_bytes)
        try:
            return zoo.create(name, **kwargs)
        except GraphPruneError:
            raise
        except Exception as exc:
            raise InputError(f"zoo model {name!r} with kwargs {kwargs}: {type(exc).__name__}: {exc}") from exc
    spec = origin.get("factory")
    factory = import_trusted(spec, trust, owner_check=_owner_check)
    if kwargs:
        _check_size(factory, kwargs, f"factory {spec!r}", max_bytes)
    try:
        made = factory(**kwargs)
    except GraphPruneError:
        raise
    except Exception as exc:
        raise InputError(f"calling {spec}(**{kwargs}) failed: {type(exc).__name__}: {exc}") from exc
    inputs = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        made, inputs = made
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not isinstance(made, torch.nn.Module):
        raise InputError(f"{spec} returned a {type(made).__name__}; it must return "
                         "an nn.Module (or a tuple (model, example_inputs))")
    return made, inputs


def _path_module(path: Path) -> str:
    """Import a ``.py`` file by path (once); its module name is the file's stem."""
    name = path.stem
    if not _module_name_ok(name):
        raise InputError(f"{str(path)!r}: the file name must be a Python identifier to import it")
    have = sys.modules.get(name)
    if have is not None:
        if Path(getattr(have, "__file__", "") or "").resolve() == path.resolve():
            return name
        raise InputError(f"cannot import {str(path)!r} as module {name!r}: another module of that name is "
                         "already imported; rename the file")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise InputError(f"importing {str(path)!r} failed: {type(exc).__name__}: {exc}") from exc
    return name


def sample_inputs(specs: list[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
    """Example inputs of saved shapes: seeded normal values for floats, zeros otherwise."""
    from graphprune.io import make_inputs

    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(z.shape, generator=gen).to(z.dtype) if z.dtype.is_floating_point else z
                 for z in make_inputs(specs))


def _hub(scheme: str, name: str, kwargs: dict[str, Any], given: Any, text: str) -> Source:
    from graphprune import hub

    if not name:
        raise InputError(f"{text!r} names no model: write {scheme}:NAME")
    model, inputs, origin = (hub.timm_source if scheme == "timm" else hub.hf_source)(name, kwargs)
    if given is None and inputs is None:
        raise InputError(f"{text} states no input size: give example inputs (--input-shape on the command "
                         "line, example_inputs= in code)")
    return Source(name, model, given if given is not None else inputs, origin, scheme, kwargs)


def resolve(text: str | os.PathLike, *, example_inputs: Any = None, kwargs: Mapping[str, Any] | None = None,
            trust: Any = (), max_bytes: int = MAX_BYTES, checkpoint: str | os.PathLike | None = None) -> Source:
    """Turn a model named by text into a ``Source`` (model, example inputs, origin).

    ``example_inputs`` replace the ones the zoo, factory, hub or saved file supplies; an
    import spec whose factory returns none needs them, unless its model states its input
    size (``pretrained_cfg["input_size"]``). ``kwargs`` go to the zoo, factory or hub.
    ``trust`` is passed to ``gp.load`` for saved files (the import spec given here as
    ``text`` is the caller's own choice and needs no trust). ``checkpoint`` is a state
    dict file loaded into the model (``graphprune.checkpoint``).
    """
    src = _resolve(text, example_inputs, kwargs, trust, max_bytes)
    if checkpoint is not None:
        from graphprune.checkpoint import load_checkpoint

        load_checkpoint(src.model, checkpoint)
    return src


def _resolve(text: Any, example_inputs: Any, kwargs: Mapping[str, Any] | None, trust: Any,
             max_bytes: int) -> Source:
    from graphprune.tracing import normalize_inputs

    trust = normalize_trust(trust)
    given = normalize_inputs(example_inputs) if example_inputs is not None else None
    kwargs = dict(kwargs or {})
    text_s = os.fspath(text)
    if not isinstance(text_s, str) or not text_s:
        raise InputError(f"a model source is a non-empty string, got {text!r}")
    path = Path(text_s)
    head, sep, attr = text_s.partition(":")
    if sep and head in ("timm", "hf"):
        return _hub(head, attr, kwargs, given, text_s)
    if text_s.endswith(".gp") or path.is_file():
        from graphprune.io import load

        if kwargs:
            raise InputError("kwargs apply to zoo models and import specs, not to saved files")
        model = load(path, trust=trust, max_bytes=max_bytes)
        return Source(path.name, model, given or sample_inputs(model.meta["graphprune"]["inputs"]), model, "file")
    head, sep, attr = text_s.rpartition(":")
    if sep:
        kind = "import"
        if head.endswith(".py") or "/" in head or os.sep in head:
            if not Path(head).is_file():
                raise InputError(f"{head!r}: no such file (from {text_s!r})")
            head, kind = _path_module(Path(head)), "path"
        origin = {"factory": f"{head}:{attr}", "kwargs": kwargs}
        model, inputs = build_origin(origin, trust=[head], max_bytes=max_bytes, _owner_check=False)
        if given is None and inputs is None:
            from graphprune.hub import inputs_from_model

            inputs = inputs_from_model(model)
        if given is None and inputs is None:
            raise InputError(f"{text_s} needs example inputs (--input-shape 1,3,32,32 on the command line, "
                             "example_inputs= in code): its factory returns a model without them")
        return Source(attr, model, given or inputs, origin, kind, kwargs)
    from graphprune import zoo

    if not zoo.exists(text_s):
        raise InputError(f"unknown MODEL {text_s!r}: not a zoo model ('graphprune zoo' lists them), an import "
                         "spec package.module:factory, a file path models.py:factory, timm:NAME, "
                         "hf:CONFIG_OR_DIR, or an existing file")
    name = zoo.canonical(text_s)
    origin = {"zoo": name, "kwargs": kwargs}
    model, inputs = build_origin(origin, max_bytes=max_bytes)
    return Source(name, model, given or inputs, origin, "zoo", kwargs)
