"""Trace a module into a torch.fx graph whose nodes know their output shapes.

``trace`` is the first stage of the pipeline: symbolic tracing with a tracer that
honours user leaf modules, then one run over the example inputs that records every
node's output in ``node.meta``:

- ``node.meta["shape"]``: a ``torch.Size`` for a tensor, a nested tuple of them for
  tuple outputs, the value itself for Python scalars (``x.size(1)``);
- ``node.meta["tensor_meta"]``: the usual fx ``TensorMetadata`` of the example inputs
  (placeholders only: building it costs about half a millisecond per tensor).

The user's module and the example inputs are never changed: buffers that a forward
pass may update (BatchNorm running statistics in training mode) are restored, attributes
a forward stores on ``self`` are undone (``preserve.untouched``), and the recording run
gets copies of the inputs. Uninitialised lazy modules are refused rather than
materialised.

Tracing may be called from several threads. ``trace`` runs under one lock: torch.fx
patches globals (``Module.__call__``/``__getattr__``, wrapped functions), torch.export
rebinds a model's tensors, and the recording run updates buffers and restores them, so
two traces never overlap, even of one model. fx's patched methods act only in the
thread that installed them, so modules that other threads call meanwhile run as usual;
torch.export works on a ``structural_copy`` of the model, so other threads never see
its parameters swapped.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import threading
import traceback
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.fx
import torch.fx._symbolic_trace as _fx_trace

from graphprune.errors import InputError, TraceError, warn_user
from graphprune.export_trace import export_trace, mode_dependent
from graphprune.fidelity import outputs_differ, same_random_state
from graphprune.fingerprint import check_same_code, code_fingerprint, code_fingerprints
from graphprune.inputs import BoundInputs, bind_inputs, fixed_arguments, fresh_inputs, normalize_inputs  # noqa: F401
from graphprune.preserve import untouched
from graphprune.rules.base import has_own_module_rule
from graphprune.shapes import kept_buffers, propagate_shapes, shape_of

__all__ = ["trace", "normalize_inputs", "bind_inputs", "BoundInputs", "shape_of", "named_state", "GraphTracer", "TRACE_LOCK",
           "code_fingerprint", "code_fingerprints", "check_same_code"]

TRACE_LOCK = threading.RLock()
"""Held by ``trace`` (torch.fx and torch.export patch process-wide state while they run);
take it around any other ``torch.export.export`` / ``symbolic_trace`` call in a program
that traces from several threads."""

try:  # generates the traced graph's Python code only if something calls it (the shape run does not)
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModule
except ImportError:  # pragma: no cover - older torch
    _GraphModule = torch.fx.GraphModule

_TORCH_DIR = os.path.dirname(torch.__file__)
_PACKAGE_DIR = os.path.dirname(__file__)


# torch's transformer stacks are traced through (their attention, linear and norm layers have
# rules), with the fused fast path off while tracing and their probe of nested tensors
# answered for traced values (it only serves the causal-mask check, unused without a mask)
_TRACED_THROUGH = (torch.nn.TransformerEncoder, torch.nn.TransformerEncoderLayer,
                   torch.nn.TransformerDecoder, torch.nn.TransformerDecoderLayer, torch.nn.Transformer)


class GraphTracer(torch.fx.Tracer):
    """fx tracer that keeps user leaf modules whole and remembers where tracing is."""

    def __init__(self, leaf_modules: Iterable[type | str] = ()) -> None:
        super().__init__()
        self.leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self.leaf_names = {t for t in leaf_modules if isinstance(t, str)}
        self.current_module = ""
        self.failed_module: str | None = None

    def trace(self, root: Any, concrete_args: dict | None = None) -> torch.fx.Graph:
        with TRACE_LOCK, _thread_patches(), _no_fastpath():
            return super().trace(root, concrete_args)

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names:
            return True
        if has_own_module_rule(type(m)):  # a user registered a rule for exactly this type
            return True
        if type(m) in _TRACED_THROUGH:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):  # noqa: ANN001 - fx signature
        outer = self.current_module
        self.current_module = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                self.failed_module = self.current_module
            raise
        finally:
            self.current_module = outer


@contextlib.contextmanager
def _no_fastpath() -> Iterator[None]:
    """The fused transformer fast path off (it checks tensors in Python and calls one fused op),
    and torch's ``_get_seq_len`` (``if src.is_nested``) answering ``None`` for traced values."""
    from torch.nn.modules import transformer

    was, seq_len = torch.backends.mha.get_fastpath_enabled(), transformer._get_seq_len

    def traced_seq_len(src: Any, batch_first: bool) -> Any:
        return None if isinstance(src, torch.fx.Proxy) else seq_len(src, batch_first)

    torch.backends.mha.set_fastpath_enabled(False)
    transformer._get_seq_len = traced_seq_len
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)
        transformer._get_seq_len = seq_len


def _owned(new: Any, orig: Any, owner: int) -> Any:
    """``new`` in thread ``owner``, ``orig`` in every other thread."""
    @functools.wraps(new)
    def call(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == owner:
            return new(*args, **kwargs)
        return orig(*args, **kwargs)

    return call


if hasattr(_fx_trace, "_Patcher") and hasattr(_fx_trace, "_new_patcher"):
    class _ThreadPatcher(_fx_trace._Patcher):
        """fx's patcher, but a patched class method (``Module.__call__``, ``Module.__getattr__``,
        wrapped tensor methods) acts only in the thread that is tracing."""

        def __init__(self) -> None:
            super().__init__()
            self.owner = threading.get_ident()

        def patch_method(self, cls: type, name: str, new_fn: Any, deduplicate: bool = True) -> None:
            super().patch_method(cls, name, _owned(new_fn, getattr(cls, name), self.owner), deduplicate)

    @contextlib.contextmanager
    def _new_thread_patcher() -> Iterator[Any]:  # fx's _new_patcher, with a _ThreadPatcher
        prior = _fx_trace.CURRENT_PATCHER
        try:
            _fx_trace.CURRENT_PATCHER = _ThreadPatcher()
            yield _fx_trace.CURRENT_PATCHER
        finally:
            _fx_trace.CURRENT_PATCHER.revert_all_patches()
            _fx_trace.CURRENT_PATCHER = prior

    @contextlib.contextmanager
    def _thread_patches() -> Iterator[None]:
        """While fx traces (under ``TRACE_LOCK``), its patches are made by a ``_ThreadPatcher``."""
        original = _fx_trace._new_patcher
        _fx_trace._new_patcher = _new_thread_patcher
        try:
            yield
        finally:
            _fx_trace._new_patcher = original
else:  # pragma: no cover - other torch versions: the lock alone serialises tracing
    _thread_patches = contextlib.nullcontext


def named_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``dict(module.named_parameters())`` updated with ``dict(module.named_buffers())``,
    from one walk over the submodules (each tensor once, under its first name)."""
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    seen: tuple[set[int], set[int]] = (set(), set())
    for prefix, m in module.named_modules():
        dot = prefix + "." if prefix else ""
        for table, out, ids in ((m._parameters, params, seen[0]), (m._buffers, buffers, seen[1])):
            for key, t in table.items():
                if t is not None and id(t) not in ids:
                    ids.add(id(t))
                    out[dot + key] = t
    params.update(buffers)
    return params


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Evaluate in eval mode (running statistics, no dropout); restore flags afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def check_model(model: Any) -> None:
    """Reject what cannot be pruned exactly: non-modules, lazy modules, half precision, a model
    partly on the meta device. A model wholly on the meta device is structure without
    weights: it is traced, grouped, planned and rewritten without computing a value."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        lazy = [k for k, t in [*m._parameters.items(), *m._buffers.items()] if torch.nn.parameter.is_lazy(t)]
        if lazy:
            raise InputError(
                f"module {name or type(model).__name__!r} ({type(m).__name__}) has uninitialised "
                f"(lazy) {', '.join(lazy)}; run one forward pass first (model(*example_inputs)), "
                "which gives them their shapes, then prune")
    state = named_state(model)
    on_meta = [name for name, t in state.items() if t.device.type == "meta"]
    if on_meta and len(on_meta) != len(state):
        raise InputError(
            f"{on_meta[0]!r} is on the meta device but other tensors are not; put the whole model on the "
            "meta device (structure only) or materialise it (model.to_empty(device='cpu') and load weights)")
    for name, t in state.items():
        if on_meta:  # structure without weights: any dtype, nothing is computed on values
            continue
        if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
            raise InputError(
                f"{name!r} has dtype {t.dtype}; graphprune analyses float32/float64 models. "
                "Call model.float() first and convert the slim model back afterwards"
            )


def on_meta_device(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds its tensors on the meta device (structure without weights)."""
    t = next(iter(named_state(model).values()), None)
    return t is not None and t.device.type == "meta"


def require_values(model: torch.nn.Module, what: str) -> None:
    """``InputError`` if ``model`` is structure only (on the meta device) and ``what`` needs weights."""
    if on_meta_device(model):
        raise InputError(f"{what} needs the model's weights, but it is on the meta device (structure only); "
                         "use a structure-only criterion (method='random') or materialise the model "
                         "(model.to_empty(device='cpu') and load its weights)")


def _user_frame(tb: Any) -> str:
    """The innermost frame of the traceback that is the user's code, as 'file:line'."""
    where = ""
    for frame in traceback.extract_tb(tb):
        if not frame.filename.startswith((_TORCH_DIR, _PACKAGE_DIR)):
            where = f"{frame.filename}:{frame.lineno} ({frame.line.strip() if frame.line else ''})"
    return where


def _bake_concrete(graph: torch.fx.Graph, concrete: dict[str, Any]) -> None:
    """fx keeps an input for every concrete argument (already baked into the computation),
    guarded to have the traced value: drop the guards and those inputs, so the graph takes
    only the other inputs."""
    def is_guard(node: torch.fx.Node) -> bool:
        return node.op == "call_function" and "has been specialized" in " ".join(
            a for a in node.args if isinstance(a, str))

    for node in reversed(list(graph.nodes)):
        if is_guard(node) or (node.op == "call_function" and node.target is operator.eq and not node.users):
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "placeholder" and not node.users and any(
                node.target == name or node.target.rsplit("_", 1)[0] == name for name in concrete):
            graph.erase_node(node)


def _symbolic_trace(
    model: torch.nn.Module, leaf_modules: Iterable[type | str], concrete_args: dict | None
) -> torch.fx.GraphModule:
    tracer = GraphTracer(leaf_modules)
    try:
        with untouched(model):  # fx stores tensor constants (and a forward its proxies) on modules
            graph = tracer.trace(model, concrete_args=concrete_args)
            _bake_concrete(graph, concrete_args or {})
            return _GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # fx raises many kinds; all mean "not traceable"
        path = tracer.failed_module or ""
        module = model.get_submodule(path) if path else model
        where = _user_frame(exc.__traceback__)
        advice = (f"mark it as a leaf (leaf_modules=[{type(module).__name__}]; its channels are then kept) "
                  "or fix the branch with concrete_args" if path else
                  "fix the branch with concrete_args, or make it traceable")
        raise TraceError(
            f"cannot trace module {path or type(model).__name__!r} ({type(module).__name__})"
            + (f" at {where}" if where else "")
            + f": {type(exc).__name__}: {exc}. Data-dependent control flow and some Python "
            f"constructs cannot be traced symbolically: {advice}."
        ) from exc


def _export_trace(model: torch.nn.Module, inputs: BoundInputs | tuple, fx_error: TraceError,
                  training: list[str] | None = None) -> torch.fx.GraphModule:
    """``export_trace.export_trace`` under the tracing lock, with the model left as it was."""
    bound = inputs if isinstance(inputs, BoundInputs) else BoundInputs(tuple(inputs))
    with TRACE_LOCK, untouched(model):
        return export_trace(model, bound, fx_error, training)


def _recorded_difference(gm: torch.fx.GraphModule, model: torch.nn.Module, bound: BoundInputs,
                         check: bool = True) -> str | None:
    """Record shapes on ``gm``, then say how its output differs from the model's own (see
    ``graphprune.fidelity``); nothing is compared for a model on the meta device, nor
    without ``check``."""
    with same_random_state():
        got = propagate_shapes(gm, fresh_inputs(bound.tensors))
    if not check or (bound.tensors and bound.tensors[0].device.type == "meta"):
        return None
    with same_random_state(), kept_buffers(model), torch.no_grad():
        want = bound.run(model, fresh_inputs(bound.tensors))
    return outputs_differ(got, want)


def _warn_traced_in_eval(gm: torch.fx.GraphModule, training: list[str]) -> None:
    """Warn about modules in training mode whose own code (traced through, not a leaf) reads
    ``self.training``: the graph keeps their eval-mode branch."""
    leaves = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    through = [name for name in training if name not in leaves
               and not any(name.startswith(leaf + ".") for leaf in leaves)]
    if through:
        shown = ", ".join(repr(n) for n in through[:4]) + (" ..." if len(through) > 4 else "")
        warn_user(f"{gm.__class__.__name__}: {shown} in training mode read self.training in code that was "
                  "traced through; the graph records their eval-mode branch (F.dropout(x, p, self.training) "
                  "is off), while dropout and norm modules still follow train()/eval(). Call model.eval() "
                  "first to silence this")


def _faithful_trace(model: torch.nn.Module, bound: BoundInputs, leaf_modules: Iterable[type | str],
                    concrete_args: dict | None, export_fallback: bool, training: list[str],
                    check: bool = True) -> torch.fx.GraphModule:
    """The torch.fx graph, shape-recorded, if it computes what the model computes; else the
    torch.export graph if that does; else ``TraceError``."""
    fixed = {**fixed_arguments(model, bound), **(concrete_args or {})}
    try:
        gm = _symbolic_trace(model, leaf_modules, fixed or None)
    except TraceError as exc:
        fx_error = exc
    else:
        difference = _recorded_difference(gm, model, bound, check)
        if difference is None:
            _warn_traced_in_eval(gm, training)
            return gm
        fx_error = TraceError(
            f"the torch.fx graph of {type(model).__name__} does not compute what the model computes on "
            f"the example inputs: {difference}. Python that symbolic tracing records differently (an "
            "augmented assignment through an alias, y = x; y += 1) is the usual cause; write it out of "
            "place (y = x + 1) or in place on purpose (x.add_(1))")
    if not export_fallback:
        raise fx_error
    gm = _export_trace(model, bound, fx_error, training)
    difference = _recorded_difference(gm, model, bound, check)
    if difference is not None:
        raise TraceError(f"{fx_error} The torch.export graph differs from the model too: {difference}; "
                         "graphprune cannot prune a model it cannot trace faithfully") from fx_error
    return gm


def _check_fixed(given: Any, fixed: Any, name: str) -> None:
    if given is not fixed and given != fixed:
        raise InputError(f"this graph was traced with {name}={fixed!r} fixed; it cannot run with "
                         f"{name}={given!r} (trace the model again with that value)")


torch.fx.wrap("_check_fixed")


def _accept_fixed(gm: torch.fx.GraphModule, constants: dict[str, Any]) -> None:
    """Keyword arguments the graph fixed (``use_cache=False``) become inputs that default to
    their value and are checked, so the graph and every slim model made from it are called
    with the model's own keyword arguments: ``slim(**inputs)``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    taken = {n.target for n in placeholders}
    todo = [(k, v) for k, v in constants.items() if k not in taken]
    if not todo or not placeholders or placeholders[-1].target.startswith("*"):
        return
    graph, cursor, added = gm.graph, placeholders[-1], []
    for key, value in todo:
        with graph.inserting_after(cursor):
            cursor = graph.placeholder(key, default_value=value)
            cursor.meta["shape"] = shape_of(value)
            added.append((cursor, value))
    for node, value in added:
        with graph.inserting_after(cursor):
            cursor = graph.call_function(_check_fixed, (node, value, node.target))
            cursor.meta["shape"] = None
    gm.recompile()


def trace(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict | None = None,
    export_fallback: bool = True,
    check: bool = True,
) -> torch.fx.GraphModule:
    """Trace ``model`` with torch.fx and record every node's output shape.

    ``leaf_modules`` lists module types or qualified names to keep as single nodes.
    When symbolic tracing fails (shape-dependent Python, unsupported constructs) and
    ``export_fallback`` is on, ``torch.export`` (non-strict) is tried for an ATen graph
    (see ``graphprune.export_trace``: inference mode, the model's output structure, a
    dynamic batch dimension); if that fails too, the ``TraceError`` names both causes.
    The graph is traced in eval mode (the inference graph: ``F.dropout(x, p, self.training)``
    is recorded off; dropout and norm modules still follow ``train()``/``eval()``) and
    checked against one eager run of the model on the same inputs (``graphprune.fidelity``):
    a torch.fx graph that computes something else is replaced by the torch.export graph,
    and one that still differs raises ``TraceError``.
    ``check=False`` skips that eager run (the shapes still come from one real run of the
    graph): a torch.fx graph that computes something other than the model (see
    ``graphprune.fidelity``) then goes undetected, and the torch.export fallback is taken
    only where symbolic tracing fails outright.
    ``model``, its attributes and ``example_inputs`` are left exactly as they were.
    The returned GraphModule shares submodules with ``model``; nothing is copied.

    >>> gm = trace(torch.nn.Sequential(torch.nn.Linear(4, 3)), torch.randn(2, 4))
    >>> [tuple(n.meta["shape"]) for n in gm.graph.nodes if n.op == "call_module"]
    [(2, 3)]
    """
    check_model(model)
    bound = bind_inputs(model, example_inputs)
    if on_meta_device(model):  # structure only: the example inputs go to the meta device too
        bound = BoundInputs(tuple(x.to("meta") for x in bound.tensors), bound.names, bound.constants)
    elif any(x.device.type == "meta" for x in bound.tensors):
        raise InputError("the example inputs are on the meta device but the model is not; put the model "
                         "on the meta device too (structure only: model.to('meta')), or pass real tensors")
    with TRACE_LOCK, untouched(model):
        if isinstance(model, torch.fx.GraphModule):  # already a graph (exported ones refuse eval())
            gm = _GraphModule(model, model.graph.__deepcopy__(), type(model).__name__)
            propagate_shapes(gm, fresh_inputs(bound.tensors))
        else:
            training = mode_dependent(model)
            with eval_mode(model):
                gm = _faithful_trace(model, bound, leaf_modules, concrete_args, export_fallback, training, check)
            gm.training = model.training  # traced in eval mode; the submodules it shares keep their flags
    _accept_fixed(gm, bound.constants)
    fixed = {**getattr(model, "meta", {}).get("graphprune_fixed", {}), **bound.constants}
    if fixed:  # keyword arguments baked into the graph: later calls may give them again
        gm.meta["graphprune_fixed"] = fixed
    return gm
