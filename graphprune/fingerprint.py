"""Fingerprints of a model's code, to tell whether two models run the same forward.

A dependency graph describes the code it traced; applying it to a model with the same
parameter shapes but another ``forward`` would mix the two. ``code_fingerprints(model)``
gives, without tracing or running anything, one digest per submodule (by qualified
name) of:

- the code of its class: every function, property, static and class method defined on
  the class and its bases below ``nn.Module`` (bytecode, constants, names used, default
  arguments; functions they close over and ``functools.wraps`` chains too), so a helper
  method counts as much as ``forward``; for a ``GraphModule``, its generated code;
- functions set on the instance (``module.forward = ...``);
- which parameters and buffers it has (not their shapes), ``None`` entries included;
- its plain configuration attributes (ints, floats, bools, strings, tuples of them,
  dtypes, devices): stride, padding, ``negative_slope``, ``eps``, head counts;
  ``training`` is left out (the mode is not code).

``check_same_code(model, recorded)`` raises ``InputError`` naming the first module whose
digest differs. Digests are stable within one Python and torch version.
"""

from __future__ import annotations

import functools
import hashlib
import types
from typing import Any

import torch
import torch.fx

from graphprune.errors import InputError

__all__ = ["code_fingerprint", "code_fingerprints", "check_same_code"]

_ATOMS = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)
_SKIP_ATTRS = {"training"}


def _const(value: Any) -> str:
    if isinstance(value, frozenset):  # set order depends on string hashing: sort
        return "frozenset(" + ",".join(sorted(_const(v) for v in value)) + ")"
    if isinstance(value, tuple):
        return "(" + ",".join(_const(v) for v in value) + ")"
    return repr(value)


def _code(code: types.CodeType, h: Any) -> None:
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_argcount, code.co_kwonlyargcount, code.co_flags)).encode())
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            _code(c, h)
        else:
            h.update(_const(c).encode())


def _callable(obj: Any, h: Any, seen: set[int]) -> None:
    """Digest a function-like object: its code, defaults and the functions it closes over."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        for part in (obj.fget, obj.fset, obj.fdel):
            if part is not None:
                _callable(part, h, seen)
        return
    if isinstance(obj, functools.partial):
        h.update(_const(tuple(a for a in obj.args if isinstance(a, _ATOMS))).encode())
        _callable(obj.func, h, seen)
        return
    if isinstance(obj, types.MethodType):
        obj = obj.__func__
    code = getattr(obj, "__code__", None)
    if not isinstance(code, types.CodeType):
        h.update(f"<{type(obj).__module__}.{type(obj).__qualname__}>".encode())
        return
    _code(code, h)
    defaults = (obj.__defaults__ or ()) + tuple((obj.__kwdefaults__ or {}).items())
    h.update(_const(tuple(d for d in defaults if isinstance(d, (*_ATOMS, tuple)))).encode())
    for cell in obj.__closure__ or ():
        try:
            inner = cell.cell_contents
        except ValueError:  # empty cell
            continue
        if callable(inner) and hasattr(inner, "__code__"):
            _callable(inner, h, seen)
    wrapped = getattr(obj, "__wrapped__", None)
    if wrapped is not None:
        _callable(wrapped, h, seen)


def _class_digest(cls: type) -> bytes:
    h = hashlib.sha256()
    for klass in cls.__mro__:
        if klass in (torch.nn.Module, object):
            break
        h.update(f"{klass.__module__}.{klass.__qualname__}".encode())
        for name, value in sorted(vars(klass).items()):
            if isinstance(value, (types.FunctionType, staticmethod, classmethod, property, functools.partial)):
                h.update(name.encode())
                _callable(value, h, set())
    return h.digest()


def _module_digest(module: torch.nn.Module, classes: dict[type, bytes]) -> str:
    h = hashlib.sha256()
    if isinstance(module, torch.fx.GraphModule):
        h.update(b"GraphModule")
        h.update(module.code.encode())
    else:
        cls = type(module)
        if cls not in classes:
            classes[cls] = _class_digest(cls)
        h.update(classes[cls])
    tables = (module._parameters, module._buffers)
    h.update(repr([sorted((k, v is None) for k, v in t.items()) for t in tables]).encode())
    for key, value in sorted(vars(module).items()):
        if key in _SKIP_ATTRS or key.startswith("_"):
            continue
        if isinstance(value, _ATOMS) or (type(value) is tuple and all(isinstance(v, _ATOMS) for v in value)):
            h.update(f"{key}={_const(value)};".encode())
        elif isinstance(value, (types.FunctionType, types.MethodType, functools.partial)):
            h.update(f"{key}=<fn>".encode())
            _callable(value, h, set())
    return h.hexdigest()[:20]


def code_fingerprints(model: torch.nn.Module) -> dict[str, str]:
    """One digest per submodule of ``model`` (qualified name -> hex digest), as described above."""
    classes: dict[type, bytes] = {}
    return {name: _module_digest(m, classes) for name, m in model.named_modules()}


def code_fingerprint(model: torch.nn.Module) -> str:
    """One hex digest of ``model``'s code and module structure (``code_fingerprints`` combined)."""
    h = hashlib.sha256()
    for name, digest in code_fingerprints(model).items():
        h.update(f"{name}={digest};".encode())
    return h.hexdigest()


def check_same_code(model: torch.nn.Module, recorded: dict[str, str]) -> None:
    """Raise ``InputError`` unless ``model`` has the fingerprints ``recorded``
    (``code_fingerprints`` of the model a dependency graph was built from)."""
    now = code_fingerprints(model)
    if now == recorded:
        return
    modules = dict(model.named_modules())
    for name in list(recorded) + [n for n in now if n not in recorded]:
        if now.get(name) == recorded.get(name):
            continue
        label = f"module {name!r}" if name else "the root module"
        if name not in now:
            what = f"{label} is missing"
        elif name not in recorded:
            what = f"{label} ({type(modules[name]).__name__}) is new"
        else:
            what = f"{label} ({type(modules[name]).__name__}) runs other code or has other settings"
        raise InputError(f"this model is not the one the dependency graph was built from: {what}. "
                         "A graph only describes the code it traced; build the DependencyGraph again "
                         "for this model (gp.DependencyGraph.build(model, example_inputs))")
