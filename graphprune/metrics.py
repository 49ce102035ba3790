"""Size and speed of a model: parameters, multiply-accumulates, CPU latency.

MACs follow the convention of common counters (fvcore, thop for conv/linear): one MAC
per multiply-add of convolutions, transposed convolutions, linear layers, matrix
products and attention, counted for the batch of the example inputs. Normalisation,
activations, pooling and additions are not counted (they fold or are memory-bound).
Each op is counted by its rule's ``macs`` facet (``graphprune.rules``), over the traced
shapes (``count``) or over the slim shapes a plan would give (``estimate``), so the
two agree by construction.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from graphprune.removal import Removal
from graphprune.rules.base import Rule, Shapes, find_rule
from graphprune.tracing import bind_inputs, fresh_inputs, named_state, trace

__all__ = ["Counts", "count", "estimate", "CountEstimator", "graph_macs", "latency"]


@dataclass(frozen=True)
class Counts:
    """Parameter count and MACs of a model for given example inputs."""

    params: int
    macs: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class TracedShapes:
    """``rules.base.Shapes`` over a traced graph: the recorded shapes, the module's tensors."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.state = named_state(gm)

    def of(self, x: Any) -> Any:
        return x.meta.get("shape") if isinstance(x, torch.fx.Node) else None

    def param(self, name: str) -> tuple[int, ...] | None:
        t = self.state.get(name)
        return tuple(t.shape) if t is not None else None


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
    """MACs of a traced graph, each node counted by its rule's ``macs`` facet over ``shapes``."""
    return int(sum(rule.macs(shapes, node, module, rule) for node, module, rule in _macs_terms(gm)))


def count(model: nn.Module, example_inputs: Any) -> Counts:
    """Parameters and MACs of ``model`` on ``example_inputs``.

    >>> count(torch.nn.Linear(4, 3), torch.randn(2, 4))
    Counts(params=15, macs=24)
    """
    gm = trace(model, example_inputs)
    params = sum(p.numel() for p in model.parameters())
    return Counts(params=int(params), macs=graph_macs(gm, TracedShapes(gm)))


class CountEstimator:
    """Parameters and MACs of the slim model a plan would give, without building it.

    The same rule facets as ``count``, over the slim shapes of a ``Removal``: for every
    plan, ``counts(plan)`` equals ``count(gp.apply(model, dg, plan), example_inputs)``
    (parameters of modules the traced graph never uses are not part of the slim model).

    >>> import graphprune as gp
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> dg = gp.DependencyGraph.build(model, torch.randn(1, 4))
    >>> CountEstimator(dg).counts({0: [0, 1, 2, 3]})
    (30, 24)
    """

    def __init__(self, dg: Any) -> None:
        self.dg = dg
        self.params = [n for n, _ in dg.gm.named_parameters()]
        self.terms = _macs_terms(dg.gm)

    def estimate(self, removal: Removal) -> Counts:
        """``Counts`` of the slim model ``removal`` describes."""
        params = sum(math.prod(removal.param(n) or ()) for n in self.params)
        macs = sum(rule.macs(removal, node, module, rule) for node, module, rule in self.terms)
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
