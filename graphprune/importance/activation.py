"""Calibration-activation importance, Wanda-style (Sun et al. 2023, "A Simple and Effective
Pruning Approach for Large Language Models", arXiv:2306.11695), summed over a group.

Wanda scores one weight of a layer by ``|W[o, i]| * ||X_i||_2``: its magnitude times the L2
norm of the input feature ``i`` it reads, over every calibration token (and, for a
convolution, every spatial position). Removing a channel of a group removes whole slices of
weights: the input columns of the layers that read it and the output rows of the layers that
produce it. Its score is the sum of the Wanda scores of those weights::

    score[c] = sum over weighted-layer members m of the group, over the weights w of m's slice
               of channel c:  |w| * ||X_in(w)||_2

For a consumer's column ``c`` (role ``in``) that is ``||X_c|| * sum_o |W[o, c]|``; for a
producer's row ``c`` (role ``out``) it is ``sum_i |W[c, i]| * ||X_i||``. A convolution
weight's kernel window is summed; a grouped convolution pairs each weight with the input
channel it reads. ``roles`` picks the member kinds (default both, as ``magnitude``).

The activations come from running the traced graph ``dg.gm`` on the calibration batches in
eval mode under ``torch.no_grad()``; the rules say which nodes are weighted layers (``LAYER``)
and where their weight and input are. A group with no weighted-layer slice of the chosen
roles (channels only normalised and added, say) is scored by the L2 norm of its channels in
the first tensor of the graph that carries them. Nothing is registered on the model, which is
never modified.

``data`` yields batches in any form ``graphprune.train.finetune`` takes: ``(inputs,
targets)`` pairs (targets ignored; inputs a tensor, a tuple of tensors or a dict of keyword
arguments), a dict of keyword arguments (Hugging Face style; keys the graph does not take,
such as ``labels``, are ignored), or a bare tensor. A graph captured by ``torch.export``
may run only at the example input shapes: give calibration batches of those shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.fx

from graphprune.errors import InputError
from graphprune.importance.base import eval_mode, group_axes, model_device, normalize_scores, reduce_sum
from graphprune.rules.base import LAYER, find_rule, operand, operand_param

__all__ = ["activation"]


def _inputs(item: Any, i: int, names: tuple[str, ...] | None) -> tuple[torch.Tensor, ...]:
    """The graph's positional tensors of calibration batch ``i``."""
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        item = item[0]  # (inputs, targets[, *extra])
    if isinstance(item, Mapping):
        if names is None:
            raise InputError(f"activation: data item {i} is a dict, but the graph was traced with positional "
                             "inputs; give (inputs, targets) pairs or trace with dict example inputs")
        missing = [k for k in names if k not in item]
        if missing:
            raise InputError(f"activation: data item {i} lacks {missing}, which the graph takes "
                             f"(its inputs are {list(names)})")
        item = tuple(item[k] for k in names)
    elif isinstance(item, torch.Tensor):
        item = (item,)
    if not isinstance(item, (tuple, list)) or not item or not all(isinstance(x, torch.Tensor) for x in item):
        raise InputError(f"activation: data item {i} must be a tensor, a tuple of tensors, a dict of keyword "
                         "arguments, or an (inputs, targets) pair of those")
    return tuple(item)


class _Capture(torch.fx.Interpreter):
    """Runs the traced graph, summing squared activations per channel where they are needed."""

    def __init__(self, gm: torch.fx.GraphModule, layers: dict[torch.fx.Node, tuple[str, torch.fx.Node, int]],
                 watch: dict[torch.fx.Node, list[tuple[int, int, np.ndarray]]]) -> None:
        super().__init__(gm)
        self.layers, self.watch = layers, watch
        self.sumsq: dict[str, torch.Tensor] = {}  # weight name -> per input channel
        self.group_sumsq: dict[int, np.ndarray] = {}  # group id -> per channel (groups with no layer)

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        if n in self.layers:
            param, x_node, wdim = self.layers[n]
            x = self.env.get(x_node)
            if isinstance(x, torch.Tensor) and x.dim() >= 1:
                axis = x.dim() - 1 if wdim == 2 else (1 if x.dim() == wdim else 0)  # linear: last; conv: 1
                s = x.detach().double().square().movedim(axis, 0).reshape(x.shape[axis], -1).sum(1)
                old = self.sumsq.get(param)
                self.sumsq[param] = s if old is None or old.shape != s.shape else old + s
        for gid, d, chan in self.watch.get(n, ()):
            if isinstance(value, torch.Tensor) and d < value.dim() and value.shape[d] == len(chan):
                s = value.detach().double().square().movedim(d, 0).reshape(value.shape[d], -1).sum(1)
                acc = self.group_sumsq.setdefault(gid, np.zeros(int(chan.max()) + 1))
                ok = chan >= 0
                np.add.at(acc, chan[ok], s.cpu().numpy()[ok])
        return value


def _layers(dg: Any) -> tuple[dict[torch.fx.Node, tuple[str, torch.fx.Node, int]], dict[str, tuple[Any, int, bool]]]:
    """The weighted-layer nodes: node -> (weight name, input node, weight ndim); and weight name ->
    (weight tensor, groups, transposed)."""
    gm = dg.gm
    modules = dict(gm.named_modules())
    nodes, weights = {}, {}
    for node in gm.graph.nodes:
        if not node.op.startswith("call_"):
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        rule = find_rule(node, module)
        if rule is None or rule.kind != LAYER:
            continue
        param = operand_param(rule, node, "weight")
        w = operand(rule, node, module, "weight")
        if isinstance(w, torch.fx.Node) and w.op == "get_attr":
            w = gm
            for part in str(operand_param(rule, node, "weight")).split("."):
                w = getattr(w, part, None)
        x = operand(rule, node, module, "input")
        if param is None or not isinstance(w, torch.Tensor) or w.dim() < 2 or not isinstance(x, torch.fx.Node):
            continue
        groups = operand(rule, node, module, "groups", 1) or 1
        nodes[node] = (param, x, w.dim())
        weights[param] = (w, int(groups), bool(rule.operands.transposed))
    return nodes, weights


def _wanda(w: torch.Tensor, sumsq: torch.Tensor, groups: int, transposed: bool) -> dict[int, np.ndarray] | None:
    """Per position along weight dims 0 and 1: the summed ``|w| * ||x_in(w)||`` of its slice."""
    a = w.detach().double().abs()
    a = a.reshape(a.shape[0], a.shape[1], -1).sum(2)  # kernel window summed
    norms = sumsq.sqrt().to(a.device)
    if transposed:  # [in, out/groups, *k]: row j reads input channel j
        if norms.shape[0] != a.shape[0]:
            return None
        s = a * norms[:, None]
    else:  # [out, in/groups, *k]
        out, per = a.shape
        if norms.shape[0] != per * groups or out % groups:
            return None
        idx = (torch.arange(out, device=a.device) // (out // groups))[:, None] * per + torch.arange(per, device=a.device)
        s = a * norms[idx]
    return {0: s.sum(1).cpu().numpy(), 1: s.sum(0).cpu().numpy()}


def activation(
    model: torch.nn.Module,
    dg: Any,
    *,
    data: Iterable | None = None,
    roles: Iterable[str] = ("out", "in"),
    max_batches: int | None = None,
    normalize: bool | str | None = False,
    **_: Any,
) -> dict[int, np.ndarray]:
    """Wanda score of each channel: ``|W|`` times its input's activation norm, summed over
    the weights the channel owns (see the module docstring); higher = more important.

    >>> import torch, graphprune as gp
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> with torch.no_grad():
    ...     _ = model[0].weight[1].zero_(), model[0].bias.fill_(0.1), model[0].bias[1].fill_(0.0)
    >>> x = torch.randn(16, 3)
    >>> dg = gp.DependencyGraph.build(model, x)
    >>> int(activation(model, dg, data=[x])[0].argmin())  # unit 1 never fires
    1
    """
    if data is None:
        raise InputError("criterion 'activation' is data-driven: pass data=<iterable of calibration batches> "
                         "(tensors, (inputs, targets) pairs or dicts of keyword arguments)")
    if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise InputError(f"activation: data must be an iterable of batches, got {type(data).__name__}")
    roles = set(roles)
    groups = [g for g in dg.groups if g.prunable]
    layer_nodes, weights = _layers(dg)
    measured = {g.id: [m for m in g.members if m.role in roles and m.param in weights and m.dim in (0, 1)]
                for g in groups}
    # groups with no weighted-layer slice: their channels' norm in the first tensor carrying them
    watch: dict[torch.fx.Node, list[tuple[int, int, np.ndarray]]] = {}
    bare = [g for g in groups if not measured[g.id]]
    if bare:
        for node in dg.gm.graph.nodes:
            if not bare:
                break
            for g in list(bare):
                axes = group_axes(dg, g.id, dg.node_labels.get(node.name), node.meta.get("shape"))
                if axes:
                    watch.setdefault(node, []).extend((g.id, d, chan) for d, chan in axes)
                    bare.remove(g)
    names = getattr(dg, "example_names", None)
    device = model_device(model)
    count = 0
    run = _Capture(dg.gm, layer_nodes, watch)
    with torch.no_grad(), eval_mode(model):  # an fx graph shares the model's modules
        for i, item in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            tensors = tuple(t.to(device) for t in _inputs(item, i, names))
            try:
                run.run(*tensors)
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                raise InputError(
                    f"activation: the traced graph cannot run on data item {i} (shapes "
                    f"{[tuple(t.shape) for t in tensors]}): {type(exc).__name__}: {str(exc)[:200]}. A graph "
                    "from torch.export may only run at the example input shapes; give batches of those") from exc
            count += 1
    if count == 0:
        raise InputError("activation: data is empty; give at least one calibration batch")
    # over the processes sharing the data (identity in one): sums of squares add up
    run.sumsq, run.group_sumsq = reduce_sum(run.sumsq, run.group_sumsq)
    per_weight: dict[str, dict[int, np.ndarray] | None] = {}
    scores: dict[int, np.ndarray] = {}
    for g in groups:
        total = np.zeros(g.size)
        for m in measured[g.id]:
            if m.param not in per_weight:
                w, n_groups, transposed = weights[m.param]
                sumsq = run.sumsq.get(m.param)
                per_weight[m.param] = None if sumsq is None else _wanda(w, sumsq, n_groups, transposed)
            vec = per_weight[m.param]
            if vec is not None:
                np.add.at(total, m.channels, vec[m.dim][m.positions])
        if g.id in run.group_sumsq:
            acc = run.group_sumsq[g.id]
            total[:len(acc)] += np.sqrt(acc[:g.size])
        scores[g.id] = total
    return normalize_scores(scores, normalize)
