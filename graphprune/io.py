"""Save, load and export slim models without pickling code.

A saved file holds two things, written with ``torch.save`` and read back with
``torch.load(..., weights_only=True)`` (so no pickled code runs on load):

- ``state_dict``: the slim model's tensors;
- ``spec``: a JSON string saying how to rebuild the slim architecture: the *origin*
  of the unpruned model (a zoo name, or an import spec ``package.module:factory``,
  with keyword arguments), the example input shapes and dtypes, and the plans that
  were applied to it, in order.

``load`` rebuilds the original model from its origin, traces it, applies each plan
with ``gp.apply`` and loads the saved weights into the result. The only code it runs
is graphprune's and the factory named in the spec (your own, importable code).

A slim model made by ``gp.prune`` / ``gp.apply`` does not know where its original
came from, so say it once, when saving or with ``set_origin``:

>>> import graphprune as gp, tempfile, os, torch
>>> model, x = gp.zoo.create("mlp")
>>> slim = gp.prune(model, x, ratio=0.5).model
>>> path = os.path.join(tempfile.mkdtemp(), "mlp_slim.gp")
>>> gp.save(slim, path, origin="mlp")
>>> again = gp.load(path)
>>> torch.equal(again(*x), slim(*x))
True
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx

from graphprune.errors import GraphPruneError, InputError, SerializationError

__all__ = ["save", "load", "export", "set_origin", "origin_of", "read_spec", "build_origin",
           "FORMAT", "FORMAT_VERSION"]

FORMAT = "graphprune-slim"
FORMAT_VERSION = 1

_HOW_TO_ORIGIN = (
    "pass origin=, e.g. gp.save(slim, path, origin='resnet56') for a zoo model, "
    "origin='mypackage.models:make_model' for a function that returns the unpruned model "
    "(keyword arguments: origin={'factory': 'mypackage.models:make_model', 'kwargs': {...}}), "
    "or call gp.set_origin(slim, ...) once after pruning"
)


# --- origins -----------------------------------------------------------------------------
def _type_path(t: type) -> str:
    return f"{t.__module__}:{t.__qualname__}"


def _normalize_origin(origin: Any) -> dict[str, Any]:
    """An origin as a JSON-ready dict: {'zoo' | 'factory', 'kwargs', 'leaf_modules', 'factor', 'plans'}.

    ``leaf_modules`` and ``factor`` are the ``DependencyGraph.build`` options the plans
    were made with (group ids depend on them).
    """
    if isinstance(origin, torch.nn.Module):
        rec = _meta(origin)
        if "origin" not in rec:
            raise SerializationError(
                f"origin= was given a {type(origin).__name__} that carries no origin record; "
                + _HOW_TO_ORIGIN)
        org, plans = _chain(rec)
        return {**org, "plans": plans}
    if isinstance(origin, str):
        origin = {"factory": origin} if ":" in origin else {"zoo": origin}
    if not isinstance(origin, Mapping):
        raise SerializationError(
            f"origin must be a zoo name, an import spec 'package.module:factory' or a dict, "
            f"got {type(origin).__name__}")
    unknown = set(origin) - {"zoo", "factory", "kwargs", "leaf_modules", "factor", "grouped", "plans"}
    if unknown:
        raise SerializationError(f"origin has unknown keys {sorted(unknown)}; "
                                 "use zoo or factory, kwargs, leaf_modules, factor, plans")
    if ("zoo" in origin) == ("factory" in origin):
        raise SerializationError("origin needs exactly one of 'zoo' (a zoo model name) or "
                                 "'factory' (an import spec 'package.module:function')")
    out: dict[str, Any] = {}
    if "zoo" in origin:
        from graphprune import zoo

        name = origin["zoo"]
        if name not in zoo.list_models():
            raise SerializationError(f"origin names zoo model {name!r}, which does not exist; "
                                     f"choose one of: {', '.join(zoo.list_models())}")
        out["zoo"] = name
    else:
        spec = origin["factory"]
        if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
            raise SerializationError(f"origin factory {spec!r} is not an import spec "
                                     "'package.module:function'")
        out["factory"] = spec
    kwargs = dict(origin.get("kwargs") or {})
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"origin kwargs must be JSON values (numbers, strings, lists, "
                                 f"dicts): {exc}") from exc
    out["kwargs"] = kwargs
    out.update(_build_options(origin))
    if origin.get("plans"):
        out["plans"] = [p if isinstance(p, str) else _plan_json(p) for p in origin["plans"]]
    return out


def _build_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON form of non-default ``DependencyGraph.build`` options (leaf types as import paths)."""
    out: dict[str, Any] = {}
    leaves = [_type_path(leaf) if isinstance(leaf, type) else str(leaf)
              for leaf in options.get("leaf_modules") or ()]
    if leaves:
        out["leaf_modules"] = leaves
    defaults = {"factor": "largest", "grouped": "groups"}
    for key, default in defaults.items():
        if options.get(key) not in (None, default):
            out[key] = str(options[key])
    return out


def _plan_json(plan: Any) -> str:
    from graphprune.plan import Plan

    return (plan if isinstance(plan, Plan) else Plan(plan)).to_json()


def _meta(model: torch.nn.Module) -> dict[str, Any]:
    meta = getattr(model, "meta", None)
    rec = meta.get("graphprune") if isinstance(meta, dict) else None
    return rec if isinstance(rec, dict) else {}


def _chain(rec: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A record's origin (without plans) and every plan from the unpruned model to it.

    ``gp.load`` stores the whole chain in ``plans``; a slim made by ``gp.apply`` holds
    only its last ``plan``, and its origin may list the plans made before it.
    """
    org = dict(rec["origin"])
    prior = list(org.pop("plans", []))
    plans = list(rec["plans"]) if "plans" in rec else prior + [rec["plan"]]
    return org, plans


def _inputs_spec(example_inputs: Any) -> list[dict[str, Any]]:
    from graphprune.tracing import normalize_inputs

    return [{"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
            for x in normalize_inputs(example_inputs)]


def _inputs_from_graph(gm: torch.fx.GraphModule) -> list[dict[str, Any]] | None:
    specs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        tm = node.meta.get("tensor_meta")
        if tm is None:
            return None
        specs.append({"shape": list(tm.shape), "dtype": str(tm.dtype).removeprefix("torch.")})
    return specs or None


def make_inputs(specs: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, ...]:
    """Zero tensors with the shapes and dtypes of an ``inputs`` spec."""
    out = []
    for s in specs:
        dtype = getattr(torch, str(s["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise SerializationError(f"unknown input dtype {s['dtype']!r} in the saved spec")
        out.append(torch.zeros([int(n) for n in s["shape"]], dtype=dtype))
    return tuple(out)


def set_origin(slim: torch.nn.Module, origin: Any, example_inputs: Any = None) -> torch.nn.Module:
    """Record in ``slim.meta['graphprune']`` how to rebuild its unpruned model; return ``slim``.

    ``origin`` is a zoo name, an import spec ``'package.module:factory'``, a dict
    ``{'zoo' | 'factory': ..., 'kwargs': {...}, 'leaf_modules': [...]}``, or a model
    returned by ``gp.load`` when ``slim`` was pruned further from it. After this,
    ``gp.save(slim, path)`` needs no ``origin``.
    """
    if not isinstance(slim, torch.fx.GraphModule) or "plan" not in _meta(slim):
        raise SerializationError(
            f"set_origin expects a slim model made by gp.apply or gp.prune, got {type(slim).__name__}")
    rec = slim.meta["graphprune"]
    rec["origin"] = _normalize_origin(origin)
    if example_inputs is not None:
        rec["inputs"] = _inputs_spec(example_inputs)
    return slim


def origin_of(model: torch.nn.Module) -> dict[str, Any] | None:
    """The origin recorded on a slim or loaded model, or None."""
    rec = _meta(model)
    return copy.deepcopy(rec["origin"]) if "origin" in rec else None


def _import_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"cannot import module {module_name!r} of {spec!r}: {exc}. "
                         "Check the name and that its folder is on PYTHONPATH") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"module {module_name!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"{spec!r} is a {type(obj).__name__}, not a function or class")
    return obj


def build_origin(origin: Mapping[str, Any]) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...] | None]:
    """Build the unpruned model an origin describes; also its example inputs when known."""
    kwargs = dict(origin.get("kwargs") or {})
    if "zoo" in origin:
        from graphprune import zoo

        try:
            return zoo.create(origin["zoo"], **kwargs)
        except (TypeError, ValueError) as exc:
            raise InputError(f"zoo model {origin['zoo']!r} with kwargs {kwargs}: {exc}") from exc
    factory = _import_factory(origin["factory"])
    try:
        made = factory(**kwargs)
    except GraphPruneError:
        raise
    except Exception as exc:
        raise InputError(f"calling {origin['factory']}(**{kwargs}) failed: "
                         f"{type(exc).__name__}: {exc}") from exc
    inputs = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        made, inputs = made
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
    if not isinstance(made, torch.nn.Module):
        raise InputError(f"{origin['factory']} returned a {type(made).__name__}; it must return "
                         "an nn.Module (or a tuple (model, example_inputs))")
    return made, (tuple(inputs) if inputs is not None else None)


def _leaf_modules(names: Sequence[str]) -> list[type | str]:
    out: list[type | str] = []
    for n in names:
        out.append(_import_factory(n) if ":" in n else n)
    return out


# --- save / load ---------------------------------------------------------------------------
def save(slim: torch.nn.Module, path: str | os.PathLike, *, origin: Any = None,
         example_inputs: Any = None) -> None:
    """Write ``slim`` (a model made by ``gp.prune``/``gp.apply``/``gp.load``) to one file.

    ``origin`` says how to rebuild the unpruned model (see ``set_origin``); it may be
    left out when ``slim`` already records one. ``example_inputs`` default to the
    shapes ``slim`` was traced with.
    """
    if not isinstance(slim, torch.fx.GraphModule) or "plan" not in _meta(slim):
        raise SerializationError(
            f"gp.save expects a slim model made by gp.prune, gp.apply or gp.load (a GraphModule "
            f"whose meta['graphprune'] holds its plan), got {type(slim).__name__}; to keep an "
            "unpruned model, save its state_dict with torch.save")
    rec = _meta(slim)
    if origin is not None and origin is not slim:
        org = _normalize_origin(origin)
        plans = org.pop("plans", []) + [rec["plan"]]
    elif "origin" in rec:
        org, plans = _chain(rec)
    else:
        org = None
    if org is None:
        raise SerializationError("cannot save: graphprune does not know how to rebuild the "
                                 "unpruned model this slim model came from; " + _HOW_TO_ORIGIN)
    build = rec.get("build")  # DependencyGraph.build options, when the rewrite records them
    if isinstance(build, Mapping):
        for key, value in _build_options(build).items():
            org.setdefault(key, value)
    if example_inputs is not None:
        inputs = _inputs_spec(example_inputs)
    else:
        inputs = rec.get("inputs") or _inputs_from_graph(slim)
        if inputs is None:
            raise SerializationError("cannot tell the example input shapes of this slim model; "
                                     "pass example_inputs= to gp.save")
    from graphprune import __version__

    spec = {
        "format": FORMAT, "version": FORMAT_VERSION, "graphprune": __version__,
        "torch": torch.__version__, "class_name": type(slim).__name__,
        "origin": org, "inputs": inputs, "plans": plans, "training": bool(slim.training),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in slim.state_dict().items()}
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"format": FORMAT, "spec": json.dumps(spec), "state_dict": state}, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise SerializationError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc


def _read(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[dict[str, Any], dict]:
    path = Path(path)
    if not path.is_file():
        raise SerializationError(f"no such file: {str(path)!r}")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip errors, unpickling refusals: all mean "not our file"
        raise SerializationError(
            f"{str(path)!r} is not a graphprune file: torch.load(weights_only=True) refused it "
            f"({type(exc).__name__}); graphprune files hold only tensors and JSON") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or "spec" not in blob:
        raise SerializationError(f"{str(path)!r} is not a graphprune file (made by gp.save)")
    try:
        spec = json.loads(blob["spec"])
    except (TypeError, json.JSONDecodeError) as exc:
        raise SerializationError(f"{str(path)!r} has a malformed spec: {exc}") from exc
    if spec.get("version", 0) > FORMAT_VERSION:
        raise SerializationError(f"{str(path)!r} was written by a newer graphprune "
                                 f"(format {spec.get('version')}); upgrade graphprune to load it")
    for key in ("origin", "inputs", "plans"):
        if key not in spec:
            raise SerializationError(f"{str(path)!r} spec lacks {key!r}")
    return spec, blob.get("state_dict", {})


def read_spec(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON spec of a saved file (origin, inputs, plans, versions); rebuilds nothing."""
    return _read(path)[0]


def load(path: str | os.PathLike, *, map_location: Any = "cpu") -> torch.fx.GraphModule:
    """Rebuild a slim model saved by ``gp.save``; only tensors and JSON are read from the file.

    The result's ``meta['graphprune']`` holds its origin, plans and example input
    spec; ``graphprune.io.make_inputs(slim.meta['graphprune']['inputs'])`` gives inputs.
    """
    from graphprune.graph import DependencyGraph
    from graphprune.plan import Plan
    from graphprune.rewrite import apply

    spec, state = _read(path, map_location)
    origin = spec["origin"]
    model, _ = build_origin(origin)
    inputs = make_inputs(spec["inputs"])
    options: dict[str, Any] = {"leaf_modules": _leaf_modules(origin.get("leaf_modules", ()))}
    for key in ("factor", "grouped"):
        if origin.get(key) is not None:
            options[key] = origin[key]
    try:
        for plan_json in spec["plans"]:
            dg = DependencyGraph.build(model, inputs, **options)
            model = apply(model, dg, Plan.from_json(plan_json))
    except GraphPruneError as exc:
        raise SerializationError(f"cannot rebuild the slim architecture of {str(path)!r} from "
                                 f"{origin}: {exc}. Has the model's code changed since saving?") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:400]
        raise SerializationError(f"the weights in {str(path)!r} do not fit the rebuilt model ({first}); "
                                 "has the model's code changed since saving, or were the plans made with "
                                 "other DependencyGraph.build options (pass them in origin: leaf_modules, "
                                 "factor)?") from exc
    model.train(bool(spec.get("training", False)))
    model.meta["graphprune"] = {"plan": spec["plans"][-1], "plans": list(spec["plans"]),
                                "origin": origin, "inputs": spec["inputs"], "path": str(path)}
    return model


# --- export ----------------------------------------------------------------------------------
def export(model: torch.nn.Module, example_inputs: Any, path: str | os.PathLike) -> Path:
    """Export ``model`` for deployment: ``.onnx`` through ONNX, anything else via ``torch.export``.

    ``.pt2`` files are written with ``torch.export.save`` and read with
    ``torch.export.load``. ONNX export needs the ``onnx`` and ``onnxscript`` packages.
    """
    from graphprune.tracing import normalize_inputs

    inputs = normalize_inputs(example_inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        if path.suffix.lower() == ".onnx":
            missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
            if missing:
                raise SerializationError(f"ONNX export needs {' and '.join(missing)}: "
                                         f"pip install {' '.join(missing)}")
            try:
                torch.onnx.export(model, inputs, str(path), dynamo=True)
            except GraphPruneError:
                raise
            except Exception as exc:
                raise SerializationError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
        else:
            try:
                program = torch.export.export(model, inputs)
                torch.export.save(program, str(path))
            except Exception as exc:
                raise SerializationError(f"torch.export failed: {type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
    return path
