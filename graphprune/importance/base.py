"""What the criteria share: data handling, member slices, score normalisation, ablations.

**Removing a channel, exactly.** A group's channel is removed by zeroing it in every
tensor the traced graph computes that carries it (producer outputs, norm outputs,
residual sums, concatenations, flattened features). That is the reference
``graphprune.verify`` checks the slim model against, so for exact groups the loss of
an ablation equals the loss of ``gp.apply(model, dg, plan)``. For channel-separable
models it is also what zeroing the group's ``in`` member slices (the input columns of
the layers that read the channel) computes; the gradient criteria (``taylor``,
``hessian``) differentiate along those slices.

**Running many ablations cheaply** (:class:`Ablator`). The traced graph (``dg.gm``,
nodes in topological order) is cut just before the first node whose output carries
the group: the *prefix* runs once per batch and its live outputs are cached; the
*suffix* GraphModule, with a mask multiplication after every node that carries the
group, runs once per chunk of ablations, vectorised with ``torch.func.vmap`` over the
stacked masks (everything upstream of the first mask stays one ordinary batch); if an
op has no batching rule the ablations run one by one. The model is never modified.

**Sharing the work between processes** (:class:`Reducer`). A data-driven criterion
accumulates sums over its data (gradient products, squared gradients, losses times
batch sizes, sample counts) and forms its score from them at the end. Just before that
it hands the sums to the current reducer (``reduce_sum``), which is the identity in
one process; ``graphprune.distributed`` installs one that all-reduces them over a
``torch.distributed`` process group, so that each rank can score its shard of the data
and every rank gets the score of the union. Ablations (``Ablator.losses``) either sum
their losses the same way (each rank ablates on its own data) or split the ablations
between ranks (``Reducer.mine``; every rank holds the same data) and gather them.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.fx
from torch.utils import _pytree as pytree

from graphprune.errors import GraphPruneError, InputError, LossError, warn_user
from graphprune.rules.base import is_inplace
from graphprune.tracing import eval_mode

__all__ = [
    "LossError", "Ablator", "Batch", "normalize_scores", "prepare_data", "iterate_data",
    "require_loss_fn", "group_axes", "eval_mode", "check_loss", "Reducer", "reducer", "reducing",
    "reduce_sum",
]


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


# --- processes ----------------------------------------------------------------------------------------
class Reducer:
    """How criteria combine their sums with other processes; this base class is one process.

    - ``sum(tensors)``: the element-wise sums of ``tensors`` over the processes (here: as given);
    - ``mine(n, block)``: which of ``n`` ablations this process computes, in whole blocks of
      ``block`` (here: all);
    - ``gather(values, mine, n)``: the ``n`` ablation results, each process having computed
      ``values`` at positions ``mine`` (here: ``values`` as they are);
    - ``least(value)``: the smallest of the processes' ``value`` (here: ``value``);
    - ``rank``: this process's index (criteria that draw random numbers offset their seed by it).

    >>> Reducer().mine(3).tolist(), Reducer().rank
    ([0, 1, 2], 0)
    """

    rank = 0

    def sum(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return tensors

    def mine(self, n: int, block: int = 1) -> np.ndarray:
        return np.arange(n)

    def gather(self, values: np.ndarray, mine: np.ndarray, n: int) -> np.ndarray:
        return values

    def least(self, value: int) -> int:
        """The smallest ``value`` over the processes (so that sizes that steer collectives agree)."""
        return value


_ONE = Reducer()
_REDUCER: contextvars.ContextVar[Reducer | None] = contextvars.ContextVar("graphprune_reducer", default=None)


def reducer() -> Reducer:
    """The reducer criteria use now (one process unless inside ``reducing``)."""
    return _REDUCER.get() or _ONE


@contextlib.contextmanager
def reducing(r: Reducer) -> Iterator[Reducer]:
    """Criteria run inside this block combine their sums with ``r``."""
    token = _REDUCER.set(r)
    try:
        yield r
    finally:
        _REDUCER.reset(token)


def reduce_sum(*values: Any) -> tuple[Any, ...]:
    """``values`` (tensors, numpy arrays, numbers, or dicts of them) summed over the processes
    by the current reducer, in one call; each comes back in its own type.

    >>> reduce_sum({"a": np.ones(2)}, 3)
    ({'a': array([1., 1.])}, 3)
    """
    leaves, spec = pytree.tree_flatten(list(values))
    if not leaves:
        return tuple(values)
    flat = [torch.as_tensor(v, dtype=torch.float64).detach().cpu().reshape(-1) for v in leaves]
    summed = reducer().sum([torch.cat(flat)])[0]
    out, start = [], 0
    for v, t in zip(leaves, flat):
        part = summed[start:start + t.numel()]
        start += t.numel()
        if isinstance(v, torch.Tensor):
            out.append(part.reshape(v.shape).to(dtype=v.dtype, device=v.device))
        elif isinstance(v, np.ndarray):
            out.append(part.reshape(v.shape).numpy().astype(v.dtype, copy=False))
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            out.append(int(round(float(part.item()))))
        else:
            out.append(float(part.item()))
    return tuple(pytree.tree_unflatten(out, spec))


# --- members ---------------------------------------------------------------------------------------
def members_with_roles(group: Any, roles: Iterable[str], params: Mapping[str, Any]) -> list[Any]:
    """Members of ``roles`` that are parameters; all parameter members if there are none."""
    roles = set(roles)
    found = [m for m in group.members if m.role in roles and m.param in params]
    return found or [m for m in group.members if m.param in params]


def per_channel(member: Any, values: torch.Tensor, size: int) -> np.ndarray:
    """Sum of ``values`` (shaped like the member's tensor) over each channel's slice."""
    t = values.detach().double().movedim(member.dim, 0)[torch.as_tensor(member.positions, device=values.device)]
    per_pos = t.reshape(len(member.positions), -1).sum(1).cpu().numpy()
    out = np.zeros(size)
    np.add.at(out, member.channels, per_pos)
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
def group_axes(dg: Any, gid: int, labels: Any, shape: Any) -> list[tuple[int, np.ndarray]]:
    """``(dim, channel per position or -1)`` for each axis of a tensor carrying group ``gid``."""
    if not isinstance(shape, torch.Size) or not isinstance(labels, tuple) or type(labels) is not tuple:
        return []
    axes = []
    for d, lab in enumerate(labels):
        if lab is None or d >= len(shape) or not isinstance(lab, np.ndarray):
            continue
        cls = dg.cls[lab]
        chan = np.where(dg.group_of_cls[cls] == gid, dg.chan_of_cls[cls], -1).astype(np.int64)
        if (chan >= 0).any():
            axes.append((d, chan))
    return axes


def zero_removed(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x`` with the positions where ``keep`` is 0 set to exactly 0: unlike ``x * keep``, a NaN
    or inf that a removed channel computed (``p / p.sum(1)`` over removed rows) does not leak."""
    return torch.where(keep != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


class Ablator:
    """Loss of the model with chosen channel sets of one group removed, over fixed batches.

    Removal zeroes the group's channels in every tensor the graph computes (the
    reference that ``graphprune.verify`` checks the slim model against). The graph is
    cut before the first node that carries the group's channels; the prefix runs once
    per batch (cached), the suffix once per chunk of ablations, vectorised by
    ``torch.func.vmap`` over the stacked masks.

    >>> import torch, torch.nn.functional as F, graphprune as gp
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> dg = gp.DependencyGraph.build(model, x)
    >>> ab = Ablator(model, dg, dg.groups[0], [((x,), y, 8)], F.cross_entropy)
    >>> none, every = ab.losses(np.array([[False] * 4, [True] * 4]))
    >>> bool(abs(every - F.cross_entropy(model[2].bias.expand(8, 2), y).item()) < 1e-5)
    True
    """

    def __init__(self, model: torch.nn.Module, dg: Any, group: Any, batches: list[Batch],
                 loss_fn: Callable, *, name: str = "ablation", chunk: int | None = None,
                 memory_mb: float = 512.0) -> None:
        self.model, self.group, self.loss_fn, self.name = model, group, loss_fn, name
        gm = dg.gm
        nodes = list(gm.graph.nodes)
        modules = dict(gm.named_modules())
        axes = {n: group_axes(dg, group.id, dg.node_labels.get(n.name), n.meta.get("shape"))
                for n in nodes if n.op != "output"}
        cut = next((i for i, n in enumerate(nodes) if axes.get(n)), None)
        if cut is None:
            raise GraphPruneError(f"{name}: no tensor of the traced graph carries group {group.id}")
        before = set(nodes[:cut])
        live = [n for n in nodes[:cut] if any(u not in before for u in n.users)]

        prefix = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for n in nodes[:cut]:
            env[n] = prefix.node_copy(n, lambda a: env[a])
        prefix.output(tuple(env[n] for n in live))

        suffix = torch.fx.Graph()
        env = {n: suffix.placeholder(f"live_{i}") for i, n in enumerate(live)}
        specs: dict[tuple, int] = {}  # (ndim, dim, channels) -> mask placeholder index
        for n in nodes[cut:]:
            for d, chan in axes.get(n, ()):
                specs.setdefault((len(n.meta["shape"]), d, chan.tobytes(), len(chan)), len(specs))
        masks = [suffix.placeholder(f"mask_{i}") for i in range(len(specs))]
        self._specs = []
        for ndim, d, raw, size in specs:
            self._specs.append((ndim, d, np.frombuffer(raw, dtype=np.int64, count=size)))
        for n in nodes[cut:]:
            out = suffix.node_copy(n, lambda a: env[a])
            for d, chan in axes.get(n, ()):
                key = (len(n.meta["shape"]), d, chan.tobytes(), len(chan))
                out = suffix.call_function(zero_removed, (out, masks[specs[key]]))
            env[n] = out
        self.prefix = torch.fx.GraphModule(gm, prefix)
        self.suffix = torch.fx.GraphModule(gm, suffix)
        self.copy_live = any(is_inplace(n, modules.get(n.target) if n.op == "call_module" else None)
                             for n in nodes[cut:])

        self.batches = batches
        self.total = float(sum(b[2] for b in batches))
        with torch.no_grad(), eval_mode(model):
            self.cache = [tuple(self.prefix(*inputs)) for inputs, _, _ in batches]
        if chunk is None:
            example_batch = dg.example_shapes[0][0] if dg.example_shapes and dg.example_shapes[0] else 1
            per = max(1, max((math.prod(n.meta["shape"]) for n in nodes[cut:]
                              if isinstance(n.meta.get("shape"), torch.Size)), default=1)
                      // max(1, example_batch))
            biggest = max(b[2] for b in batches)
            chunk = int(memory_mb * 2**20 / (4 * 4 * per * biggest))
        self.chunk = reducer().least(max(1, min(int(chunk), 256)))  # the same on every process
        self.level = 2
        self.dtype = next((t.dtype for t in model.parameters()), torch.float32)
        self.device = model_device(model)

    def _masks(self, removed: np.ndarray) -> list[torch.Tensor]:
        """One stacked mask per spec: row k zeroes the channels ``removed[k]`` marks."""
        k = removed.shape[0]
        out = []
        for ndim, d, chan in self._specs:
            keep = np.ones((k, len(chan)))
            inside = chan >= 0
            keep[:, inside] = ~removed[:, chan[inside]]
            shape = [k] + [1] * ndim
            shape[d + 1] = len(chan)
            out.append(torch.as_tensor(keep, dtype=self.dtype, device=self.device).reshape(shape))
        return out

    def _run(self, masks: list[torch.Tensor], live: tuple, targets: Any) -> list[Any]:
        """Losses of the stacked ablations on one batch: vectorised where possible.

        ``self.level``: 2 = model and loss under one vmap, 1 = model vmapped and the
        loss looped, 0 = everything looped (an op or the loss without a batching rule).
        """
        k = masks[0].shape[0] if masks else 1

        def call(*m: torch.Tensor) -> Any:
            args = tuple(t.clone() for t in live) if self.copy_live else live
            return self.suffix(*args, *m)

        while self.level > 0 and k > 1:
            try:
                if self.level == 2:
                    losses = torch.func.vmap(lambda *m: self.loss_fn(call(*m), targets))(*masks)
                    if not isinstance(losses, torch.Tensor) or losses.shape != (k,):
                        raise TypeError("loss_fn did not return a scalar per ablation")
                    return list(losses)
                out = torch.func.vmap(call)(*masks)
                return [self.loss_fn(pytree.tree_map(lambda t, j=j: t[j], out), targets) for j in range(k)]
            except Exception as exc:  # no batching rule somewhere: vectorise less
                self.level -= 1
                if self.level == 0:
                    warn_user(f"{self.name}: vectorised ablations failed ({type(exc).__name__}: "
                              f"{exc}); running them one at a time", RuntimeWarning)
        return [self.loss_fn(call(*(m[j] for m in masks)), targets) for j in range(k)]

    def losses(self, removed: np.ndarray) -> np.ndarray:
        """Mean loss over the data (weighted by batch size) for each row of ``removed``.

        Under a ``Reducer`` of several processes the rows are shared out (``mine``) and
        gathered, or the loss sums and sample counts are summed over the processes."""
        removed = np.atleast_2d(np.asarray(removed, dtype=bool))
        n_rows = removed.shape[0]
        share = reducer()
        mine = share.mine(n_rows, self.chunk)  # whole chunks: each row computed as in one process
        removed = removed[mine]
        total = np.zeros(removed.shape[0])
        with torch.no_grad(), eval_mode(self.model):
            for start in range(0, removed.shape[0], self.chunk):
                rows = removed[start:start + self.chunk]
                masks = self._masks(rows)
                for (_, targets, n), live in zip(self.batches, self.cache):
                    for j, loss in enumerate(self._run(masks, live, targets)):
                        r = rows[j]
                        where = (f"with channels {np.flatnonzero(r).tolist()[:8]} of group "
                                 f"{self.group.id} removed") if r.any() else "on the unpruned model"
                        total[start + j] += float(check_loss(loss, self.name, where)) * n
        total, count = reduce_sum(total, self.total)
        return share.gather(total / count, mine, n_rows)
