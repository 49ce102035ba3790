"""Size and speed of a model: parameters, multiply-accumulates per sample, per layer; CPU latency.

MACs follow the convention of common counters (fvcore, thop for conv/linear): one MAC
per multiply-add of convolutions, transposed convolutions, linear layers, matrix
products and attention. Normalisation, activations, pooling and additions are not
counted (they fold or are memory-bound). Each op is counted by its rule's ``macs`` facet
(``graphprune.rules``), over the traced shapes (``count``) or over the slim shapes a plan
would give (``estimate``), so the two agree by construction.

MACs are **per sample**: each op's MACs for the example batch, divided by its batch size
(the first dimension of the first tensor input; ``batch_size=`` says otherwise, and
``batch_size=1`` counts the whole example batch). ``torch.utils.flop_counter.FlopCounterMode``
counts two FLOPs per MAC over the whole batch: ``2 * count(m, x, batch_size=1).macs``.

``count(...).layers`` breaks the totals down per layer (parameters, MACs, output shape),
and ``before.layers.compare(after.layers)`` sets a dense and a slim model side by side.

>>> import torch.nn as nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> c = count(model, torch.randn(3, 4))
>>> c, c.layers["0"].macs, c.layers["2"].shape
(Counts(params=58, macs=48), 32, (3, 2))
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from graphprune.errors import InputError
from graphprune.removal import Removal
from graphprune.rules.base import Rule, Shapes, find_rule, operand_param, target_name
from graphprune.tracing import bind_inputs, fresh_inputs, named_state, trace

__all__ = ["Counts", "LayerCount", "LayerCounts", "LayerChange", "LayerComparison", "count", "estimate",
           "CountEstimator", "graph_macs", "batch_size_of", "latency"]


@dataclass(frozen=True)
class LayerCount:
    """One layer: its name (a module's qualified name; for a function, the parameter's module
    or the module it runs in), op, parameters, MACs per sample, output shape on the example
    inputs (batch included; of the first call) and how many calls were counted."""

    name: str
    op: str
    params: int
    macs: int
    shape: tuple[int, ...] | None
    calls: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape) if self.shape is not None else None
        return d


def _human(n: float) -> str:
    for div, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:g}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def _shape(shape: tuple[int, ...] | None) -> str:
    return "x".join(map(str, shape)) if shape is not None else "-"


@dataclass(frozen=True)
class LayerCounts(Sequence):
    """Per-layer ``LayerCount`` rows of a model, in graph order (a sequence; ``layers["fc"]``
    finds a row by name). Rows sum to the totals: ``params`` and ``macs``."""

    rows: tuple[LayerCount, ...] = ()
    batch_size: int = 1

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[LayerCount]:
        return iter(self.rows)

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            for r in self.rows:
                if r.name == key:
                    return r
            raise KeyError(key)
        return self.rows[key]

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "params": self.params, "macs": self.macs,
                "layers": [r.to_dict() for r in self.rows]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def table(self) -> str:
        """A text table: layer, op, output shape, parameters, MACs per sample, share of the MACs."""
        rows = [["layer", "op", "output", "params", "MACs", "% MACs"]]
        for r in self.rows:
            rows.append([r.name or "(model)", r.op, _shape(r.shape), f"{r.params:,}", _human(r.macs),
                         f"{100 * r.macs / self.macs:.1f}" if self.macs else "-"])
        rows.append(["total", "", "", f"{self.params:,}", _human(self.macs), ""])
        return _table(rows) + f"\nMACs per sample; output shapes for the example inputs (batch {self.batch_size})"

    def compare(self, after: LayerCounts) -> LayerComparison:
        """This model's layers (before) next to ``after``'s, matched by name and op; a layer
        only one side has (removed, or new) is paired with None."""
        b = {(r.name, r.op): r for r in self.rows}
        a = {(r.name, r.op): r for r in after.rows}
        keys = list(dict.fromkeys([*b, *a]))
        return LayerComparison(tuple(LayerChange(k[0], k[1], b.get(k), a.get(k)) for k in keys))


@dataclass(frozen=True)
class LayerChange:
    """One layer before and after pruning (``None`` on the side that lacks it)."""

    name: str
    op: str
    before: LayerCount | None
    after: LayerCount | None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "op": self.op}
        for side in ("before", "after"):
            row = getattr(self, side)
            out[side] = None if row is None else {"params": row.params, "macs": row.macs,
                                                   "shape": list(row.shape) if row.shape is not None else None}
        return out


@dataclass(frozen=True)
class LayerComparison(Sequence):
    """``LayerChange`` rows of a before/after comparison (``LayerCounts.compare``)."""

    rows: tuple[LayerChange, ...] = ()

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[LayerChange]:
        return iter(self.rows)

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return next(r for r in self.rows if r.name == key)
        return self.rows[key]

    def to_dict(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.rows]

    def table(self) -> str:
        """A text table: layer, op, output shape, parameters and MACs, before -> after."""
        rows = [["layer", "op", "output", "params", "MACs", "MACs kept"]]
        for r in self.rows:
            b, a = r.before, r.after
            shape = f"{_shape(b.shape if b else None)} -> {_shape(a.shape) if a else 'removed'}"
            params = f"{b.params if b else 0:,} -> {a.params if a else 0:,}"
            macs = f"{_human(b.macs if b else 0)} -> {_human(a.macs if a else 0)}"
            kept = f"{100 * (a.macs if a else 0) / b.macs:.0f}%" if b and b.macs else "-"
            rows.append([r.name or "(model)", r.op, shape, params, macs, kept])
        return _table(rows)


@dataclass(frozen=True)
class Counts:
    """Parameter count and MACs per sample of a model for given example inputs.

    ``layers`` (from ``count``; None from the estimator) is the per-layer breakdown; it
    takes no part in comparisons.
    """

    params: int
    macs: int
    layers: LayerCounts | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, int]:
        return {"params": self.params, "macs": self.macs}


class TracedShapes:
    """``rules.base.Shapes`` over a traced graph: the recorded shapes, the module's tensors."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.state = named_state(gm)

    def of(self, x: Any) -> Any:
        return x.meta.get("shape") if isinstance(x, torch.fx.Node) else None

    def param(self, name: str) -> tuple[int, ...] | None:
        t = self.state.get(name)
        return tuple(t.shape) if t is not None else None


def batch_size_of(shapes: Sequence[Sequence[int]], batch_size: int | None = None) -> int:
    """The number of samples in example inputs of ``shapes``: ``batch_size`` if given, else the
    first dimension of the first input (1 for a scalar or an empty batch)."""
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        return batch_size
    first = next(iter(shapes), ())
    return int(first[0]) if len(first) and first[0] > 0 else 1


def _per_sample(macs: int, batch: int) -> int:
    return (int(macs) + batch // 2) // batch


def _macs_terms(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, nn.Module | None, Rule]]:
    """The nodes whose rule counts MACs, with their module and rule."""
    modules = dict(gm.named_modules())
    terms = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        rule = find_rule(node, module)
        if rule is not None and rule.macs is not None:
            terms.append((node, module, rule))
    return terms


def graph_macs(gm: torch.fx.GraphModule, shapes: Shapes) -> int:
    """MACs of a traced graph for the batch its shapes hold, each node counted by its rule's
    ``macs`` facet over ``shapes``."""
    return int(sum(rule.macs(shapes, node, module, rule) for node, module, rule in _macs_terms(gm)))


def _layer_name(node: torch.fx.Node, rule: Rule | None, state: Mapping[str, Any]) -> str:
    """A call's row: its module, the module of the weight it reads, or the module it runs in."""
    if node.op == "call_module":
        return str(node.target)
    weight = operand_param(rule, node, "weight") if rule is not None else None
    if weight is not None and weight in state:
        return weight.rpartition(".")[0] or weight
    stack = node.meta.get("nn_module_stack") or {}
    where = list(stack.values())[-1] if stack else None
    return str(where[0]) if isinstance(where, tuple) and where else ""


def _out_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    shape = node.meta.get("shape")
    if isinstance(shape, tuple) and shape and not isinstance(shape, torch.Size):
        shape = shape[0]
    return tuple(int(d) for d in shape) if isinstance(shape, torch.Size) else None


def _layers(gm: torch.fx.GraphModule, model: nn.Module, batch: int) -> LayerCounts:
    """Per-layer rows of a traced graph: module calls and calls that count MACs, then the
    parameters only read (``get_attr``), then any the graph never uses."""
    modules = dict(gm.named_modules())
    state = named_state(gm)
    shapes = TracedShapes(gm)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    seen: set[int] = set()

    def own(tensors: Iterable[torch.Tensor]) -> int:
        n = 0
        for t in tensors:
            if isinstance(t, nn.Parameter) and id(t) not in seen:
                seen.add(id(t))
                n += t.numel()
        return n

    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        rule = find_rule(node, module)
        macs = _per_sample(rule.macs(shapes, node, module, rule), batch) if rule is not None and rule.macs else 0
        if module is not None:
            params = own(module.parameters())
        elif rule is not None and rule.macs is not None:  # a layer's own weights; others get rows of their own
            params = own(state[a.target] for a in node.all_input_nodes if a.op == "get_attr" and a.target in state)
        else:
            params = 0
            for a in node.all_input_nodes:  # parameters an op reads that no layer owns (a position table)
                t = state.get(a.target) if a.op == "get_attr" else None
                if isinstance(t, nn.Parameter) and id(t) not in seen:
                    rows[(str(a.target), "parameter")] = {"params": own([t]), "macs": 0, "shape": tuple(t.shape),
                                                          "calls": 0}
        if not macs and not params and (module is None or not any(True for _ in module.parameters())):
            continue
        op = type(module).__name__ if module is not None else str(target_name(node))
        row = rows.setdefault((_layer_name(node, rule, state), op),
                              {"params": 0, "macs": 0, "shape": _out_shape(node), "calls": 0})
        row["params"] += params
        row["macs"] += macs
        row["calls"] += 1
    for node in gm.graph.find_nodes(op="get_attr"):
        t = state.get(node.target)
        if isinstance(t, nn.Parameter) and id(t) not in seen:
            rows[(str(node.target), "parameter")] = {"params": own([t]), "macs": 0, "shape": tuple(t.shape),
                                                      "calls": 0}
    unused = sum(p.numel() for p in model.parameters()) - sum(r["params"] for r in rows.values())
    if unused > 0:
        rows[("(not in the traced graph)", "")] = {"params": unused, "macs": 0, "shape": None, "calls": 0}
    return LayerCounts(tuple(LayerCount(name, op, **r) for (name, op), r in rows.items()), batch)


def count(model: nn.Module, example_inputs: Any, *, batch_size: int | None = None) -> Counts:
    """Parameters and MACs per sample of ``model`` on ``example_inputs``, with a per-layer breakdown.

    MACs are divided by ``batch_size``: by default the first dimension of the first tensor
    input; pass ``batch_size=1`` for the MACs of the whole example batch, or the true
    sample count when the first dimension is not the batch (a sequence-first LSTM).
    ``counts.layers`` holds one ``LayerCount`` per layer (see ``LayerCounts``).

    >>> count(torch.nn.Linear(4, 3), torch.randn(2, 4))
    Counts(params=15, macs=12)
    >>> count(torch.nn.Linear(4, 3), torch.randn(2, 4), batch_size=1).macs
    24
    """
    gm = trace(model, example_inputs)
    batch = batch_size_of([tuple(x.shape) for x in bind_inputs(model, example_inputs).tensors], batch_size)
    layers = _layers(gm, model, batch)
    params = sum(p.numel() for p in model.parameters())
    return Counts(params=int(params), macs=layers.macs, layers=layers)


class CountEstimator:
    """Parameters and MACs per sample of the slim model a plan would give, without building it.

    The same rule facets as ``count``, over the slim shapes of a ``Removal``: for every
    plan, ``counts(plan)`` equals ``count(gp.apply(model, dg, plan), example_inputs)``
    (parameters of modules the traced graph never uses are not part of the slim model).
    MACs are per sample of the graph's example inputs (``batch_size`` as in ``count``).

    >>> import graphprune as gp
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> dg = gp.DependencyGraph.build(model, torch.randn(1, 4))
    >>> CountEstimator(dg).counts({0: [0, 1, 2, 3]})
    (30, 24)
    """

    def __init__(self, dg: Any, *, batch_size: int | None = None) -> None:
        self.dg = dg
        self.params = [n for n, _ in dg.gm.named_parameters()]
        self.terms = _macs_terms(dg.gm)
        self.batch = batch_size_of(getattr(dg, "example_shapes", None) or [], batch_size)

    def estimate(self, removal: Removal) -> Counts:
        """``Counts`` of the slim model ``removal`` describes."""
        params = sum(math.prod(removal.param(n) or ()) for n in self.params)
        macs = sum(_per_sample(rule.macs(removal, node, module, rule), self.batch)
                   for node, module, rule in self.terms)
        return Counts(params=int(params), macs=int(macs))

    def counts(self, plan: Mapping[int, Iterable[int]]) -> tuple[int, int]:
        """``(params, macs)`` of the model ``plan`` would give."""
        c = self.estimate(Removal(self.dg, plan))
        return c.params, c.macs


def estimate(dg: Any, plan: Mapping[int, Iterable[int]]) -> Counts:
    """``Counts`` of ``gp.apply(model, dg, plan)`` from the graph alone (see ``CountEstimator``)."""
    return CountEstimator(dg).estimate(Removal(dg, plan))


def latency(
    model: nn.Module,
    example_inputs: Any,
    *,
    repeats: int = 30,
    warmup: int = 5,
    threads: int | None = None,
) -> float:
    """Median wall time in seconds of one forward pass in inference mode on CPU."""
    bound = bind_inputs(model, example_inputs)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    try:
        times = []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                run = fresh_inputs(bound.tensors)  # a forward may change its inputs in place
                start = time.perf_counter()
                bound.run(model, run)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        model.train(was_training)
        torch.set_num_threads(old_threads)
