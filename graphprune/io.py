"""Save, load and export slim models; a file never chooses what code runs.

A ``.gp`` file is a safetensors file: the slim model's tensors, and in its metadata a
JSON *spec* saying how to rebuild the slim architecture: the **origin** of the unpruned
model (a zoo name, or an import spec ``package.module:factory`` with keyword
arguments), the example input shapes and dtypes, and every plan applied to it, in
order, with the ``DependencyGraph.build`` options each plan was made with. A SHA-256
digest over the spec and the tensors detects damaged files.

``load`` rebuilds the original model from its origin, traces it, applies each plan
with ``gp.apply`` and loads the saved weights into the result. It calls only zoo
factories and factories in modules that the *caller* trusts (``trust=``); see
``graphprune.sources.import_trusted``. Every failure is a ``SerializationError``.
Files of format 1 (``torch.save`` zip files) still load, read with
``torch.load(weights_only=True)`` under the same rules.

>>> import graphprune as gp, tempfile, os, torch
>>> model, x = gp.zoo.create("mlp")
>>> slim = gp.prune(model, x, ratio=0.5, steps=2).model
>>> path = os.path.join(tempfile.mkdtemp(), "mlp_slim.gp")
>>> gp.save(slim, path, origin="mlp")        # checks that the file loads back to the same model
>>> again = gp.load(path)
>>> torch.equal(again(*x), slim(*x)), len(again.meta["graphprune"]["plans"])
(True, 2)
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx

from graphprune.errors import GraphPruneError, SerializationError
from graphprune.gpfile import FORMAT, FORMAT_VERSION, MAX_PLANS, input_shapes, read, write
from graphprune.sources import (  # noqa: F401  (re-exported: graphprune.io.build_origin and friends)
    LEAF_TRUST,
    MAX_BYTES,
    build_origin,
    importable_by_name,
    leaf_types,
    normalize_trust,
)
from graphprune.tracing import TRACE_LOCK, eval_mode, normalize_inputs

__all__ = ["save", "load", "export", "set_origin", "origin_of", "read_spec", "build_origin", "make_inputs",
           "FORMAT", "FORMAT_VERSION", "MAX_BYTES", "MAX_PLANS"]

LEGACY_GROUPED = "groups"  # what a file of format 1 or 2 without `grouped` was built with
_ORIGIN_KEYS = {"zoo", "factory", "kwargs", "leaf_modules", "factor", "grouped"}

_HOW_TO_ORIGIN = (
    "pass origin=, e.g. gp.save(slim, path, origin='resnet56') for a zoo model, "
    "origin='mypackage.models:make_model' for a function that returns the unpruned model "
    "(keyword arguments: origin={'factory': 'mypackage.models:make_model', 'kwargs': {...}}), "
    "or call gp.set_origin(slim, ...) once after pruning"
)


# --- origins and chains ---------------------------------------------------------------------------
def _refuse_unimportable(spec: str, what: str) -> None:
    module, _, attr = spec.partition(":")
    if module == "__main__" or "<locals>" in attr:
        where = "the script being run (__main__)" if module == "__main__" else "a function body"
        raise SerializationError(
            f"{what} {spec!r} is defined in {where}, which another process cannot import; move "
            f"{attr.split('.')[0]} into a module of its own (e.g. mymodels.py beside the script), pass "
            f"origin='mymodels:{attr.split('.')[0]}' and load with gp.load(path, trust=['mymodels'])")


def _build_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON form of non-default ``DependencyGraph.build`` options (leaf types as import paths)."""
    out: dict[str, Any] = {}
    leaves = [f"{t.__module__}:{t.__qualname__}" if isinstance(t, type) else str(t)
              for t in options.get("leaf_modules") or ()]
    for leaf in leaves:
        if ":" in leaf:
            _refuse_unimportable(leaf, "leaf module type")
    if leaves:
        out["leaf_modules"] = leaves
    for key, default in (("factor", "largest"), ("grouped", "channels")):
        if options.get(key) not in (None, default):
            out[key] = str(options[key])
    return out


def _plan_json(plan: Any) -> str:
    from graphprune.plan import Plan

    return plan if isinstance(plan, str) else (plan if isinstance(plan, Plan) else Plan(plan)).to_json()


def _meta(model: Any) -> dict[str, Any]:
    meta = getattr(model, "meta", None)
    rec = meta.get("graphprune") if isinstance(meta, dict) else None
    return rec if isinstance(rec, dict) else {}


def _chain(rec: Mapping[str, Any]) -> tuple[dict[str, Any] | None, list[str], list[Any]]:
    """A record's origin, every plan from the unpruned model to it, and each plan's build
    options (None where unknown). ``gp.apply`` carries the chain of a slim input model on."""
    plans = list(rec.get("plans") or ([rec["plan"]] if "plan" in rec else []))
    builds = rec.get("builds")
    if not isinstance(builds, list) or len(builds) != len(plans):
        builds = [rec.get("build")] if len(plans) == 1 else [None] * len(plans)
    org = dict(rec["origin"]) if isinstance(rec.get("origin"), Mapping) else None
    if org is not None and org.get("plans"):  # an origin that lists the plans made before this chain
        plans, builds = _join(org.pop("plans"), [], plans, builds)
    return org, plans, list(builds)


def _join(prefix: Sequence[Any], prefix_builds: Sequence[Any], plans: list[str],
          builds: list[Any]) -> tuple[list[str], list[Any]]:
    """``prefix`` then ``plans``, unless ``plans`` already starts with it (a carried chain)."""
    prefix = [_plan_json(p) for p in prefix]
    if plans[:len(prefix)] == prefix:
        return plans, builds
    pb = list(prefix_builds) if len(prefix_builds) == len(prefix) else [None] * len(prefix)
    return prefix + plans, pb + builds


def _normalize_origin(origin: Any) -> tuple[dict[str, Any], list[str], list[Any]]:
    """An origin as a JSON-ready dict, and the plans (with builds) that come before the slim's own."""
    if isinstance(origin, torch.nn.Module):
        org, plans, builds = _chain(_meta(origin))
        if org is None:
            raise SerializationError(f"origin= was given a {type(origin).__name__} that carries no origin "
                                     "record; " + _HOW_TO_ORIGIN)
        return _normalize_origin({k: v for k, v in org.items() if k in _ORIGIN_KEYS})[0], plans, builds
    if callable(origin) and hasattr(origin, "__qualname__"):
        origin = f"{origin.__module__}:{origin.__qualname__}"
    if isinstance(origin, str):
        origin = {"factory": origin} if ":" in origin else {"zoo": origin}
    if not isinstance(origin, Mapping):
        raise SerializationError(f"origin must be a zoo name, an import spec 'package.module:factory' or a "
                                 f"dict, got {type(origin).__name__}")
    unknown = set(origin) - _ORIGIN_KEYS - {"plans"}
    if unknown:
        raise SerializationError(f"origin has unknown keys {sorted(unknown)}; "
                                 "use zoo or factory, kwargs, leaf_modules, factor, grouped, plans")
    if ("zoo" in origin) == ("factory" in origin):
        raise SerializationError("origin needs exactly one of 'zoo' (a zoo model name) or "
                                 "'factory' (an import spec 'package.module:function')")
    out: dict[str, Any] = {}
    if "zoo" in origin:
        from graphprune import zoo

        if not zoo.exists(origin["zoo"]):  # a former name (zoo.ALIASES) still names its model
            raise SerializationError(f"origin names zoo model {origin['zoo']!r}, which does not exist; "
                                     f"choose one of: {', '.join(zoo.list_models())}")
        out["zoo"] = origin["zoo"]
    else:
        spec = origin["factory"]
        if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
            raise SerializationError(f"origin factory {spec!r} is not an import spec 'package.module:function'")
        _refuse_unimportable(spec, "origin factory")
        out["factory"] = spec
    kwargs = origin.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise SerializationError(f"origin kwargs must be a dict of keyword arguments, got {type(kwargs).__name__}")
    kwargs = dict(kwargs)
    try:
        json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"origin kwargs must be JSON values (numbers, strings, lists, dicts): "
                                 f"{exc}") from exc
    out["kwargs"] = kwargs
    out.update(_build_options(origin))
    return out, [_plan_json(p) for p in origin.get("plans") or ()], []


def set_origin(slim: torch.nn.Module, origin: Any, example_inputs: Any = None) -> torch.nn.Module:
    """Record in ``slim.meta['graphprune']`` how to rebuild its unpruned model; return ``slim``.

    ``origin`` is a zoo name, an import spec ``'package.module:factory'`` (or the factory
    itself), a dict ``{'zoo' | 'factory': ..., 'kwargs': {...}, 'leaf_modules': [...]}``,
    or a model returned by ``gp.load`` that ``slim`` was pruned from. After this,
    ``gp.save(slim, path)`` needs no ``origin``.
    """
    if not isinstance(slim, torch.fx.GraphModule) or "plan" not in _meta(slim):
        raise SerializationError(
            f"set_origin expects a slim model made by gp.apply or gp.prune, got {type(slim).__name__}")
    rec = slim.meta["graphprune"]
    org, prefix, prefix_builds = _normalize_origin(origin)
    _, plans, builds = _chain(rec)
    rec["origin"] = org
    rec["plans"], rec["builds"] = _join(prefix, prefix_builds, plans, builds)
    if example_inputs is not None:
        rec["inputs"] = _inputs_spec(example_inputs)
    return slim


def origin_of(model: torch.nn.Module) -> dict[str, Any] | None:
    """The origin recorded on a slim or loaded model, or None."""
    rec = _meta(model)
    return copy.deepcopy(rec["origin"]) if "origin" in rec else None


# --- example inputs --------------------------------------------------------------------------------
def _inputs_spec(example_inputs: Any) -> list[dict[str, Any]]:

    return [{"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
            for x in normalize_inputs(example_inputs)]


def _inputs_from_graph(gm: torch.fx.GraphModule) -> list[dict[str, Any]] | None:
    metas = [n.meta.get("tensor_meta") for n in gm.graph.nodes if n.op == "placeholder"]
    if not metas or any(tm is None for tm in metas):
        return None
    return [{"shape": list(tm.shape), "dtype": str(tm.dtype).removeprefix("torch.")} for tm in metas]


def make_inputs(specs: Sequence[Mapping[str, Any]], *, max_bytes: int = MAX_BYTES) -> tuple[torch.Tensor, ...]:
    """Zero tensors with the shapes and dtypes of an ``inputs`` spec.

    Shapes are checked before anything is allocated: non-negative integer sizes, at most
    16 dimensions and ``max_bytes`` in all (default ``MAX_BYTES``, 4 GiB); dtypes are
    numeric torch dtypes by name. Raises ``SerializationError``.
    """
    return tuple(torch.zeros(shape, dtype=dtype) for shape, dtype in input_shapes(specs, max_bytes))


def read_spec(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON spec of a saved file (origin, inputs, plans, versions); builds or imports nothing."""
    return _guard(path, lambda p: read(p)[0])


def _guard(path: Any, fn: Any) -> Any:
    """Run ``fn(Path(path))``; turn every failure into a SerializationError naming the file."""
    try:
        return fn(Path(path))
    except SerializationError:
        raise
    except Exception as exc:
        what = " ".join(str(exc).split())[:600]
        if not isinstance(exc, GraphPruneError):
            what = f"{type(exc).__name__}: {what}; the file is damaged, or its model's code has changed since saving"
        raise SerializationError(f"cannot load {str(path)!r}: {what}") from exc


# --- save / load -------------------------------------------------------------------------------------
def _trust_of(spec: Mapping[str, Any]) -> list[str]:
    """The modules a spec imports from (its factory and leaf types), outside graphprune's own."""
    names = [spec["origin"]["factory"]] if "factory" in spec["origin"] else []
    for b in [spec["origin"], *[b for b in spec.get("builds", []) if b]]:
        names += [n for n in b.get("leaf_modules", []) if ":" in n]
    return sorted({n.partition(":")[0] for n in names})


def load(path: str | os.PathLike, *, trust: Any = (), map_location: Any = "cpu",
         max_bytes: int = MAX_BYTES) -> torch.fx.GraphModule:
    """Rebuild a slim model saved by ``gp.save``.

    Only zoo models and factories (and leaf types) in modules named in ``trust`` are
    imported or called; a trusted name covers its submodules. ``max_bytes`` limits the
    example inputs and a model built with keyword arguments from the file. Every failure
    is a ``SerializationError`` that names the file. The result's ``meta['graphprune']``
    holds its origin, plans and example input spec
    (``graphprune.io.make_inputs(slim.meta['graphprune']['inputs'])`` gives inputs).
    """
    return _guard(path, lambda p: _load(p, normalize_trust(trust), map_location, max_bytes))


def _load(path: Path, trust: tuple[str, ...], map_location: Any, max_bytes: int) -> torch.fx.GraphModule:
    from graphprune.graph import DependencyGraph
    from graphprune.plan import Plan
    from graphprune.rewrite import apply

    spec, state = read(path)
    origin, plans = spec["origin"], spec["plans"]
    builds = spec.get("builds") or [None] * len(plans)
    if spec.get("version", 1) < 3:  # written when whole conv groups were the default of `grouped`
        origin = {"grouped": LEGACY_GROUPED, **origin}
        builds = [None if b is None else {"grouped": LEGACY_GROUPED, **b} for b in builds]
    for b in [origin, *[b for b in builds if b]]:  # every import is checked before the first call
        leaf_types(b.get("leaf_modules", []), trust)
    inputs = make_inputs(spec["inputs"], max_bytes=max_bytes)
    model, _ = build_origin(origin, trust=trust, max_bytes=max_bytes)
    try:
        for plan_json, build in zip(plans, builds):
            options = build if build is not None else origin
            dg = DependencyGraph.build(model, inputs, leaf_modules=leaf_types(options.get("leaf_modules", []), trust),
                                       **{k: options[k] for k in ("factor", "grouped") if k in options})
            model = apply(model, dg, Plan.from_json(plan_json))
    except GraphPruneError as exc:
        raise SerializationError(f"cannot rebuild the slim architecture of {str(path)!r} from {origin}: {exc}. "
                                 "Has the model's code changed since saving?") from exc
    want = model.state_dict()
    wrong = [f"{k} is {v.dtype} in the file, {want[k].dtype} in the model" for k, v in state.items()
             if k in want and v.dtype != want[k].dtype]
    if wrong:
        raise SerializationError(f"the weights in {str(path)!r} do not fit the rebuilt model: {'; '.join(wrong[:3])}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:400]
        raise SerializationError(f"the weights in {str(path)!r} do not fit the rebuilt model ({first}); has the "
                                 "model's code changed since saving, or were the plans made with other "
                                 "DependencyGraph.build options (pass them in origin: leaf_modules, factor)?") from exc
    model.train(bool(spec.get("training", False)))
    if str(map_location) != "cpu":
        model.to(map_location)
    model.meta["graphprune"] = {"plan": plans[-1], "plans": list(plans), "builds": list(builds),
                                "build": builds[-1] or {}, "origin": origin, "inputs": spec["inputs"],
                                "path": str(path)}
    return model


def _outputs(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[Any]:

    with torch.no_grad(), eval_mode(model):
        out = model(*inputs)
    leaves, todo = [], [out]
    while todo:
        x = todo.pop()
        if isinstance(x, Mapping):
            todo.extend(x[k] for k in sorted(x, key=str))
        elif isinstance(x, (tuple, list)):
            todo.extend(reversed(x))
        else:
            leaves.append(x)
    return leaves


def _same_outputs(a: list[Any], b: list[Any]) -> bool:
    def same(x: Any, y: Any) -> bool:
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            return type(x) is type(y) and bool(x == y)
        return x.shape == y.shape and x.dtype == y.dtype and (torch.equal(x, y) or x.is_floating_point() and bool(
            torch.allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True)))

    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def save(slim: torch.nn.Module, path: str | os.PathLike, *, origin: Any = None,
         example_inputs: Any = None) -> None:
    """Write ``slim`` (a model made by ``gp.prune``/``gp.apply``/``gp.load``) to one file.

    ``origin`` says how to rebuild the unpruned model (see ``set_origin``); it may be
    left out when ``slim`` already records one. ``example_inputs`` default to the
    shapes ``slim`` was traced with. Before returning, the file is loaded back and its
    outputs compared with ``slim``'s on the example inputs; if they differ (or it does
    not load), ``SerializationError`` is raised and no file is left.
    """
    if not isinstance(slim, torch.fx.GraphModule) or "plan" not in _meta(slim):
        raise SerializationError(
            f"gp.save expects a slim model made by gp.prune, gp.apply or gp.load (a GraphModule "
            f"whose meta['graphprune'] holds its plan), got {type(slim).__name__}; to keep an "
            "unpruned model, save its state_dict with torch.save")
    org, plans, builds = _chain(_meta(slim))
    if origin is not None and origin is not slim:
        org, prefix, prefix_builds = _normalize_origin(origin)
        plans, builds = _join(prefix, prefix_builds, plans, builds)
    elif org is not None:
        org = _normalize_origin({k: v for k, v in org.items() if k in _ORIGIN_KEYS})[0]
    if org is None:
        raise SerializationError("cannot save: graphprune does not know how to rebuild the "
                                 "unpruned model this slim model came from; " + _HOW_TO_ORIGIN)
    if len(plans) > MAX_PLANS:
        raise SerializationError(f"{len(plans)} plans are more than a file holds ({MAX_PLANS}); prune in fewer steps")
    spec_builds = [_build_options(b) if isinstance(b, Mapping) else None for b in builds]
    if example_inputs is not None:
        inputs = _inputs_spec(example_inputs)
    else:
        inputs = _meta(slim).get("inputs") or _inputs_from_graph(slim)
        if inputs is None:
            raise SerializationError("cannot tell the example input shapes of this slim model; "
                                     "pass example_inputs= to gp.save")
    from graphprune import __version__

    spec = {"format": FORMAT, "version": FORMAT_VERSION, "graphprune": __version__, "torch": torch.__version__,
            "class_name": type(slim).__name__, "origin": org, "inputs": inputs, "plans": plans,
            "builds": spec_builds, "training": bool(slim.training)}
    for module in _trust_of(spec):
        if not importable_by_name(module):
            raise SerializationError(f"module {module!r} (named in the origin) cannot be imported by name in "
                                     "another process; put its folder on PYTHONPATH or make it an installed package")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp, spec, slim.state_dict())
        _check_round_trip(slim, tmp, spec, example_inputs)
        os.replace(tmp, path)
    except SerializationError:
        raise
    except Exception as exc:  # OSError: the folder or disk; anything else: the slim model fails to run
        why = exc.strerror or exc if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        raise SerializationError(f"cannot write {str(path)!r}: {why}") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _check_round_trip(slim: torch.fx.GraphModule, tmp: Path, spec: Mapping[str, Any], example_inputs: Any) -> None:
    from graphprune.sources import sample_inputs

    try:
        again = load(tmp, trust=_trust_of(spec), max_bytes=2**62)
    except SerializationError as exc:
        raise SerializationError(f"gp.save would write a file that does not load ({exc}); nothing was "
                                 "written. Check origin= (it must build the unpruned model)") from exc
    inputs = normalize_inputs(example_inputs) if example_inputs is not None else sample_inputs(spec["inputs"])
    device = next((t.device for t in slim.state_dict().values()), torch.device("cpu"))
    inputs = tuple(x.to(device) for x in inputs)
    if not _same_outputs(_outputs(slim, inputs), _outputs(again.to(device), inputs)):
        raise SerializationError("gp.save would write a file that loads to a model with other outputs; nothing "
                                 "was written. Check origin= (it must build the unpruned model the plans were "
                                 "made on) and the DependencyGraph.build options (leaf_modules, factor)")


# --- export --------------------------------------------------------------------------------------
def _batch_dynamic(inputs: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    from torch.export import Dim

    dim = getattr(Dim, "AUTO", None) or Dim("batch")
    return tuple({0: dim} if x.dim() else None for x in inputs)


def export(model: torch.nn.Module, example_inputs: Any, path: str | os.PathLike,
           dynamic_shapes: Any = None) -> Path:
    """Export ``model`` for deployment: ``.onnx`` through ONNX, anything else via ``torch.export``.

    The first (batch) dimension of every input is dynamic unless ``dynamic_shapes``
    (``torch.export`` form) says otherwise; pass ``dynamic_shapes=False`` for static
    shapes. ``.pt2`` files are written with ``torch.export.save`` and read with
    ``torch.export.load``. ONNX export needs the ``onnx`` and ``onnxscript`` packages.
    """

    inputs = normalize_inputs(example_inputs)
    shapes = _batch_dynamic(inputs) if dynamic_shapes is None else (dynamic_shapes or None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with eval_mode(model):
        if path.suffix.lower() == ".onnx":
            missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
            if missing:
                raise SerializationError(f"ONNX export needs {' and '.join(missing)}: pip install {' '.join(missing)}")
            try:
                with TRACE_LOCK:  # torch.export patches globals: one tracer at a time (see tracing)
                    torch.onnx.export(model, inputs, str(path), dynamo=True, dynamic_shapes=shapes)
            except Exception as exc:
                raise SerializationError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
        else:
            try:
                with TRACE_LOCK:
                    program = torch.export.export(model, inputs, dynamic_shapes=shapes)
                torch.export.save(program, str(path))
            except Exception as exc:
                raise SerializationError(f"torch.export failed: {type(exc).__name__}: {exc}") from exc
    return path
