"""The ``torch.export`` fallback of ``tracing.trace``: an ATen graph with plain calling conventions.

Used when symbolic tracing fails (shape-dependent Python). The graph it returns:

- is the model's *inference* graph: the model is exported in eval mode (BatchNorm with
  running statistics, no dropout), since an exported graph fixes the mode it was recorded
  in; a warning names the modules whose training behaviour is lost;
- takes the example inputs positionally and returns the model's output structure (dicts,
  lists and tuples nest as in the model; other containers become the nearest of those,
  with a warning);
- accepts any batch size: the first dimension of every input is exported dynamic, and a
  view/reshape size computed from it (batch, batch x heads) becomes ``-1``, so the
  rewrite's literal widths leave it alone. Shapes recorded in ``node.meta`` stay
  concrete (the example run records them). Where the batch size stays fixed (an example
  batch of 1, a model that needs its batch size, a batch size that an op other than
  view/reshape/expand takes, whose rules want literal sizes) the graph is exported for
  the example shapes and a warning says so and how to avoid it. Other dimensions
  (sequence length, image size) stay fixed, since rules and rewrites take literal slice
  bounds and sizes; a warning says so for integer (token) inputs.

Export runs on a ``preserve.structural_copy`` of the model (export swaps parameters for
fake tensors and flips training flags while it runs) and on copies of the inputs.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import io
import operator
import re
import sys
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from graphprune.errors import TraceError, warn_user
from graphprune.preserve import structural_copy, untouched

__all__ = ["export_trace", "mode_dependent"]

aten = torch.ops.aten
_VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SHAPE_OPS = _VIEW_OPS | {aten.expand.default}
_SIZE_OPS = {aten.sym_size.int, operator.mul, operator.floordiv, operator.add, operator.sub,
             operator.mod, operator.neg, operator.truediv}
_ASSERT_OPS = {getattr(aten, name).default for name in
               ("_assert_scalar", "sym_constrain_range_for_size", "sym_constrain_range")
               if hasattr(aten, name)}


def mode_dependent(model: torch.nn.Module) -> list[str]:
    """Modules in training mode whose forward reads ``self.training`` (BatchNorm, dropout, ...)."""
    found = []
    for name, m in model.named_modules():
        code = getattr(type(m).forward, "__code__", None)
        if m.training and code is not None and "training" in code.co_names:
            found.append(name or type(m).__name__)
    return found


def _batch_dynamic(model: torch.nn.Module, bound: Any) -> tuple | dict:
    """``dynamic_shapes`` with the first dimension of every input ``Dim.AUTO`` (export keeps
    it static where it must), shaped as ``forward``'s signature takes the inputs."""
    def spec(x: Any) -> dict[int, Any] | None:
        return {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() else None

    inputs = bound.tensors
    if bound.names is not None:  # keyword inputs: one entry per keyword
        return {name: spec(value) for name, value in bound.kwargs().items()}
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind(*inputs)
    except (TypeError, ValueError):
        return tuple(spec(x) for x in inputs)
    return {name: tuple(spec(v) for v in value)
            if signature.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL else spec(value)
            for name, value in bound.arguments.items()}


def _export(model: torch.nn.Module, bound: Any, dynamic: bool) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) on copies of the inputs (keywords for dict example inputs),
    with a dynamic batch dimension if ``dynamic``. Attributes the forward stores while it is
    exported are undone after each attempt: a cache filled with fake tensors by one attempt
    (ultralytics' ``Detect.anchors``) would be read as a constant by the next. A failed attempt
    makes torch print its partial graph to stderr; that is dropped (the caller reports the
    failure in its own words), and what a successful attempt printed is passed on."""
    fresh = tuple(x.detach().clone() for x in bound.tensors)
    shapes = _batch_dynamic(model, bound) if dynamic else None
    printed = io.StringIO()
    with untouched(model), contextlib.redirect_stderr(printed):
        if bound.names is not None:
            program = torch.export.export(model, (), kwargs=bound.kwargs(fresh), dynamic_shapes=shapes,
                                          strict=False)
        else:
            program = torch.export.export(model, fresh, dynamic_shapes=shapes, strict=False)
    sys.stderr.write(printed.getvalue())
    return program


_BATCH_OF_ONE = ("the example batch size is 1 (torch.export fixes dimensions of size 1); give example "
                 "inputs with a batch of 2 or more for a slim model that accepts any batch size")


class _StaticBatch(Exception):
    """Raised to skip the dynamic-batch export (it would only specialise the batch again)."""


def _batch_of_one(inputs: tuple) -> bool:
    """Whether every input with dimensions has a first dimension of size 1: torch.export
    specialises it (0/1 specialisation), so exporting with a dynamic batch would only
    return the static graph at twice the cost."""
    sized = [x for x in inputs if isinstance(x, torch.Tensor) and x.dim()]
    return bool(sized) and all(x.shape[0] == 1 for x in sized)


def _fixed_batch(program: torch.export.ExportedProgram, inputs: tuple, model_name: str) -> str | None:
    """Why torch.export kept the batch dimension static, or None if it is dynamic."""
    values = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    tensor_inputs = [u for u in program.graph_signature.user_inputs if isinstance(u, str) and u in values]
    for name, x in zip(tensor_inputs, inputs):
        val = values.get(name)
        if x.dim() and isinstance(val, torch.Tensor) and isinstance(val.shape[0], torch.SymInt):
            return None
    batch = next((x.shape[0] for x in inputs if x.dim()), None)
    if batch is None:
        return None
    if batch == 1:
        return _BATCH_OF_ONE
    return (f"{model_name} needs its batch size to be {batch} (torch.export specialised it); make "
            "forward independent of the batch size for a slim model that accepts any")


def _plain_structure(spec: pytree.TreeSpec, leaves: list, lost: list[str]) -> Any:
    """The output structure ``spec`` describes, built from graph nodes: dicts, lists and
    tuples as they are; other containers as a dict (keyed ones) or a tuple."""
    if spec.is_leaf():
        return leaves.pop(0)
    kind = spec.type
    if kind is type(None):
        return None
    specs = spec.children() if hasattr(spec, "children") else spec.children_specs
    children = [_plain_structure(c, leaves, lost) for c in specs]
    if kind in (list, tuple):
        return kind(children)
    if kind is collections.namedtuple:  # torch's pytree marks every namedtuple so
        lost.append(getattr(spec.context, "__name__", "namedtuple"))
        return tuple(children)
    keys = spec.context
    if kind in (dict, collections.OrderedDict):
        return dict(zip(keys, children))
    if kind is collections.defaultdict:  # context: [default_factory, keys]
        return dict(zip(keys[1], children))
    lost.append(getattr(kind, "__name__", str(kind)))
    if isinstance(keys, (list, tuple)) and len(keys) == len(children) and all(isinstance(k, str) for k in keys):
        return dict(zip(keys, children))
    return tuple(children)


def _restore_output_structure(gm: torch.fx.GraphModule, spec: pytree.TreeSpec | None) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    if spec is None or spec.num_leaves != len(leaves):
        return
    lost: list[str] = []
    out.args = (_plain_structure(spec, leaves, lost),)
    if lost:
        warn_user(f"the model returns {', '.join(dict.fromkeys(lost))}; the graph from torch.export "
                  "returns it as a plain dict or tuple with the same contents")


def _free_computed_sizes(graph: torch.fx.Graph) -> str | None:
    """In a view/reshape whose sizes include values computed at run time (a dynamic batch
    size, or batch x heads), make one of them ``-1``: the same view, and a literal the
    rewrite leaves alone. Computed products are preferred over plain sizes, since they
    fold a channel axis into the batch. Returns the first other op that takes a run-time
    size (the rules expect literals there), or None."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ASSERT_OPS:
            graph.erase_node(node)
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _VIEW_OPS or len(node.args) < 2:
            continue
        sizes = list(node.args[1])
        computed = [i for i, s in enumerate(sizes) if isinstance(s, torch.fx.Node)]
        if not computed or any(isinstance(s, int) and s == -1 for s in sizes):
            continue
        products = [i for i in computed if sizes[i].target is not aten.sym_size.int]
        sizes[(products or computed)[0]] = -1
        node.args = (node.args[0], sizes, *node.args[2:])
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target in _SIZE_OPS and not node.users:
            graph.erase_node(node)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _SIZE_OPS:
            for user in node.users:
                if user.target not in _SIZE_OPS and user.target not in _SHAPE_OPS:
                    return f"node {user.name!r} ({user.target}) takes the batch size as an argument"
    return None


def _plain_graph(program: torch.export.ExportedProgram, constants: Any = ()
                 ) -> tuple[torch.fx.GraphModule, str | None]:
    """The exported module with positional inputs (the non-tensor keyword inputs
    ``constants`` fixed, so they are not inputs any more), the model's output structure
    and free view sizes; and what keeps it from running at other batch sizes, if anything."""
    gm = program.module()
    spec = getattr(gm, "_out_spec", None) or program.call_spec.out_spec
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "placeholder" and node.target in constants and not node.users:
            graph.erase_node(node)
    graph._codegen = torch.fx.graph.CodeGen()
    _restore_output_structure(gm, spec)
    blocker = _free_computed_sizes(graph)
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.meta["graphprune_export"] = True
    return gm, blocker


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
    unknown = re.search(r"Found <class '([\w.]+)'> in output, which is not a known type", text)
    if unknown:  # the pytree advice torch gives does not help a user who only wants to prune
        kind = unknown.group(1).rsplit(".", 1)[-1]
        return (f"the model returns a {kind}, which is not a tensor or a container of tensors; make forward "
                f"return tensors (for a cache, pass use_cache=False in the example inputs)")
    return first


def export_trace(model: torch.nn.Module, bound: Any, fx_error: TraceError,
                 training: list[str] | None = None) -> torch.fx.GraphModule:
    """An fx GraphModule of ``model`` from ``torch.export`` (non-strict), as described above,
    for ``bound`` (``tracing.BoundInputs``). The caller holds the tracing lock; neither
    ``model`` nor the inputs change. ``training`` names the modules whose training-mode
    behaviour the graph leaves out (default: ``mode_dependent(model)``; a caller that put
    the model in eval mode computes it first)."""
    from graphprune.tracing import eval_mode  # tracing imports this module

    name = type(model).__name__
    inputs = bound.tensors
    training = mode_dependent(model) if training is None else training
    work = structural_copy(model)
    with eval_mode(work):
        gm, why = None, None
        try:
            if _batch_of_one(inputs):  # torch.export specialises a dimension of size 1: one static export
                raise _StaticBatch
            program = _export(work, bound, dynamic=True)
            why = _fixed_batch(program, inputs, name)
            if why is None:
                gm, blocker = _plain_graph(program, bound.constants)
                if blocker:
                    gm, why = None, blocker + " (graphprune's rules take literal sizes there)"
        except _StaticBatch:
            why = _BATCH_OF_ONE
        except Exception as exc:  # retried with static shapes below, which names its own failure
            why = f"torch.export failed with a dynamic batch dimension ({_first_line(exc)})"
        if gm is None:
            try:
                gm, _ = _plain_graph(_export(work, bound, dynamic=False), bound.constants)
            except Exception as exc:
                raise TraceError(f"{fx_error} torch.export (non-strict) failed as well: "
                                 f"{_first_line(exc)}. To prune the submodules that do trace "
                                 "(backbone, heads), keeping their outputs' widths: "
                                 "gp.prune_parts(model, example_inputs)") from fx_error
    if training:
        shown = ", ".join(repr(n) for n in training[:4]) + (" ..." if len(training) > 4 else "")
        warn_user(f"{name} is in training mode and {shown} behave differently in training; "
                  "torch.export records one graph, so it was exported in eval mode (running "
                  "statistics, no dropout), and train() on the graph or the slim model does not "
                  "switch them back. Call model.eval() first to silence this; to fine-tune with "
                  "batch statistics, make the model traceable by torch.fx (leaf_modules=..., "
                  "concrete_args=...)")
    if why:
        warn_user(f"the graph from torch.export, and the slim model made from it, only run at the "
                  f"example input shapes {[tuple(x.shape) for x in inputs]}, because {why}")
    tokens = [i for i, x in enumerate(inputs) if x.dim() >= 2 and not x.is_floating_point()]
    if tokens:
        warn_user(f"example_inputs[{tokens[0]}]: the graph from torch.export keeps dimension 1 (the "
                  f"sequence length, {inputs[tokens[0]].shape[1]}) fixed; only the batch size may change. "
                  "Prune with example inputs of the length the slim model will run at")
    return gm
