"""Scoring, planning and recovery over a ``torch.distributed`` process group.

Launch one process per device with ``torchrun`` and call
``torch.distributed.init_process_group()``; then every rank runs the same script:

- **scoring** (``score``, or any graphprune code inside ``scoring()``): each rank scores
  its shard of the data (``shard``). The data-driven criteria accumulate sums (Taylor:
  per-batch products ``(sum g*w)^2`` times the batch size; Hessian/Fisher: squared
  per-sample gradients; activation: squared activations per channel; oracle/Shapley:
  losses times batch sizes; and the sample counts)
  and all-reduce them before forming the score, so every rank gets the one-process score
  on the union of the shards, up to float summation order. With ``split="ablations"``
  every rank holds the same data instead and the oracle/Shapley ablations are shared out
  between the ranks and gathered.
- **planning** (``plan``): rank ``src`` selects, the plan is broadcast as JSON, and every
  rank checks that it holds the same plan on the same graph (``check_plan``: a digest
  compared across ranks; ``PlanMismatchError`` names the ranks that differ).
- **recovery**: ``graphprune.train.finetune(..., ddp=True)`` trains under
  ``DistributedDataParallel``; ``iterative_prune`` runs the pruning loop of
  ``graphprune.steps`` with the plan of each step shared this way and a DDP fine-tune
  after it.

Without a process group (and ``WORLD_SIZE`` unset or 1) everything runs as one process.

>>> import torch, torch.nn.functional as F, graphprune as gp
>>> model, x = gp.zoo.create("mlp")
>>> data = [(torch.randn(4, *x[0].shape[1:]), torch.randint(0, 10, (4,))) for _ in range(2)]
>>> dg = gp.DependencyGraph.build(model, x)
>>> plan = gp.distributed.plan(model, dg, "taylor", 0.5, data=shard(data), loss_fn=F.cross_entropy)
>>> plan == gp.select(dg, gp.score("taylor", model, dg, data=data, loss_fn=F.cross_entropy), 0.5)
True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from graphprune.api import ScorePlanner
from graphprune.errors import InputError, PlanMismatchError
from graphprune.graph import DependencyGraph
from graphprune.importance import check_options
from graphprune.importance import score as score_one
from graphprune.importance.base import Reducer, reducing
from graphprune.plan import Plan
from graphprune.rewrite import apply as apply_one
from graphprune.select import select
from graphprune.steps import Pruner, PruneResult, Step

__all__ = ["shard", "scoring", "score", "plan", "broadcast_plan", "plan_digest", "check_plan", "apply",
           "SharedPlanner", "iterative_prune", "GroupReducer", "PlanMismatchError"]

SPLITS = ("data", "ablations")


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def _active(group: Any = None) -> bool:
    """Whether a process group is initialised; raises if a launcher started several
    processes but none was."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but no torch.distributed process group "
                         "is initialised: call torch.distributed.init_process_group() in every process first")
    if group is not None:
        raise InputError("a process group was given but torch.distributed is not initialised")
    return False


def _rank_world(group: Any = None) -> tuple[int, int]:
    if not _active(group):
        return 0, 1
    dist = _dist()
    return dist.get_rank(group), dist.get_world_size(group)


def _gather(obj: Any, group: Any = None) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in one process)."""
    if not _active(group):
        return [obj]
    dist = _dist()
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


class GroupReducer(Reducer):
    """A ``Reducer`` over a process group: sums are all-reduced (``split="data"``), or the
    ablations are shared out round-robin, a block (the ablations vectorised together) at a
    time, and gathered (``split="ablations"``)."""

    def __init__(self, group: Any = None, split: str = "data") -> None:
        if split not in SPLITS:
            raise InputError(f"split must be one of {SPLITS}, got {split!r}")
        dist = _dist()
        self.group, self.split = group, split
        self.index, self.world = dist.get_rank(group), dist.get_world_size(group)
        # criteria offset random seeds by ``rank``: only ranks that hold different data differ
        self.rank = self.index if split == "data" else 0
        backend = dist.get_backend(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.calls = 0  # collectives run, and
        self.ablations = 0  # ablations this rank computed (for tests and benchmarks)

    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        buf = t.detach().to(self.device, copy=True)
        _dist().all_reduce(buf, op=_dist().ReduceOp.SUM, group=self.group)
        self.calls += 1
        return buf.to(t.device)

    def sum(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self._all_sum(t) for t in tensors] if self.split == "data" else tensors

    def mine(self, n: int, block: int = 1) -> np.ndarray:
        if self.split == "data":
            self.ablations += n
            return np.arange(n)
        blocks = np.arange(n) // max(1, block)  # block k goes to rank k % world
        mine = np.flatnonzero(blocks % self.world == self.index)
        self.ablations += len(mine)
        return mine

    def gather(self, values: np.ndarray, mine: np.ndarray, n: int) -> np.ndarray:
        if self.split == "data":
            return values
        full = torch.zeros(n, dtype=torch.float64)
        full[torch.as_tensor(mine, dtype=torch.long)] = torch.as_tensor(values, dtype=torch.float64)
        return self._all_sum(full).numpy()  # each position is one rank's value plus zeros: exact

    def least(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        _dist().all_reduce(t, op=_dist().ReduceOp.MIN, group=self.group)
        self.calls += 1
        return int(t.item())


class _Shard:
    def __init__(self, data: Iterable, rank: int, world: int) -> None:
        self.data, self.rank, self.world = data, rank, world

    def __iter__(self) -> Iterator[Any]:
        for i, item in enumerate(self.data):
            if i % self.world == self.rank:
                yield item

    def __len__(self) -> int:
        n = len(self.data)  # type: ignore[arg-type]
        return max(0, math.ceil((n - self.rank) / self.world))

    def __repr__(self) -> str:
        return f"shard(rank {self.rank} of {self.world})"


def shard(data: Iterable, rank: int | None = None, world_size: int | None = None, *,
          group: Any = None) -> Iterable:
    """Batches ``rank``, ``rank + world_size``, ... of ``data``: this rank's share (re-iterable
    if ``data`` is, with a length if ``data`` has one). ``rank`` and ``world_size`` default to
    the process group's (all of ``data`` in one process).

    >>> list(shard(range(5), 1, 2))
    [1, 3]
    """
    r, w = _rank_world(group) if rank is None or world_size is None else (0, 1)
    r = r if rank is None else rank
    w = w if world_size is None else world_size
    if not 0 <= r < w:
        raise InputError(f"shard: rank must be in [0, world_size), got rank {r} of {w}")
    return _Shard(data, r, w)


def _check_counts(data: Any, group: Any, what: str, *, equal: bool = False) -> None:
    """Raise ``InputError`` on every rank if some rank has no batches (or, with ``equal``, if
    the ranks have different numbers of batches), when ``data`` has a length."""
    try:
        n = len(data)
    except TypeError:
        n = -1
    counts = _gather(n, group)
    if -1 in counts:
        return
    empty = [r for r, c in enumerate(counts) if c == 0]
    if empty:
        raise InputError(f"{what}: rank(s) {empty} have no batches (batches per rank: {counts}); give every "
                         "rank at least one batch (fewer ranks, or more batches)")
    if equal and len(set(counts)) > 1:
        raise InputError(f"{what}: the ranks have different numbers of batches ({counts}); "
                         "DistributedDataParallel needs the same number on every rank (drop the extra batches)")


@contextlib.contextmanager
def scoring(group: Any = None, split: str = "data") -> Iterator[Reducer]:
    """Inside this block every criterion (``gp.score``, ``gp.prune``, planners) sums its
    statistics over the process group (``split="data"``: each rank passes its shard) or shares
    out its ablations (``split="ablations"``: every rank passes the same data). One process:
    nothing changes."""
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    r = GroupReducer(group, split) if _active(group) else Reducer()
    with reducing(r):
        yield r


def score(method: str | Callable, model: torch.nn.Module, dg: DependencyGraph, *, data: Iterable | None = None,
          split: str = "data", group: Any = None, **options: Any) -> dict[int, np.ndarray]:
    """``gp.score`` over the process group: with ``split="data"`` ``data`` is this rank's shard
    and the result, the same on every rank, is the score on the union of the shards.

    >>> import torch, graphprune as gp
    >>> model, x = gp.zoo.create("mlp")
    >>> dg = gp.DependencyGraph.build(model, x)
    >>> sorted(score("magnitude", model, dg)) == sorted(gp.score("magnitude", model, dg))
    True
    """
    if data is not None and split == "data" and _rank_world(group)[1] > 1:
        _check_counts(data, group, "distributed score")
    with scoring(group, split):
        return score_one(method, model, dg, data=data, **options)


def plan_digest(plan: Plan, dg: DependencyGraph | None = None) -> str:
    """SHA-256 of the plan's JSON and, with ``dg``, of the graph's groups (id, size, prunable,
    member slices), so ranks whose graphs differ differ too.

    >>> plan_digest(Plan({0: [1]})) == plan_digest(Plan.from_json('{"0": [1]}'))
    True
    """
    h = hashlib.sha256(Plan(plan).to_json().encode())
    if dg is not None:
        groups = [[g.id, g.size, bool(g.prunable), sorted([m.param, int(m.dim)] for m in g.members)]
                  for g in dg.groups]
        h.update(json.dumps(groups).encode())
    return h.hexdigest()


def check_plan(plan: Plan, dg: DependencyGraph | None = None, *, group: Any = None) -> str:
    """The plan's digest, after checking that every rank holds the same (``plan_digest``);
    raises ``PlanMismatchError`` on every rank, naming the ranks that differ from rank 0."""
    digest = plan_digest(plan, dg)
    digests = _gather(digest, group)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise PlanMismatchError(
            f"ranks {differ} hold a different plan{' or graph' if dg is not None else ''} than rank 0 "
            f"(digests {', '.join(f'rank {r}: {digests[r][:12]}' for r in [0, *differ])}); every rank must "
            "apply the same plan to the same model: take rank 0's with broadcast_plan and build each rank's "
            "graph from the same model and example inputs")
    return digest


def broadcast_plan(plan: Plan | None, src: int = 0, *, group: Any = None) -> Plan:
    """Rank ``src``'s plan on every rank (sent as ``Plan.to_json``); the others pass None."""
    if not _active(group):
        if plan is None:
            raise InputError("broadcast_plan: one process, so the plan must be given")
        return Plan(plan)
    dist = _dist()
    box = [Plan(plan).to_json() if dist.get_rank() == src else None]
    if dist.get_rank() == src and plan is None:
        raise InputError(f"broadcast_plan: rank {src} is the source and must pass a plan")
    dist.broadcast_object_list(box, src=src, group=group)
    return Plan.from_json(box[0])


def plan(model: torch.nn.Module, dg: DependencyGraph, method: str | Callable = "taylor",
         ratio: float | None = None, *, data: Iterable | None = None, loss_fn: Callable | None = None,
         select_options: Mapping[str, Any] | None = None, split: str = "data", src: int = 0,
         group: Any = None, **options: Any) -> Plan:
    """Score on every rank (``score``), select on rank ``src`` (``gp.select(dg, scores, ratio,
    **select_options)``), broadcast the plan and check it (``check_plan``). ``options`` go to
    the criterion. Returns the same plan on every rank."""
    scores = score(method, model, dg, data=data, loss_fn=loss_fn, split=split, group=group, **options)
    rank, _ = _rank_world(group)
    chosen = select(dg, scores, ratio, **dict(select_options or {})) if rank == src else None
    shared = broadcast_plan(chosen, src, group=group)
    check_plan(shared, dg, group=group)
    return shared


def apply(model: torch.nn.Module, dg: DependencyGraph, plan: Plan, *, group: Any = None,
          **options: Any) -> torch.fx.GraphModule:
    """``gp.apply`` after ``check_plan``: every rank slims the same way or none does."""
    check_plan(plan, dg, group=group)
    return apply_one(model, dg, plan, **options)


class SharedPlanner:
    """A planner for ``graphprune.steps.Pruner`` whose plan every rank shares: each rank runs
    ``planner`` inside ``scoring`` (its criterion's collectives need every rank), rank
    ``src``'s plan is broadcast, and ``check_plan`` compares plan and graph across ranks."""

    def __init__(self, planner: Any, *, split: str = "data", src: int = 0, group: Any = None) -> None:
        self.planner, self.split, self.src, self.group = planner, split, src, group

    def plan(self, model: torch.nn.Module, dg: DependencyGraph, step: Step) -> Plan:
        with scoring(self.group, self.split):
            own = self.planner.plan(model, dg, step)
        shared = broadcast_plan(own, self.src, group=self.group)
        step.record["digest"] = check_plan(shared, dg, group=self.group)
        return shared

    def slimmed(self, step: Step) -> None:
        if hasattr(self.planner, "slimmed"):
            self.planner.slimmed(step)

    def settled(self, step: Step) -> None:
        if hasattr(self.planner, "settled"):
            self.planner.settled(step)


def iterative_prune(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    ratio: float,
    steps: int = 2,
    method: str | Callable = "taylor",
    data: Iterable | None = None,
    loss_fn: Callable = F.cross_entropy,
    retrain: Mapping[str, Any] | None = None,
    ignore: Iterable[Any] = (),
    split: str = "data",
    src: int = 0,
    group: Any = None,
    progress: bool = False,
    **options: Any,
) -> PruneResult:
    """``steps`` rounds of distributed score -> shared plan -> slim -> DDP fine-tune, with the
    pruning loop of ``graphprune.steps`` (``Pruner`` with a ``SharedPlanner``); after step
    ``k`` of ``n``, ``ratio * k / n`` of every group's channels is gone.

    ``data`` is this rank's shard; ``retrain`` holds ``graphprune.train.finetune`` keyword
    arguments (``data``: this rank's training shard, the scoring shard by default; ``ddp``
    is on); ``options`` go to the criterion. ``model`` is not modified; every rank returns
    the same slim model.
    """
    check_options(method, options, caller="distributed.iterative_prune")
    if data is not None and split == "data" and _rank_world(group)[1] > 1:
        _check_counts(data, group, "distributed.iterative_prune")
    inner = ScorePlanner(method, ratio, example_inputs, data=data,
                         criterion_options={"loss_fn": loss_fn, **options})
    pruner = Pruner(model, example_inputs, SharedPlanner(inner, split=split, src=src, group=group),
                    steps=steps, ignore=ignore)
    for step in pruner:
        if retrain is not None:
            from graphprune.train.finetune import finetune

            kw = dict(retrain)
            train_data = kw.pop("data", data)
            kw.setdefault("loss_fn", loss_fn)
            kw.setdefault("progress", progress)
            kw.setdefault("ddp", ({"process_group": group} if group is not None else True)
                          if _rank_world(group)[1] > 1 else False)
            if kw["ddp"]:
                _check_counts(train_data, group, "distributed.iterative_prune retrain", equal=True)
            finetune(step.model, train_data, **kw)
    return pruner.result
