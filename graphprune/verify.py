"""Exactness check: the slim model against the original with removed channels masked.

The masked original is the traced graph over a copy of the model's tensors in which
every removed channel is zeroed, in the parameter slices it owns and in every tensor
the graph computes. Each model gets its own copy of the inputs (a forward may change
its inputs in place). Member names are resolved by path in each copy (not by which name
of a tied tensor comes first there), and a tied tensor is masked once for all the names
that share it, as the slim model slices it once and keeps the tie; ``verify`` warns if a
slim model it is given holds a cut tensor untied.

``verify`` returns a ``Verification``: a float (the largest difference found where the
slim model must match) that also says whether the plan is exact and, if not, why and how
much the outputs moved (``str(result)`` is a one-line summary for reports).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.fx

from graphprune.copying import copy_as_graph_module
from graphprune.errors import GraphPruneError, InputError, warn_user
from graphprune.graph import DependencyGraph
from graphprune.plan import Plan
from graphprune.rewrite import apply
from graphprune.rules.base import Multi
from graphprune.tracing import eval_mode, fresh_inputs, normalize_inputs, require_values

__all__ = ["verify", "Verification", "masked_model", "masked_forward"]


def masked_model(model: torch.nn.Module, dg: DependencyGraph, plan: Plan | dict) -> torch.nn.Module:
    """A copy of ``model`` (its own classes) that computes what the slim model computes.

    Every parameter and buffer slice a removed channel owns is zeroed (producers' rows,
    norm parameters and statistics, consumers' input columns), found by the path the
    graph names it by (a tied tensor is zeroed once, for all its names, as the slim
    model slices it once). That masks a channel exactly unless its value reaches an op
    that mixes channels through something that does not keep zeros (``sigmoid(h).sum(1)``);
    the copy is checked against the graph-level mask on inputs shaped like the example
    ones, and where it differs a module that masks every tensor the graph computes is
    returned instead, with a warning naming the node.
    """
    plan = plan if isinstance(plan, Plan) else Plan(plan)
    removed = dg.removed_classes(plan)
    masked = copy.deepcopy(model)
    _zero_removed(masked, dg, removed)
    device = next((t.device for t in [*masked.parameters(), *masked.buffers()]), torch.device("cpu"))
    inputs = _probe_inputs(dg, device)
    if inputs is None:
        return masked
    with torch.no_grad(), eval_mode(masked):
        got = _flatten(masked(*fresh_inputs(inputs)))
    reference = _MaskedGraph(model, dg, removed)
    with torch.no_grad(), eval_mode(reference):
        want = _flatten(reference(*fresh_inputs(inputs)))
    if _same(want, got):
        return masked
    where = reference.divergence(inputs)
    warn_user(f"zeroing weights cannot mask the removed channels here: {where}; masked_model returns "
              "a module that runs the traced graph and zeroes them in every tensor instead "
              "(a GraphModule-like copy, not the model's own class)")
    return reference


def _owner(root: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str] | None:
    """The module holding parameter/buffer ``name`` of ``root``, and its attribute there."""
    path, _, attr = name.rpartition(".")
    try:
        owner = root.get_submodule(path) if path else root
    except AttributeError:
        return None
    if attr in owner._parameters or attr in owner._buffers:
        return owner, attr
    return None


def _zero_removed(root: torch.nn.Module, dg: DependencyGraph, removed: np.ndarray) -> None:
    """Zero, in ``root``, every member slice of a removed channel (found by path).

    Out of place: two tensors that merely share storage (views of one constant, as a
    rotary table split per block) are masked apart, as the slim model slices them apart;
    a tensor held under several names (tied weights) gets one new tensor under all of them.
    """
    names: dict[int, tuple[torch.Tensor, list[tuple[torch.nn.Module, str]]]] = {}  # the tensor keeps its id
    for _, m in root.named_modules(remove_duplicate=False):
        for table in (m._parameters, m._buffers):
            for key, t in table.items():
                if t is not None:
                    names.setdefault(id(t), (t, []))[1].append((m, key))
    with torch.no_grad():
        for (param, dim), labels in dg.member_labels.items():
            drop = np.flatnonzero(~dg.keep_mask(labels, removed))
            found = _owner(root, param) if drop.size else None
            if found is None:
                continue
            old = getattr(*found)
            new = old.index_fill(dim, torch.as_tensor(drop, device=old.device), 0.0)
            if isinstance(old, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
            held, owners = names.get(id(old), (None, [found]))
            owners = owners if held is old else [found]
            for owner, key in owners:
                table = owner._parameters if key in owner._parameters else owner._buffers
                table[key] = new
            names[id(new)] = (new, owners)  # a later axis of the same tensor reaches every name


def _flatten(out: Any) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten(o)]
    return []


def _same(want: list, got: list) -> bool:
    return len(want) == len(got) and all(
        a.shape == b.shape and bool(((a.double() - b.double()).abs() <= 1e-4 * (1 + a.double().abs().max()))
                                    .logical_or(a.isnan() & b.isnan()).all())
        for a, b in zip(want, got))


def _probe_inputs(dg: DependencyGraph, device: torch.device) -> tuple[torch.Tensor, ...] | None:
    """Inputs shaped like the graph's example inputs: normal floats, zero integers."""
    shapes, dtypes = getattr(dg, "example_shapes", None), getattr(dg, "example_dtypes", None)
    if not shapes or not dtypes:
        return None
    gen = torch.Generator().manual_seed(0)
    return tuple((torch.randn(s, generator=gen, dtype=d) if d.is_floating_point or d.is_complex
                  else torch.zeros(s, dtype=d)).to(device) for s, d in zip(shapes, dtypes))


def _describe(node: torch.fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"node {node.name!r} ({node.op} {target})"


class _MaskedRun(torch.fx.Interpreter):
    """Run the traced graph, zeroing removed channels in every tensor it computes."""

    def __init__(self, gm: torch.fx.GraphModule, dg: DependencyGraph, removed: np.ndarray,
                 masking: bool = True, keep_values: bool = False) -> None:
        super().__init__(gm, garbage_collect_values=not keep_values)
        self.dg, self.removed, self.masking = dg, removed, masking

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        return self.mask(value, self.dg.node_labels.get(n.name)) if self.masking else value

    def mask(self, value: Any, labels: Any, in_place: bool = True) -> Any:
        if isinstance(value, torch.Tensor) and isinstance(labels, tuple) and not isinstance(labels, Multi):
            for d, lab in enumerate(labels):
                if lab is None or d >= value.dim():
                    continue
                keep = self.dg.keep_mask(lab, self.removed)
                if not keep.all():
                    shape = [1] * value.dim()
                    shape[d] = -1
                    # set, not multiplied: a NaN or inf a removed channel computed (p / p.sum()
                    # over removed rows) must not leak into the kept ones
                    drop = torch.as_tensor(~keep, device=value.device).view(shape)
                    try:  # in place, so tensors aliasing this one (views, in-place ops) see it too
                        if not in_place or any(st == 0 < n - 1 for st, n in zip(value.stride(), value.shape)):
                            # an expanded tensor's elements overlap: masked_fill_ is deprecated there
                            raise RuntimeError
                        value.masked_fill_(drop, 0)
                    except RuntimeError:  # expanded or otherwise unwritable tensors
                        value = value.masked_fill(drop, 0)
            return value
        if isinstance(value, (tuple, list)) and isinstance(labels, Multi):
            return type(value)(self.mask(v, lab, in_place) for v, lab in zip(value, labels))
        return value


class _MaskedGraph(torch.nn.Module):
    """The traced graph over a copy of ``model``'s tensors, removed channels zeroed in the
    slices they own and in every tensor the graph computes. Its parameters, buffers and
    submodules are the graph copy's, under the model's own names."""

    def __init__(self, model: torch.nn.Module, dg: DependencyGraph, removed: np.ndarray) -> None:
        super().__init__()
        gm = copy_as_graph_module(model, dg, "Masked")
        _zero_removed(gm, dg, removed)
        self._parameters, self._buffers, self._modules = gm._parameters, gm._buffers, gm._modules
        object.__setattr__(self, "_gm", gm)
        self._dg, self._removed = dg, removed

    def forward(self, *inputs: Any) -> Any:
        return _MaskedRun(self._gm, self._dg, self._removed).run(*inputs)

    def divergence(self, inputs: tuple[torch.Tensor, ...]) -> str:
        """Where masking the weights alone stops matching: the first node whose kept
        positions differ between the weight-masked and the fully masked run."""
        runs = []
        for masking in (False, True):
            run = _MaskedRun(self._gm, self._dg, self._removed, masking=masking, keep_values=True)
            with torch.no_grad(), eval_mode(self._gm):
                run.run(*fresh_inputs(inputs))
            runs.append(run)
        plain, masked = runs
        for node in self._gm.graph.nodes:
            a, b = plain.env.get(node), masked.env.get(node)
            if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
                continue
            a = plain.mask(a, self._dg.node_labels.get(node.name), in_place=False)
            if not _same([b], [a]):
                return f"removed channels reach {_describe(node)} with values that are not zero"
        return "the outputs differ"


def masked_forward(model: torch.nn.Module, dg: DependencyGraph, plan: Plan | dict, inputs: tuple) -> Any:
    """Outputs of ``model`` with every removed channel zeroed: in every parameter slice
    it owns and in every tensor the graph computes (inside leaf modules such as
    attention, the zeroed weights do the masking). ``inputs`` are not changed."""
    plan = plan if isinstance(plan, Plan) else Plan(plan)
    reference = _MaskedGraph(model, dg, dg.removed_classes(plan)).eval()
    with torch.no_grad():
        return reference(*fresh_inputs(normalize_inputs(inputs, model)))


def _tied_slots(module: torch.nn.Module) -> dict[int, list[str]]:
    """Tensors held under more than one name (distinct module attributes): id -> names."""
    slots: dict[int, list[str]] = {}
    for prefix, m in module.named_modules():
        for table in (m._parameters, m._buffers):
            for key, t in table.items():
                if t is not None:
                    slots.setdefault(id(t), []).append(f"{prefix}.{key}" if prefix else key)
    return {k: v for k, v in slots.items() if len(v) > 1}


def _warn_untied(model: torch.nn.Module, dg: DependencyGraph, plan: Plan, slim: torch.nn.Module) -> None:
    """Say when the plan cuts a tensor the model holds under several names and ``slim``
    holds those names as different tensors: the slim model no longer ties them."""
    cut = {m.param for g in dg.groups if g.id in plan for m in g.members}
    for names in _tied_slots(model).values():
        if not cut.intersection(names):
            continue
        held = {name: _owner(slim, name) for name in names}
        tensors = {id(getattr(*found)) for found in held.values() if found is not None}
        if len(tensors) > 1:
            warn_user(f"the plan cuts {', '.join(map(repr, names))}, which the model ties (one tensor), "
                      "and the slim model holds them as different tensors: it no longer ties them")
            return


class Verification(float):
    """What ``verify`` found: a float (the largest difference it checked) that also says
    whether the plan is exact, why not, and how much the outputs changed.

    Comparisons and arithmetic use the float, so ``gp.verify(...) < 1e-4`` reads "no
    difference found where the slim model must match the masked original":

    - a plan over exact groups only: the largest ``|masked original - slim|`` over the
      outputs (``inf`` if output shapes differ);
    - a plan that touches inexact groups (normalisation over pruned channels), which no
      masked original can match: the same difference for the plan's exact part alone (0.0
      when it has none, or when that part cannot be applied on its own), or ``inf`` if the
      slim outputs changed shape or are not finite.

    Attributes: ``exact`` (the plan touches exact groups only), ``inexact_groups`` (ids),
    ``reasons`` (``{group id: why it is inexact}``), ``reason`` (a short summary, ``""``
    when exact), ``output_change`` (largest ``|dense - slim|`` over the outputs relative
    to the largest ``|dense|``: what pruning changed, the inexact part included) and
    ``masked_diff`` (largest ``|masked original - slim|`` of the whole plan: what the
    inexact part adds; equal to the float for exact plans). ``str()`` reads
    ``exact (max diff 3e-07)`` or ``inexact (normalisation over pruned channels): outputs
    changed by 0.12 relative to the dense model``.
    """

    exact: bool
    inexact_groups: tuple[int, ...]
    reasons: dict[int, str]
    reason: str
    output_change: float
    masked_diff: float
    matches: bool

    def __new__(cls, value: float, *, reasons: dict[int, str] | None = None, output_change: float = math.nan,
                masked_diff: float | None = None, scale: float = 0.0) -> Verification:
        self = super().__new__(cls, value)
        self.reasons = dict(reasons or {})
        self.inexact_groups = tuple(sorted(self.reasons))
        self.exact = not self.reasons
        text = " ".join(self.reasons.values())
        self.reason = "" if self.exact else (
            "normalisation over pruned channels" if "normalis" in text or not text else
            "statistics over pruned channels")
        self.output_change = float(output_change)
        self.masked_diff = float(value) if masked_diff is None else float(masked_diff)
        self.matches = float(value) <= 1e-4 * (1 + scale)
        return self

    def __reduce__(self) -> tuple:
        return (_rebuild, (float(self), self.__dict__))

    def __repr__(self) -> str:
        return f"Verification({float(self)!r}, exact={self.exact}, output_change={self.output_change:.3g})"

    def __str__(self) -> str:
        value = float(self)
        if math.isinf(value):
            return "failed: the slim outputs differ in shape from the original's" + (
                "" if self.exact else " or are not finite")
        if self.exact:
            if self.matches:
                return f"exact (max diff {value:.1g})"
            return f"MISMATCH: max diff {value:.3g} against the masked original, for an exact plan"
        text = f"inexact ({self.reason}): outputs changed by {self.output_change:.3g} relative to the dense model"
        return text if self.matches else text + f"; its exact part differs by {value:.3g} (MISMATCH)"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``max_diff`` (the float), ``exact``, ``reason``, ``inexact_groups``,
        ``output_change``, ``masked_diff``, ``summary`` (``str()``)."""
        return {"max_diff": float(self), "exact": self.exact, "reason": self.reason,
                "inexact_groups": {str(k): v for k, v in self.reasons.items()},
                "output_change": self.output_change, "masked_diff": self.masked_diff, "summary": str(self)}


def _rebuild(value: float, state: dict[str, Any]) -> Verification:
    out = float.__new__(Verification, value)
    out.__dict__.update(state)
    return out


def _max_diff(want: list, got: list) -> float:
    if len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got)):
        return math.inf
    return max(((a.double() - b.double()).abs().max().item() for a, b in zip(want, got) if a.numel()),
               default=0.0)


def _scale(outputs: list) -> float:
    return max((t.double().abs().max().item() for t in outputs if t.numel()), default=0.0)


def _dense(dg: DependencyGraph, inputs: tuple) -> list:
    """Outputs of the traced graph itself (it shares the model's modules), in eval mode."""
    mode = eval_mode(dg.gm)
    try:
        mode.__enter__()
    except NotImplementedError:  # torch.export's graph refuses eval(): it is the inference graph already
        mode = None
    try:
        with torch.no_grad():  # interpreted, as the masked run is (an exported graph's call checks keywords)
            return _flatten(torch.fx.Interpreter(dg.gm).run(*fresh_inputs(inputs)))
    finally:
        if mode is not None:
            mode.__exit__(None, None, None)


def verify(
    model: torch.nn.Module,
    example_inputs: Any,
    plan: Plan | dict,
    *,
    dg: DependencyGraph | None = None,
    slim: torch.nn.Module | None = None,
) -> Verification:
    """Check the slim model against the masked original, in eval mode; a ``Verification``.

    The masked original is the traced model with every removed channel zeroed where it is
    computed; the slim model must match it exactly on plans over exact groups, and the
    result (a float) is the largest difference over the outputs (``inf`` if shapes differ).
    Plans that touch inexact groups (normalisation over pruned channels) cannot match it:
    for them the float is the difference of the plan's exact part alone (``inf`` if the
    slim outputs changed shape or are not finite), ``result.exact`` is False, and
    ``result.reason`` / ``str(result)`` / ``result.output_change`` say why and by how much
    the outputs moved from the dense model's. Each model runs on its own copy of the
    inputs. A ``dg`` that is given must have been built on inputs of these shapes (its
    masks are per position).

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
    >>> result = verify(model, torch.randn(1, 3, 8, 8), {0: [1, 5]})
    >>> result < 1e-5, result.exact, str(result).startswith("exact (max diff")
    (True, True, True)
    """
    require_values(model, "verify")
    inputs = normalize_inputs(example_inputs, model)
    plan = plan if isinstance(plan, Plan) else Plan(plan)
    shapes = [tuple(x.shape) for x in inputs]
    if dg is not None and getattr(dg, "example_shapes", shapes) != shapes:
        raise InputError(f"the dependency graph was built on inputs of shapes {dg.example_shapes}, but verify got "
                         f"{shapes}; its channel masks are per position, so pass inputs of those shapes or "
                         "leave dg out to build a graph for these")
    dg = dg or DependencyGraph.build(model, example_inputs)
    slim = slim if slim is not None else apply(model, dg, plan)
    _warn_untied(model, dg, plan, slim)
    want = _flatten(masked_forward(model, dg, plan, inputs))
    with torch.no_grad(), eval_mode(slim):
        got = _flatten(slim(*fresh_inputs(inputs)))
    dense = _dense(dg, inputs)
    masked_diff, change = _max_diff(want, got), _max_diff(dense, got)
    change = change / _scale(dense) if _scale(dense) > 0 and math.isfinite(change) else change
    reasons = {g.id: g.inexact_reason for g in dg.groups if g.id in plan and not g.exact}
    if not reasons or math.isinf(masked_diff):
        return Verification(masked_diff, reasons=reasons, output_change=change, scale=_scale(want))
    if not all(torch.isfinite(b).all() for b in got):
        return Verification(math.inf, reasons=reasons, output_change=change, masked_diff=masked_diff)
    part = Plan({gid: ch for gid, ch in plan.items() if gid not in reasons})
    value, scale = 0.0, 0.0
    if part:
        try:
            want = _flatten(masked_forward(model, dg, part, inputs))
            slim_part = apply(model, dg, part, check=False)
        except GraphPruneError:  # the exact part needs the rest of the plan: shapes and finiteness only
            pass
        else:
            with torch.no_grad(), eval_mode(slim_part):
                value, scale = _max_diff(want, _flatten(slim_part(*fresh_inputs(inputs)))), _scale(want)
    return Verification(value, reasons=reasons, output_change=change, masked_diff=masked_diff, scale=scale)
