"""What the criteria share: data handling, member slices, score normalisation, ablations.

**Removing a channel, exactly.** A group's channel is removed by zeroing its ``in``
member slices (the input columns of every layer that reads it); that is what
``graphprune.verify.masked_model`` does and, for channel-separable models, it computes
exactly what the slim model computes. Groups without ``in`` members (channels read
only by parameter-free ops, such as the query/key channels of an attention score) are
removed by zeroing their ``out`` and ``pass`` parameter slices instead. Every
data-driven criterion measures or approximates the loss change of this ablation.

**Running many ablations cheaply** (:class:`Ablator`). The traced graph (``dg.gm``,
nodes in topological order) is cut just before the first node that reads a masked
parameter: the *prefix* runs once per batch and its live outputs are cached; the
*suffix* GraphModule runs once per ablation with masked parameters substituted through
``torch.func.functional_call``. Several ablations run in one call, vectorised with
``torch.func.vmap`` over stacked masked parameters (layers whose weights are not
masked see one wide batch); if an op has no vmap rule, the ablations run one by one.
Neither the model nor its parameters are modified.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.fx
from torch.utils import _pytree as pytree

from graphprune.errors import GraphPruneError, InputError

__all__ = [
    "LossError", "Ablator", "Batch", "normalize_scores", "prepare_data", "iterate_data",
    "require_loss_fn", "removal_members", "eval_mode", "state_of", "check_loss",
]


class LossError(GraphPruneError):
    """The loss is NaN or infinite, so no data-driven score can be computed."""


Batch = tuple[tuple[torch.Tensor, ...], Any, int]  # inputs, targets, number of samples


# --- data ----------------------------------------------------------------------------------------
def _to(value: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, value)


def _batch(item: Any, i: int, device: torch.device, name: str) -> Batch:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise InputError(
            f"{name}: data item {i} is a {type(item).__name__}; data must yield "
            "(inputs, targets) pairs, e.g. a DataLoader over a TensorDataset")
    inputs, targets = item
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise InputError(f"{name}: the inputs of data item {i} must be a tensor or a tuple of tensors")
    n = int(inputs[0].shape[0]) if inputs[0].dim() else 1
    if n == 0:
        raise InputError(f"{name}: data item {i} is an empty batch")
    return _to(inputs, device), _to(targets, device), n


def iterate_data(data: Iterable | None, name: str, device: torch.device,
                 max_batches: int | None = None) -> Iterator[Batch]:
    """Validated ``(inputs tuple, targets, batch size)`` triples; raises on empty data."""
    if data is None:
        raise InputError(
            f"criterion {name!r} is data-driven: pass data=<iterable of (inputs, targets)> "
            "and loss_fn=<callable(outputs, targets) -> scalar>")
    if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise InputError(f"{name}: data must be an iterable of (inputs, targets) pairs, "
                         f"got {type(data).__name__}")
    count = 0
    for i, item in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        count += 1
        yield _batch(item, i, device, name)
    if count == 0:
        raise InputError(f"{name}: data is empty; give at least one (inputs, targets) batch")


def prepare_data(data: Iterable | None, name: str, device: torch.device,
                 max_batches: int | None = None) -> list[Batch]:
    """All batches in a list (criteria that pass over the data many times)."""
    return list(iterate_data(data, name, device, max_batches))


def require_loss_fn(loss_fn: Callable | None, name: str) -> Callable:
    if loss_fn is None:
        raise InputError(
            f"criterion {name!r} needs loss_fn=<callable(outputs, targets) -> scalar loss>, "
            "e.g. loss_fn=torch.nn.functional.cross_entropy")
    if not callable(loss_fn):
        raise InputError(f"{name}: loss_fn must be callable, got {type(loss_fn).__name__}")
    return loss_fn


def check_loss(loss: Any, name: str, where: str) -> torch.Tensor:
    """The loss as a 0-d tensor; ``LossError`` if it is NaN or infinite."""
    if not isinstance(loss, torch.Tensor):
        loss = torch.as_tensor(loss, dtype=torch.float64)
    if loss.numel() != 1:
        raise InputError(f"{name}: loss_fn must return a scalar, got shape {tuple(loss.shape)}")
    loss = loss.reshape(())
    if not bool(torch.isfinite(loss.detach())):
        raise LossError(
            f"{name}: the loss is {loss.item()} {where}. Check the data (NaN/inf inputs), "
            "the targets and loss_fn; data-driven scores need a finite loss")
    return loss


def model_device(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


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


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    return state


# --- members ---------------------------------------------------------------------------------------
def removal_members(group: Any, params: Mapping[str, Any]) -> list[Any]:
    """The members whose zeroing removes the group's channels (see the module docstring)."""
    found = [m for m in group.members if m.role == "in" and m.param in params]
    if not found:
        found = [m for m in group.members if m.role in ("out", "pass") and m.param in params]
    return found


def members_with_roles(group: Any, roles: Iterable[str], params: Mapping[str, Any]) -> list[Any]:
    """Members of ``roles`` that are parameters; all parameter members if there are none."""
    roles = set(roles)
    found = [m for m in group.members if m.role in roles and m.param in params]
    return found or [m for m in group.members if m.param in params]


def per_channel(member: Any, values: torch.Tensor, size: int) -> np.ndarray:
    """Sum of ``values`` (shaped like the member's tensor) over each channel's slice."""
    t = values.detach().double().movedim(member.dim, 0)[list(member.positions)]
    per_pos = t.reshape(len(member.positions), -1).sum(1).cpu().numpy()
    out = np.zeros(size)
    np.add.at(out, np.asarray(member.channels), per_pos)
    return out


# --- normalisation ---------------------------------------------------------------------------------
NORMALIZERS = ("max", "mean", "sum", "std", "none")


def normalize_scores(scores: Mapping[int, np.ndarray], how: str | bool | None) -> dict[int, np.ndarray]:
    """Rescale each group's scores so groups compare in a global ranking.

    ``max``/``mean``/``sum`` divide by the group's max, mean or sum of absolute scores;
    ``std`` standardises (zero mean, unit deviation); ``None``/``"none"`` keeps them.
    ``True`` means ``max``.

    >>> normalize_scores({0: np.array([1.0, 3.0])}, "max")[0].tolist()
    [0.3333333333333333, 1.0]
    """
    if how is True:
        how = "max"
    if how in (None, False, "none"):
        return {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}
    if how not in NORMALIZERS:
        raise InputError(f"normalize must be one of {NORMALIZERS} or None, got {how!r}")
    out = {}
    for gid, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        if how == "std":
            sd = s.std()
            out[gid] = (s - s.mean()) / sd if sd > 0 else np.zeros_like(s)
            continue
        a = np.abs(s)
        d = a.max() if how == "max" else a.mean() if how == "mean" else a.sum()
        out[gid] = s / d if d > 0 else s.copy()
    return out


# --- ablations ---------------------------------------------------------------------------------------
def _node_params(node: torch.fx.Node, modules: Mapping[str, torch.nn.Module]) -> set[str]:
    if node.op == "get_attr":
        return {str(node.target)}
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        if mod is None:
            return set()
        prefix = f"{node.target}."
        names = {prefix + n for n, _ in mod.named_parameters()}
        return names | {prefix + n for n, _ in mod.named_buffers()}
    return set()


def _split(gm: torch.fx.GraphModule, params: set[str]) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule, int]:
    """Prefix and suffix GraphModules around the first node that reads ``params``."""
    nodes = list(gm.graph.nodes)
    modules = dict(gm.named_modules())
    cut = next((i for i, n in enumerate(nodes) if _node_params(n, modules) & params), None)
    if cut is None:
        raise GraphPruneError(f"no node of the traced graph reads {sorted(params)[:3]}")
    before = set(nodes[:cut])
    live = [n for n in nodes[:cut] if any(u not in before for u in n.users)]

    prefix = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in nodes[:cut]:
        env[n] = prefix.node_copy(n, lambda a: env[a])
    prefix.output(tuple(env[n] for n in live))

    suffix = torch.fx.Graph()
    env = {n: suffix.placeholder(f"live_{n.name}") for n in live}
    for n in nodes[cut:]:
        env[n] = suffix.node_copy(n, lambda a: env[a])
    return torch.fx.GraphModule(gm, prefix), torch.fx.GraphModule(gm, suffix), cut


def _output_elems_per_sample(gm: torch.fx.GraphModule, start: int, batch: int) -> int:
    biggest = 1
    for i, n in enumerate(gm.graph.nodes):
        shape = n.meta.get("shape")
        if i >= start and isinstance(shape, torch.Size):
            biggest = max(biggest, math.prod(shape))
    return max(1, biggest // max(1, batch))


class Ablator:
    """Loss of the model with chosen channel sets of one group removed, batch by batch.

    >>> import torch, torch.nn.functional as F, graphprune as gp
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> dg = gp.DependencyGraph.build(model, x)
    >>> ab = Ablator(model, dg, dg.groups[0], [((x,), y, 8)], F.cross_entropy)
    >>> removed = np.array([[False] * 4, [True] * 4])
    >>> losses = ab.losses(removed)
    >>> bool(abs(losses[1] - F.cross_entropy(model[2].bias.expand(8, 2), y).item()) < 1e-5)
    True
    """

    def __init__(self, model: torch.nn.Module, dg: Any, group: Any, batches: list[Batch],
                 loss_fn: Callable, *, name: str = "ablation", chunk: int | None = None,
                 memory_mb: float = 512.0) -> None:
        self.model, self.group, self.loss_fn, self.name = model, group, loss_fn, name
        state = state_of(model)
        self.members = removal_members(group, state)
        if not self.members:
            raise GraphPruneError(f"group {group.id} owns no parameter slices to zero; cannot ablate it")
        self.params = {m.param: state[m.param].detach() for m in self.members}
        self.prefix, self.suffix, cut = _split(dg.gm, set(self.params))
        self.batches = batches
        self.total = float(sum(b[2] for b in batches))
        with torch.no_grad(), eval_mode(model):
            self.cache = [self.prefix(*inputs) for inputs, _, _ in batches]
        if chunk is None:
            example_batch = dg.example_shapes[0][0] if dg.example_shapes and dg.example_shapes[0] else 1
            per = _output_elems_per_sample(dg.gm, cut, example_batch)
            biggest = max(b[2] for b in batches)
            chunk = int(memory_mb * 2**20 / (4 * 4 * per * biggest))
        self.chunk = max(1, min(int(chunk), 256))
        self.level = 2
        # positions along each (param, dim) and the group channel each one carries
        self.slices = [(m.param, m.dim, torch.as_tensor(m.positions), np.asarray(m.channels))
                       for m in self.members]

    def _masked(self, removed: np.ndarray) -> dict[str, torch.Tensor]:
        """Stacked parameters, one copy per row of ``removed`` (K x group size, bool)."""
        k = removed.shape[0]
        out: dict[str, torch.Tensor] = {}
        for param, dim, pos, chans in self.slices:
            base = out.get(param, self.params[param].unsqueeze(0).expand(k, *self.params[param].shape))
            size = base.shape[dim + 1]
            keep = torch.ones(k, size, dtype=base.dtype, device=base.device)
            keep[:, pos] = torch.as_tensor(~removed[:, chans], dtype=base.dtype, device=base.device)
            view = [k] + [1] * (base.dim() - 1)
            view[dim + 1] = size
            out[param] = base * keep.reshape(view)
        return out

    def _run(self, stacked: dict[str, torch.Tensor], live: tuple, targets: Any) -> list[Any]:
        """Losses of the stacked ablations on one batch: vectorised where possible.

        ``self.level``: 2 = model and loss under one vmap, 1 = model vmapped and the
        loss looped, 0 = everything looped (an op or the loss without a batching rule).
        """
        k = next(iter(stacked.values())).shape[0]

        def call(p: dict[str, torch.Tensor]) -> Any:
            return torch.func.functional_call(self.suffix, p, live)

        while self.level > 0 and k > 1:
            try:
                if self.level == 2:
                    losses = torch.func.vmap(lambda p: self.loss_fn(call(p), targets))(stacked)
                    if not isinstance(losses, torch.Tensor) or losses.shape != (k,):
                        raise TypeError("loss_fn did not return a scalar per ablation")
                    return list(losses)
                out = torch.func.vmap(call)(stacked)
                return [self.loss_fn(pytree.tree_map(lambda t, j=j: t[j], out), targets) for j in range(k)]
            except Exception as exc:  # no batching rule somewhere: vectorise less
                self.level -= 1
                if self.level == 0:
                    warnings.warn(f"{self.name}: vectorised ablations failed ({type(exc).__name__}: "
                                  f"{exc}); running them one at a time", RuntimeWarning, stacklevel=4)
        return [self.loss_fn(call({n: t[j] for n, t in stacked.items()}), targets) for j in range(k)]

    def losses(self, removed: np.ndarray) -> np.ndarray:
        """Mean loss over the data (weighted by batch size) for each row of ``removed``."""
        removed = np.atleast_2d(np.asarray(removed, dtype=bool))
        total = np.zeros(removed.shape[0])
        with torch.no_grad(), eval_mode(self.model):
            for start in range(0, removed.shape[0], self.chunk):
                rows = removed[start:start + self.chunk]
                stacked = self._masked(rows)
                for (_, targets, n), live in zip(self.batches, self.cache):
                    values = self._run(stacked, live, targets)
                    for j, loss in enumerate(values):
                        r = rows[j]
                        where = (f"with channels {np.flatnonzero(r).tolist()[:8]} of group "
                                 f"{self.group.id} removed") if r.any() else "on the unpruned model"
                        total[start + j] += float(check_loss(loss, self.name, where)) * n
        return total / self.total
