"""LEAN: operator-norm channel graph and longest-chain extraction (Schoonhoven et al.).

LEAN ranks *chains* of convolutions rather than filters one by one. Every kernel
``W[j, i]`` of a layer (input channel ``i`` to output channel ``j``) is an edge of a
channel graph, weighted by its operator norm as a convolution (BatchNorm scaling
folded in). The value of a path is the product of its edge weights; LEAN repeatedly
extracts the highest-valued path whose running product stays ``>= 1``, keeps its
kernels, deletes them from the graph and recomputes, until a kernel budget is met;
the budget is then filled with the largest remaining single edges. A channel
survives when a kept kernel enters it and one leaves it.

The pieces, each usable alone:

- ``kernel_operator_norms(weight, stride, n)``: exact per-kernel operator norms of
  periodic convolutions on an ``n``-sized mock image, batched with ``torch.fft``
  (strided kernels through their polyphase split); ``layer_operator_norm`` runs power
  iteration for the zero-padded norm of a whole layer.
- ``ChannelGraph.build(model, dg)``: the layered channel DAG of a traced model.
- ``extract(cg, keep)``: longest-path extraction (``method="lean"``) or a global
  threshold on single edges (``method="individual"``).
- ``plan_from_kernels(dg, cg, extraction)``: surviving channels as a ``gp.Plan``, and
  kernel masks within them.
- ``prune(model, example_inputs, ratio, steps=...)``: the one-shot method behind
  ``gp.prune(method="lean")`` and LEAN's geometric schedule with retraining.

>>> import torch, graphprune as gp
>>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
...                             torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(),
...                             torch.nn.Conv2d(4, 2, 1))
>>> dg = gp.DependencyGraph.build(model, torch.randn(1, 1, 8, 8))
>>> cg = ChannelGraph.build(model, dg)  # the output layer is left out by default
>>> cg.n_kernels
20
>>> ext = extract(cg, keep=10)
>>> ext.n_kept
10
>>> lp = plan_from_kernels(dg, cg, ext)
>>> lp.kept_kernels <= 10
True
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from graphprune.errors import InputError
from graphprune.graph import DependencyGraph
from graphprune.plan import Plan, StepPlans, check_schedule
from graphprune.tracing import named_state

if TYPE_CHECKING:
    from graphprune.api import PruneResult

__all__ = [
    "kernel_operator_norms", "kernel_l1_norms", "layer_operator_norm", "Block", "ChannelGraph",
    "Extraction", "extract", "LeanPlan", "plan_from_kernels", "slim_kernel_masks",
    "apply_kernel_masks", "KernelMasker", "geometric_keep", "lean_plan", "prune", "CRITERIA",
]

CRITERIA = ("lean", "opnorm", "l1")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_F_CONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CAT = (torch.cat, torch.concat)


# --------------------------------------------------------------------------------------
# Operator norms
# --------------------------------------------------------------------------------------
def _ntuple(value: int | Sequence[int], d: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * d
    value = tuple(int(v) for v in value)
    return value if len(value) == d else (value[0],) * d


@torch.no_grad()
def kernel_operator_norms(
    weight: torch.Tensor,
    stride: int | Sequence[int] = 1,
    n: int = 32,
    *,
    method: str = "autocorr",
    chunk_bytes: int = 1 << 25,
) -> torch.Tensor:
    """Operator norm of every single-input single-output kernel of a layer weight.

    ``weight`` is ``[out, in, *kernel]`` (a conv weight; ``[out, in]`` for Linear). Each
    kernel ``W[j, i]`` is taken as a periodic convolution (cross-correlation) on an
    ``n``-sized mock image per spatial axis; its operator norm is ``max |FFT(W[j, i]
    zero-padded to n)|``. With stride ``s`` the kernel is split into its ``s^d``
    polyphase sub-kernels, transformed at ``n / s``, and the norm is ``max over
    frequencies of sqrt(sum_p |F_p|^2)``. 1x1 kernels and Linear entries give ``|w|``.
    ``n`` is raised where a kernel would not fit (per axis, ``n / s`` is rounded up).

    ``method="fft"`` evaluates exactly that with ``torch.fft``; ``"autocorr"`` (default,
    same values, about 10x faster for small kernels) uses ``sum_p |F_p(w)|^2 =
    sum_l R[l] cos(w . l)`` with ``R`` the summed autocorrelation of the sub-kernels,
    one small matrix product per chunk of kernels. Returns ``[out, in]`` in the weight's
    floating dtype (at least float32).

    >>> w = torch.zeros(1, 1, 3, 3); w[0, 0, 1, 1] = -2.0
    >>> kernel_operator_norms(w).item()
    2.0
    """
    if method not in ("autocorr", "fft"):
        raise InputError(f"method must be 'autocorr' or 'fft', got {method!r}")
    w = weight.detach()
    if not w.is_floating_point() or w.dtype in (torch.float16, torch.bfloat16):
        w = w.float()
    d = w.dim() - 2
    if d <= 0:
        return w.abs()
    ks = tuple(w.shape[2:])
    s = _ntuple(stride, d)
    if all(k == 1 for k in ks):
        return w.abs().reshape(w.shape[:2])
    kq = [-(-k // si) for k, si in zip(ks, s)]  # sub-kernel size per axis
    m = [max(-(-int(n) // si), q) for q, si in zip(kq, s)]  # transform size per phase
    pad: list[int] = []
    for k, q, si in reversed(list(zip(ks, kq, s))):
        pad += [0, q * si - k]
    out_c, in_c = w.shape[:2]
    # polyphase sub-kernels: [O, I, q1, s1, q2, s2, ...] -> [O * I, s1 * s2 ..., q1, q2, ...]
    perm = [0, 1] + [3 + 2 * a for a in range(d)] + [2 + 2 * a for a in range(d)]
    shape = [out_c, in_c] + [v for q, si in zip(kq, s) for v in (q, si)]
    sub = (F.pad(w, pad) if any(pad) else w).reshape(shape).permute(perm)
    sub = sub.reshape(out_c * in_c, math.prod(s), *kq)
    dims = tuple(range(-d, 0))
    n_freq = math.prod(m[:-1]) * (m[-1] // 2 + 1)
    rows = max(1, int(chunk_bytes // (8 * n_freq * (math.prod(s) if method == "fft" else 1))))
    out = torch.empty(out_c * in_c, dtype=w.dtype, device=w.device)
    if method == "fft":
        for lo in range(0, len(sub), rows):
            spec = torch.fft.rfftn(sub[lo:lo + rows], s=m, dim=dims)
            power = torch.view_as_real(spec).square().sum(-1).sum(1)
            out[lo:lo + rows] = power.flatten(1).amax(1)
        return out.sqrt().reshape(out_c, in_c)
    # lags l with R[l] = R[-l]: keep l = 0 (weight 1) and those whose first nonzero entry is > 0 (weight 2)
    lags = [lag for lag in itertools.product(*[range(-(q - 1), q) for q in kq])
            if not any(lag) or next(v for v in lag if v) > 0]
    weight_of = torch.tensor([1.0 if not any(lag) else 2.0 for lag in lags], dtype=torch.float64)
    freqs = torch.tensor(list(itertools.product(*[range(v) for v in m[:-1]], range(m[-1] // 2 + 1))),
                         dtype=torch.float64).reshape(-1, d) / torch.tensor(m, dtype=torch.float64)
    lag_t = torch.tensor(lags, dtype=torch.float64).reshape(-1, d)
    cos = (weight_of[:, None] * torch.cos(2 * math.pi * lag_t @ freqs.T)).to(w.dtype).to(w.device)
    # R[l] = sum_p sum_u k_p[u] k_p[u + l]: outer products of the kernels, gathered per lag
    n_sub = math.prod(kq)
    pos = list(itertools.product(*[range(q) for q in kq]))
    lag_index = {lag: i for i, lag in enumerate(lags)}
    gather = torch.zeros(n_sub * n_sub, len(lags), dtype=w.dtype)
    for a, ua in enumerate(pos):
        for b, ub in enumerate(pos):
            i = lag_index.get(tuple(vb - va for va, vb in zip(ua, ub)))
            if i is not None:
                gather[a * n_sub + b, i] = 1.0
    gather = gather.to(w.device)
    for lo in range(0, len(sub), rows):
        x = sub[lo:lo + rows].reshape(-1, sub.shape[1], n_sub)
        if x.shape[1] == 1:
            outer = (x[:, 0, :, None] * x[:, 0, None, :]).reshape(len(x), -1)
        else:
            outer = (x[..., :, None] * x[..., None, :]).sum(1).reshape(len(x), -1)
        out[lo:lo + rows] = ((outer @ gather) @ cos).amax(1)
    return out.clamp_min(0).sqrt().reshape(out_c, in_c)


@torch.no_grad()
def kernel_l1_norms(weight: torch.Tensor) -> torch.Tensor:
    """L1 norm of every kernel ``W[j, i]`` of a conv or Linear weight: ``[out, in]``."""
    w = weight.detach().float() if not weight.is_floating_point() else weight.detach()
    return w.abs().reshape(w.shape[0], w.shape[1], -1).sum(2)


def layer_operator_norm(
    layer: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    input_shape: Sequence[int],
    *,
    iters: int = 500,
    tol: float = 1e-9,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> float:
    """Operator (spectral) norm of an affine layer's linear part, by power iteration.

    ``layer`` maps a tensor of ``input_shape`` (batch included, usually 1) to a tensor;
    its bias is removed by subtracting ``layer(0)``. With a zero-padded conv this is the
    exact norm of the whole layer as it runs (padding, stride, dilation, groups), not the
    periodic per-kernel bound. Iterates ``x <- A^T A x`` through autograd until the
    estimate changes by less than ``tol`` (relative).
    """
    params = [p for p in (layer.parameters() if isinstance(layer, nn.Module) else ())]
    if dtype is None:
        dtype = params[0].dtype if params else torch.float32
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(input_shape), generator=gen, dtype=dtype)
    x /= x.norm()
    with torch.no_grad():
        y0 = layer(torch.zeros_like(x))
    sigma = 0.0
    for _ in range(iters):
        x = x.detach().requires_grad_(True)
        y = layer(x) - y0
        (g,) = torch.autograd.grad(y, x, y.detach())
        g = g.detach()
        norm = float(g.norm())
        if norm == 0.0:
            return 0.0
        new = math.sqrt(norm)
        x = g / norm
        if abs(new - sigma) <= tol * max(new, 1e-30):
            return new
        sigma = new
    return sigma


# --------------------------------------------------------------------------------------
# The channel graph
# --------------------------------------------------------------------------------------
@dataclass
class Block:
    """Edges into one layer's output channels: row ``j`` has ``K`` candidate in-edges.

    ``dst[j]`` is the graph node of output channel ``j``; ``src`` (``[K]`` shared by all
    rows, or ``[rows, K]``) the graph nodes its in-edges come from; ``logw[j, k]`` the
    log edge weight (``-inf``: no edge). ``kernel`` blocks are a layer's kernels (counted
    in the budget, removable); the others are fixed edges (identity merges of a residual
    add, BatchNorm scalings that could not be folded). ``param`` names the weight whose
    ``[:2]`` entries the kernel edges are (``transposed``: stored as ``W[i, j]``).
    """

    dst: np.ndarray
    src: np.ndarray
    logw: np.ndarray
    kernel: bool
    name: str
    param: str | None = None
    transposed: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return self.logw.shape

    def src_at(self, rows: np.ndarray | slice, cols: np.ndarray) -> np.ndarray:
        """Source nodes of edges ``(rows[i], cols[i])``."""
        if self.src.ndim == 1:
            return self.src[cols]
        return self.src[rows, cols]

    def src_matrix(self) -> np.ndarray:
        """``[rows, K]`` source nodes."""
        if self.src.ndim == 2:
            return self.src
        return np.broadcast_to(self.src, self.logw.shape)


class ChannelGraph:
    """The layered channel DAG LEAN extracts chains from.

    A graph node is one channel at one point of the network: every layer output channel
    is a node, model-input channels are sources. Coupled channels (a residual add joins
    two branches channel by channel) form one *channel class* of the dependency graph,
    the unit a plan keeps or removes; where several layers write into the same class
    (the add), each write gets its own node, joined by fixed identity edges, so the
    graph stays acyclic and skips cost nothing. Concatenation maps positions onto their
    sources; pooling, upsampling, activations, BatchNorm and other channel-wise ops add
    no node at all. Grouped and depthwise convs have only their within-group edges.

    ``node_class[v]`` is the dependency graph's channel class of node ``v`` (``-1`` for
    channels that are not channels of the graph, such as model inputs);
    ``node_key`` is the class, or a negative id for those; ``node_layer`` the traced node
    that wrote it; ``node_sink`` marks channels read by the model output or by ops the
    graph does not model (they always count as used). ``blocks`` are in topological
    order.
    """

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self._key: list[np.ndarray] = []
        self._layer: list[str] = []
        self._layer_of: list[np.ndarray] = []
        self.n_nodes = 0
        self.writer_block = np.zeros(0, np.int64)
        self.writer_row = np.zeros(0, np.int64)
        self.node_key = np.zeros(0, np.int64)
        self.node_class = np.zeros(0, np.int64)
        self.node_sink = np.zeros(0, bool)
        self.node_layer: list[str] = []
        self.criterion = "lean"
        self.n = 32

    # --- construction helpers ------------------------------------------------------
    def _new_nodes(self, keys: np.ndarray, layer: str) -> np.ndarray:
        ids = np.arange(self.n_nodes, self.n_nodes + len(keys), dtype=np.int64)
        self.n_nodes += len(keys)
        self._key.append(np.asarray(keys, np.int64))
        self._layer.append(layer)
        self._layer_of.append(np.full(len(keys), len(self._layer) - 1, np.int64))
        return ids

    def _finish(self, sinks: list[np.ndarray]) -> None:
        n = self.n_nodes
        self.node_key = np.concatenate(self._key) if self._key else np.zeros(0, np.int64)
        self.node_class = np.where(self.node_key >= 0, self.node_key, -1)
        layer_idx = np.concatenate(self._layer_of) if self._layer_of else np.zeros(0, np.int64)
        self.node_layer = [self._layer[i] for i in layer_idx]
        self.writer_block = np.full(n, -1, np.int64)
        self.writer_row = np.full(n, -1, np.int64)
        for b, blk in enumerate(self.blocks):
            if self.writer_block[blk.dst].max(initial=-1) >= 0:
                raise AssertionError("a channel node has two writers")
            self.writer_block[blk.dst] = b
            self.writer_row[blk.dst] = np.arange(len(blk.dst))
        self.node_sink = np.zeros(n, bool)
        for s in sinks:
            self.node_sink[s] = True
        self.kernel_blocks = [b for b, blk in enumerate(self.blocks) if blk.kernel]

    # --- building ---------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: nn.Module,
        dg: DependencyGraph,
        *,
        criterion: str = "lean",
        n: int = 32,
        fold_bn: bool | None = None,
        exclude: Iterable[str] | None = None,
    ) -> ChannelGraph:
        """The channel graph of ``model`` (traced as ``dg``), with edge weights.

        ``criterion``: ``"lean"`` or ``"opnorm"`` weight kernels by their operator norm
        (mock image size ``n``) with BatchNorm folded in (``|gamma_j| /
        sqrt(running_var_j + eps)`` multiplies every edge into channel ``j``);
        ``"l1"`` by the kernel's L1 norm, without BatchNorm unless ``fold_bn=True``.
        ``exclude`` names layers (module names or traced node names) left out of the
        graph: their kernels are neither weighed nor pruned, and the channels they read
        count as used. By default (``None``) the layers whose output channels cannot be
        pruned are left out -- the output layer, as LEAN's MS-D experiment leaves out the
        final 1x1 layer; otherwise a budget filled by the largest single kernels tends to
        drop every kernel of a small output layer and with it the whole network.
        """
        if criterion not in CRITERIA:
            raise InputError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"n (mock image size) must be a positive int, got {n!r}")
        dg.check_model(model)
        fold = criterion != "l1" if fold_bn is None else bool(fold_bn)
        cg = cls()
        cg.criterion, cg.n = criterion, n
        _Builder(cg, model, dg, criterion, n, fold, None if exclude is None else set(exclude)).run()
        return cg

    # --- inspection --------------------------------------------------------------------
    @property
    def n_kernels(self) -> int:
        """Number of kernel edges with a nonzero weight (the budget's unit)."""
        return int(sum(np.isfinite(self.blocks[b].logw).sum() for b in self.kernel_blocks))

    @property
    def n_edges(self) -> int:
        """All edges: kernels and fixed edges."""
        return int(sum(np.isfinite(b.logw).sum() for b in self.blocks))

    def edges(self, kernel_only: bool = False) -> dict[str, np.ndarray]:
        """All edges as flat arrays: ``src``, ``dst``, ``weight``, ``kernel``, ``block``, ``row``, ``col``."""
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("src", "dst", "weight", "kernel", "block",
                                                               "row", "col")}
        for b, blk in enumerate(self.blocks):
            if kernel_only and not blk.kernel:
                continue
            rows, cols = np.nonzero(np.isfinite(blk.logw))
            parts["src"].append(blk.src_at(rows, cols))
            parts["dst"].append(blk.dst[rows])
            parts["weight"].append(np.exp(blk.logw[rows, cols].astype(np.float64)))
            parts["kernel"].append(np.full(len(rows), blk.kernel))
            parts["block"].append(np.full(len(rows), b))
            parts["row"].append(rows)
            parts["col"].append(cols)
        return {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}

    def to_networkx(self, dg: DependencyGraph | None = None):
        """A ``networkx.MultiDiGraph``: one node per channel node, one edge per kernel or fixed edge.

        Node attributes: ``cls`` (channel class), ``layer``, ``sink``, and with ``dg``
        ``group``/``channel``; edge attributes ``weight`` (the operator norm, not its log),
        ``kernel``, ``layer``, ``param``, ``index`` (``(row, col)`` in the block).
        """
        import networkx as nx

        g = nx.MultiDiGraph()
        for v in range(self.n_nodes):
            attrs = {"cls": int(self.node_class[v]), "layer": self.node_layer[v], "sink": bool(self.node_sink[v])}
            if dg is not None and self.node_class[v] >= 0:
                attrs["group"] = int(dg.group_of_cls[self.node_class[v]])
                attrs["channel"] = int(dg.chan_of_cls[self.node_class[v]])
            g.add_node(v, **attrs)
        e = self.edges()
        for i in range(len(e["src"])):
            blk = self.blocks[int(e["block"][i])]
            g.add_edge(int(e["src"][i]), int(e["dst"][i]), weight=float(e["weight"][i]),
                       kernel=bool(e["kernel"][i]), layer=blk.name, param=blk.param,
                       index=(int(e["row"][i]), int(e["col"][i])))
        return g

    def __repr__(self) -> str:
        return (f"ChannelGraph({self.n_nodes} nodes, {self.n_kernels} kernel edges, "
                f"{self.n_edges - self.n_kernels} fixed edges, {len(self.blocks)} blocks)")


def _arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class _Builder:
    """Walks the traced graph once and builds the channel graph's nodes and blocks."""

    def __init__(self, cg: ChannelGraph, model: nn.Module, dg: DependencyGraph, criterion: str, n: int,
                 fold: bool, exclude: set[str]) -> None:
        self.cg, self.dg, self.criterion, self.n, self.fold = cg, dg, criterion, n, fold
        self.exclude = exclude
        self.modules = dict(dg.gm.named_modules())
        self.state = named_state(dg.gm)
        self.chan: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # fx node -> (keys, graph nodes)
        self.pool: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # non-channel outputs: lookup only
        self.block_of: dict[str, int] = {}  # fx node -> its kernel block
        self.sinks: list[np.ndarray] = []
        self.next_key = -2  # synthetic keys for channels that are not classes

    def fresh_keys(self, size: int) -> np.ndarray:
        keys = np.arange(self.next_key, self.next_key - size, -1, dtype=np.int64)
        self.next_key -= size
        return keys

    def run(self) -> None:
        for node in self.dg.gm.graph.nodes:
            if node.op == "placeholder":
                c = self.channels(node)
                if c is not None:
                    keys = self.fresh_keys(c)
                    self.chan[node.name] = (keys, self.cg._new_nodes(keys, node.name))
            elif node.op == "get_attr":
                continue
            elif node.op == "output":
                self.sink_inputs(node)
            else:
                self.visit(node)
        self.cg._finish(self.sinks)

    # --- helpers -------------------------------------------------------------------------
    def channels(self, node: torch.fx.Node) -> int | None:
        shape = node.meta.get("shape")
        if isinstance(shape, torch.Size) and len(shape) >= 2:
            return int(shape[1])
        return None

    def out_keys(self, node: torch.fx.Node, size: int) -> np.ndarray:
        labels = self.dg.node_labels.get(node.name)
        lab = labels[1] if type(labels) is tuple and len(labels) > 1 else None
        if not isinstance(lab, np.ndarray) or len(lab) != size:
            return self.fresh_keys(size)
        keys = self.dg.cls[lab].astype(np.int64)
        unl = lab < 0
        if unl.any():
            keys[unl] = self.fresh_keys(int(unl.sum()))
        return keys

    def inputs(self, node: torch.fx.Node) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for a in node.all_input_nodes:
            if a.name in self.chan:
                out.append(self.chan[a.name])
            elif a.name in self.pool:
                out.append(self.pool[a.name])
        return out

    def sink_inputs(self, node: torch.fx.Node) -> None:
        for _, nodes in self.inputs(node):
            self.sinks.append(nodes)

    def excluded(self, node: torch.fx.Node) -> bool:
        if self.exclude is None:  # output layers: no output channel in a prunable group
            labels = self.dg.node_labels.get(node.name)
            lab = labels[1] if type(labels) is tuple and len(labels) > 1 else None
            if not isinstance(lab, np.ndarray):
                return False
            keys = self.dg.cls[lab[lab >= 0]]
            gids = self.dg.group_of_cls[keys]
            return bool(len(keys)) and not any(g >= 0 and self.dg.groups[g].prunable for g in gids.tolist())
        return node.name in self.exclude or (node.op == "call_module" and (
            node.target in self.exclude or any(node.target.startswith(e + ".") for e in self.exclude)))

    # --- the walk ------------------------------------------------------------------------
    def visit(self, node: torch.fx.Node) -> None:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if self.weighted(node, module, dry=True) and not self.excluded(node) and self.weighted(node, module):
            return
        if isinstance(module, _BN) and self.batch_norm(node, module):
            return
        self.generic(node)

    def weighted(self, node: torch.fx.Node, module: nn.Module | None, dry: bool = False) -> bool:
        """A conv / linear layer: fresh output nodes and one kernel block. False if unsupported.

        ``dry``: only say whether the node is a supported layer."""
        x = node.args[0] if node.args else None
        if not isinstance(x, torch.fx.Node) or x.name not in self.chan:
            return False
        transposed, groups, stride = False, 1, 1
        if isinstance(module, _CONV):
            weight, param = module.weight, f"{node.target}.weight"
            groups, stride = module.groups, module.stride
        elif isinstance(module, _CONV_T):
            if module.groups != 1:
                return False
            weight, param = module.weight, f"{node.target}.weight"
            transposed, stride = True, module.stride
        elif isinstance(module, nn.Linear):
            weight, param = module.weight, f"{node.target}.weight"
        elif node.op == "call_function" and (node.target in _F_CONV or node.target is F.linear):
            w_node = _arg(node, 1, "weight")
            if not isinstance(w_node, torch.fx.Node) or w_node.op != "get_attr" or w_node.target not in self.state:
                return False
            weight, param = self.state[w_node.target], w_node.target
            if node.target in _F_CONV:
                stride, groups = _arg(node, 3, "stride", 1), _arg(node, 6, "groups", 1)
        else:
            return False
        in_keys, in_nodes = self.chan[x.name]
        c_out = self.channels(node)
        if c_out is None or (weight.dim() == 2 and len(x.meta.get("shape", ())) != 2):
            return False  # Linear over a non-feature axis (tokens): not modelled
        w = weight.detach()
        if transposed:
            w = w.transpose(0, 1)
        o, k = int(w.shape[0]), int(w.shape[1])
        if o != c_out or k * groups != len(in_nodes):
            return False
        if dry:
            return True
        if self.criterion == "l1":
            norms = kernel_l1_norms(w)
        else:
            norms = kernel_operator_norms(w, stride, self.n)  # a transposed conv: the adjoint's norm
        logw = torch.log(norms.float()).cpu().numpy()
        if groups == 1:
            src = in_nodes.copy()
        else:
            opg, ipg = o // groups, k
            src = in_nodes[(np.arange(o) // opg)[:, None] * ipg + np.arange(ipg)[None, :]]
        keys = self.out_keys(node, o)
        dst = self.cg._new_nodes(keys, node.name)
        self.block_of[node.name] = len(self.cg.blocks)
        self.cg.blocks.append(Block(dst, src, logw, True, node.name, param, transposed))
        self.chan[node.name] = (keys, dst)
        return True

    def batch_norm(self, node: torch.fx.Node, module: nn.Module) -> bool:
        x = node.args[0]
        if not isinstance(x, torch.fx.Node) or x.name not in self.chan:
            return False
        keys, nodes = self.chan[x.name]
        if not self.fold or module.running_var is None or not module.track_running_stats:
            self.chan[node.name] = (keys, nodes)
            return True
        with torch.no_grad():
            f = 1.0 / torch.sqrt(module.running_var.double() + module.eps)
            if module.weight is not None:
                f = f * module.weight.detach().double().abs()
        with np.errstate(divide="ignore"):
            logf = np.log(f.cpu().numpy()).astype(np.float32)
        if len(logf) != len(nodes):
            return False
        b = self.block_of.get(x.name)
        if b is not None and len(x.users) == 1 and np.array_equal(self.cg.blocks[b].dst, nodes):
            self.cg.blocks[b].logw += logf[:, None]  # fold into the conv's edges
            self.chan[node.name] = (keys, nodes)
            return True
        dst = self.cg._new_nodes(keys, node.name)  # a fixed scaling edge per channel
        self.cg.blocks.append(Block(dst, nodes[:, None].copy(), logf[:, None].copy(), False, node.name))
        self.chan[node.name] = (keys, dst)
        return True

    def generic(self, node: torch.fx.Node) -> None:
        """Channel-wise ops: output channels are input channels of the same class."""
        ins = self.inputs(node)
        c = self.channels(node)
        shape = node.meta.get("shape")
        if c is None:
            if ins:  # tuples (chunk, split) and the like: their getitems look channels up here
                self.pool[node.name] = (np.concatenate([k for k, _ in ins]), np.concatenate([v for _, v in ins]))
            if isinstance(shape, torch.Size):
                self.sink_inputs(node)  # a tensor of < 2 dims: the channels leave the graph here
            return
        if node.op == "call_function" and node.target in _CAT:
            parts = _arg(node, 0, "tensors")
            dim = _arg(node, 1, "dim", 0)
            ndim = len(shape)
            if isinstance(parts, (list, tuple)) and dim in (1, 1 - ndim) and all(
                    isinstance(p, torch.fx.Node) and p.name in self.chan for p in parts):
                keys = np.concatenate([self.chan[p.name][0] for p in parts])
                nodes = np.concatenate([self.chan[p.name][1] for p in parts])
                if len(keys) == c:
                    self.chan[node.name] = (keys, nodes)
                    return
        keys = self.out_keys(node, c)
        first = node.args[0] if node.args else None
        if isinstance(first, torch.fx.Node) and first.name in self.chan and len(self.chan[first.name][0]) == c:
            fk = self.chan[first.name][0]
            unl = (keys < 0) & (fk < 0)  # unlabelled channels pass through positionally
            keys[unl] = fk[unl]
        table: dict[int, list[int]] = {}
        for k_arr, v_arr in ins:
            for k, v in zip(k_arr.tolist(), v_arr.tolist()):
                lst = table.setdefault(k, [])
                if v not in lst:
                    lst.append(v)
        nodes = np.empty(c, np.int64)
        merges: dict[int, int] = {}
        fresh_pos, merge_in = [], []
        opaque = False
        for p, k in enumerate(keys.tolist()):
            found = table.get(k)
            if found is None:
                fresh_pos.append(p)
                opaque = True
            elif len(found) == 1:
                nodes[p] = found[0]
            else:
                if k not in merges:
                    merges[k] = len(merge_in)
                    merge_in.append(found)
                nodes[p] = -1 - merges[k]
        if fresh_pos:
            nodes[fresh_pos] = self.cg._new_nodes(keys[fresh_pos], node.name)
        if merge_in:
            mkeys = np.array(list(merges), np.int64)
            dst = self.cg._new_nodes(mkeys, node.name)
            width = max(len(f) for f in merge_in)
            src = np.array([f + [f[0]] * (width - len(f)) for f in merge_in], np.int64)
            logw = np.array([[0.0] * len(f) + [-np.inf] * (width - len(f)) for f in merge_in], np.float32)
            self.cg.blocks.append(Block(dst, src, logw, False, node.name))
            neg = nodes < 0
            nodes[neg] = dst[-1 - nodes[neg]]
        if opaque:
            self.sink_inputs(node)
        self.chan[node.name] = (keys, nodes)


# --------------------------------------------------------------------------------------
# Longest-path extraction
# --------------------------------------------------------------------------------------
@dataclass
class Extraction:
    """Which kernel edges were kept: ``kept[b]`` is a bool ``[rows, K]`` per kernel block ``b``."""

    kept: dict[int, np.ndarray]
    budget: int
    n_kernels: int
    n_paths: int = 0
    path_kernels: int = 0
    filled: int = 0
    path_values: list[float] = field(default_factory=list)
    seconds: float = 0.0
    method: str = "lean"

    @property
    def n_kept(self) -> int:
        return int(sum(int(k.sum()) for k in self.kept.values()))


class _LongestPaths:
    """Max-plus DP over the layered graph, kept up to date as edges are deleted.

    ``B[v]``: the best log-value of a path ending at ``v`` that contains a kernel edge,
    where a chain may restart at any node: a kernel edge ``u -> v`` extends
    ``max(B[u], 0)``, a fixed edge extends ``B[u]`` (so no path of only fixed edges
    counts).
    """

    def __init__(self, cg: ChannelGraph) -> None:
        self.cg = cg
        self.w = [blk.logw.copy() for blk in cg.blocks]
        self.arg = [np.zeros(len(blk.dst), np.int64) for blk in cg.blocks]
        self.second = [np.full(len(blk.dst), -np.inf) for blk in cg.blocks]
        self.B = np.full(cg.n_nodes, -np.inf)
        # node -> consumer blocks (CSR)
        pairs_n, pairs_b = [], []
        for b, blk in enumerate(cg.blocks):
            u = np.unique(blk.src)
            pairs_n.append(u)
            pairs_b.append(np.full(len(u), b, np.int64))
        if pairs_n:
            nn_ = np.concatenate(pairs_n)
            bb = np.concatenate(pairs_b)
            order = np.argsort(nn_, kind="stable")
            self.cons = bb[order]
            self.cons_ptr = np.searchsorted(nn_[order], np.arange(cg.n_nodes + 1))
        else:
            self.cons = np.zeros(0, np.int64)
            self.cons_ptr = np.zeros(cg.n_nodes + 1, np.int64)
        self.dirty = np.zeros(cg.n_nodes, bool)
        for b in range(len(cg.blocks)):
            self._recompute(b, np.arange(len(cg.blocks[b].dst)))

    def _recompute(self, b: int, rows: np.ndarray) -> np.ndarray:
        """Full max over the rows' in-edges; also refreshes each row's second-best bound."""
        blk = self.cg.blocks[b]
        vals = self.B[blk.src if blk.src.ndim == 1 else blk.src[rows]]
        if blk.kernel:
            vals = np.maximum(vals, 0.0)
        cand = self.w[b][rows] + vals
        r = np.arange(len(rows))
        am = cand.argmax(1)
        best = cand[r, am]
        if cand.shape[1] > 1:
            cand[r, am] = -np.inf
            self.second[b][rows] = cand.max(1)
        self.arg[b][rows] = am
        return self._store(blk.dst[rows], best)

    def _store(self, nodes: np.ndarray, best: np.ndarray) -> np.ndarray:
        changed = nodes[best != self.B[nodes]]
        self.B[nodes] = best
        return changed

    def _refresh(self, b: int, rows: np.ndarray) -> np.ndarray:
        """Rows whose best in-edge's source changed: O(1) each while that edge stays best.

        Values only decrease, so ``second`` (the runner-up at the last full recompute)
        bounds every other in-edge from above; a row whose argmax edge still reaches it
        keeps that argmax, the others get a full recompute.
        """
        blk = self.cg.blocks[b]
        k = self.arg[b][rows]
        src = blk.src[k] if blk.src.ndim == 1 else blk.src[rows, k]
        vals = self.B[src]
        if blk.kernel:
            vals = np.maximum(vals, 0.0)
        cand = self.w[b][rows, k] + vals
        ok = cand >= self.second[b][rows]
        changed = [self._store(blk.dst[rows[ok]], cand[ok])]
        if not ok.all():
            changed.append(self._recompute(b, rows[~ok]))
        return np.concatenate(changed)

    def _consumers(self, nodes: np.ndarray) -> np.ndarray:
        lo, hi = self.cons_ptr[nodes], self.cons_ptr[nodes + 1]
        lens = hi - lo
        if not lens.sum():
            return np.zeros(0, np.int64)
        idx = np.repeat(lo - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())
        return np.unique(self.cons[idx])

    def delete(self, edges: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> None:
        """Delete kernel edges ``{block: (rows, cols)}`` and update the DP downstream."""
        explicit: dict[int, np.ndarray] = {}
        for b, (rows, cols) in edges.items():
            self.w[b][rows, cols] = -np.inf
            explicit[b] = np.unique(rows)
        heap = list(explicit)
        heapq.heapify(heap)
        queued = set(heap)
        touched: list[np.ndarray] = []
        while heap:
            b = heapq.heappop(heap)
            queued.discard(b)
            blk = self.cg.blocks[b]
            arg = self.arg[b]
            srcs = blk.src[arg] if blk.src.ndim == 1 else blk.src[np.arange(len(arg)), arg]
            rows = np.flatnonzero(self.dirty[srcs])
            full = explicit.pop(b, None)
            if full is not None:
                rows = np.setdiff1d(rows, full)
            parts = []
            if len(rows):
                parts.append(self._refresh(b, rows))
            if full is not None:
                parts.append(self._recompute(b, full))
            if not parts:
                continue
            changed = np.concatenate(parts)
            if len(changed):
                self.dirty[changed] = True
                touched.append(changed)
                for c in self._consumers(changed).tolist():
                    if c not in queued:
                        queued.add(c)
                        heapq.heappush(heap, c)
        for t in touched:
            self.dirty[t] = False

    def chain(self, v: int) -> list[tuple[int, int, int]]:
        """The kernel edges ``(block, row, col)`` of the best chain ending at node ``v``."""
        path: list[tuple[int, int, int]] = []
        for _ in range(self.cg.n_nodes + 1):
            b = int(self.cg.writer_block[v])
            if b < 0:
                break
            j = int(self.cg.writer_row[v])
            k = int(self.arg[b][j])
            blk = self.cg.blocks[b]
            u = int(blk.src[k] if blk.src.ndim == 1 else blk.src[j, k])
            if blk.kernel:
                path.append((b, j, k))
                if not self.B[u] > 0:
                    break
            v = u
        return path

    def best_path(self) -> tuple[float, list[tuple[int, int, int]]]:
        """The highest-valued chain (log value >= 0) and its kernel edges; ``[]`` if none."""
        if not len(self.B):
            return -math.inf, []
        v = int(np.argmax(self.B))
        return (float(self.B[v]), self.chain(v)) if self.B[v] >= 0 else (-math.inf, [])


def extract(
    cg: ChannelGraph,
    keep: float | int,
    *,
    method: str = "lean",
    max_paths: int | None = None,
    progress: bool = False,
) -> Extraction:
    """Choose the kernels to keep: ``keep`` is a fraction of the graph's kernels or a count.

    ``method="lean"`` extracts longest chains (highest product of edge weights, running
    product ``>= 1``) one at a time, keeping their kernels and deleting them from the
    graph, until the budget is met or no chain ``>= 1`` is left, then fills the budget
    with the largest remaining single edges. ``method="individual"`` only does the
    latter (a global threshold on single-kernel scores). Fixed edges are never counted
    in the budget nor deleted; a chain always contains a kernel. ``max_paths`` caps the
    number of chains (the rest is filled by single edges).
    """
    t0 = time.perf_counter()
    if method not in ("lean", "individual"):
        raise InputError(f"method must be 'lean' or 'individual', got {method!r}")
    total = cg.n_kernels
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.integer, np.floating)):
        raise InputError(f"keep must be a fraction in [0, 1] or a kernel count, got {keep!r}")
    if isinstance(keep, (float, np.floating)):
        if not 0 <= keep <= 1:
            raise InputError(f"keep as a fraction must lie in [0, 1], got {keep!r}")
        budget = int(round(float(keep) * total))
    else:
        if keep < 0:
            raise InputError(f"keep as a count must be >= 0, got {keep!r}")
        budget = int(keep)
    budget = min(budget, total)
    kept = {b: np.zeros(cg.blocks[b].logw.shape, bool) for b in cg.kernel_blocks}
    ext = Extraction(kept, budget, total, method=method)
    n_kept = 0
    if method == "lean" and budget > 0:
        from tqdm.auto import tqdm

        dp = _LongestPaths(cg)
        bar = tqdm(total=budget, desc="LEAN chains", disable=not progress, leave=False)
        while n_kept < budget and (max_paths is None or ext.n_paths < max_paths):
            value, path = dp.best_path()
            if not path:
                break
            if len(path) > budget - n_kept:  # the last chain: its strongest kernels
                path = sorted(path, key=lambda e: -dp.w[e[0]][e[1], e[2]])[:budget - n_kept]
            by_block: dict[int, tuple[list[int], list[int]]] = {}
            for b, j, k in path:
                kept[b][j, k] = True
                by_block.setdefault(b, ([], []))
                by_block[b][0].append(j)
                by_block[b][1].append(k)
            n_kept += len(path)
            ext.n_paths += 1
            ext.path_values.append(value)
            bar.update(len(path))
            dp.delete({b: (np.array(r), np.array(c)) for b, (r, c) in by_block.items()})
        bar.close()
        ext.path_kernels = n_kept
    if n_kept < budget:  # the largest remaining single edges
        flat = [np.where(kept[b], -np.inf, cg.blocks[b].logw).ravel() for b in cg.kernel_blocks]
        allw = np.concatenate(flat) if flat else np.zeros(0, np.float32)
        take = budget - n_kept
        idx = np.argpartition(-allw, take - 1)[:take] if take < len(allw) else np.arange(len(allw))
        idx = idx[np.isfinite(allw[idx])]
        offsets = np.cumsum([0] + [f.size for f in flat])
        for i, b in enumerate(cg.kernel_blocks):
            sel = idx[(idx >= offsets[i]) & (idx < offsets[i + 1])] - offsets[i]
            kept[b].ravel()[sel] = True
        ext.filled = len(idx)
    ext.seconds = time.perf_counter() - t0
    return ext


# --------------------------------------------------------------------------------------
# From kept kernels to a plan
# --------------------------------------------------------------------------------------
@dataclass
class LeanPlan:
    """Surviving channels as a ``Plan``, plus kernel masks and counts.

    ``kernel_masks[param]`` is a bool tensor over ``weight.shape[:2]`` (original model's
    indexing) of the kernels kept inside surviving channels. ``extra_sparsity`` is the
    fraction of kernels between surviving channels that the masks drop on top of the
    channel removal.
    """

    plan: Plan
    kernel_masks: dict[str, torch.Tensor]
    total_kernels: int
    kept_kernels: int
    kernels_between_kept_channels: int
    total_channels: int
    kept_channels: int
    restored: list[tuple[int, int]] = field(default_factory=list)

    @property
    def extra_sparsity(self) -> float:
        k = self.kernels_between_kept_channels
        return 1.0 - self.kept_kernels / k if k else 0.0

    def summary(self) -> dict[str, Any]:
        return {"total_kernels": self.total_kernels, "kept_kernels": self.kept_kernels,
                "kernels_between_kept_channels": self.kernels_between_kept_channels,
                "extra_sparsity": self.extra_sparsity, "total_channels": self.total_channels,
                "kept_channels": self.kept_channels, "restored": len(self.restored)}


def _ragged(ptr: np.ndarray, items: np.ndarray, which: np.ndarray) -> np.ndarray:
    lo, hi = ptr[which], ptr[which + 1]
    lens = hi - lo
    total = int(lens.sum())
    if not total:
        return np.zeros(0, np.int64)
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return items[starts + np.arange(total)]


def plan_from_kernels(
    dg: DependencyGraph,
    cg: ChannelGraph,
    extraction: Extraction | Mapping[int, np.ndarray],
    *,
    ignore: Iterable[int | str] = (),
) -> LeanPlan:
    """The channels that survive the kept kernels, as a plan on ``dg``, to a fixpoint.

    A channel class survives iff a kept kernel from a surviving class enters it (or no
    kernel enters it at all: a source) and one leaves it to a surviving class (or it is
    read by the model output or an op outside the graph); a class whose only edges are
    its own (a depthwise conv) also needs one of those kept. Unprunable classes and
    ``ignore``d groups always survive. A group that may not vanish but lost every
    channel keeps its strongest one (with its strongest in- and out-kernels).
    """
    from graphprune.plan import _repair, resolve_ignore

    kept = extraction.kept if isinstance(extraction, Extraction) else dict(extraction)
    skip = resolve_ignore(dg, ignore)
    uniq, node_c = np.unique(cg.node_key, return_inverse=True)
    nc = len(uniq)
    pinned = np.ones(nc, bool)
    lab = uniq >= 0
    gids = np.where(lab, dg.group_of_cls[np.where(lab, uniq, 0)], -1)
    prunable = np.array([g >= 0 and dg.groups[g].prunable and g not in skip for g in gids.tolist()], bool)
    pinned[prunable] = False
    sink = np.zeros(nc, bool)
    sink[node_c[cg.node_sink]] = True

    has_in = np.zeros(nc, bool)
    has_self = np.zeros(nc, bool)
    strength = np.full(nc, -np.inf)
    ks, kd, kself = [], [], []
    for b in cg.kernel_blocks:
        blk = cg.blocks[b]
        exist = np.isfinite(blk.logw)
        sc = node_c[blk.src_matrix()]
        dc = node_c[blk.dst]
        same = sc == dc[:, None]
        has_in[dc[(exist & ~same).any(1)]] = True
        has_self[dc[(exist & same).any(1)]] = True
        np.maximum.at(strength, dc, blk.logw.max(1, initial=-np.inf).astype(np.float64))
        r, c = np.nonzero(kept[b] & exist)
        s_, d_ = sc[r, c], dc[r]
        ks.append(s_)
        kd.append(d_)
        kself.append(s_ == d_)
    ks_ = np.concatenate(ks) if ks else np.zeros(0, np.int64)
    kd_ = np.concatenate(kd) if kd else np.zeros(0, np.int64)
    kself_ = np.concatenate(kself) if kself else np.zeros(0, bool)
    es, ed = ks_[~kself_], kd_[~kself_]
    in_cnt = np.bincount(ed, minlength=nc)
    out_cnt = np.bincount(es, minlength=nc)
    self_cnt = np.bincount(kd_[kself_], minlength=nc)
    by_src = np.argsort(es, kind="stable")
    src_ptr = np.searchsorted(es[by_src], np.arange(nc + 1))
    by_dst = np.argsort(ed, kind="stable")
    dst_ptr = np.searchsorted(ed[by_dst], np.arange(nc + 1))
    alive = np.ones(nc, bool)
    while True:
        dead = alive & ~pinned & ((has_in & (in_cnt == 0)) | (~sink & (out_cnt == 0)) | (has_self & (self_cnt == 0)))
        if not dead.any():
            break
        alive[dead] = False
        which = np.flatnonzero(dead)
        in_cnt -= np.bincount(ed[_ragged(src_ptr, by_src, which)], minlength=nc)
        out_cnt -= np.bincount(es[_ragged(dst_ptr, by_dst, which)], minlength=nc)

    # Group plan; groups that may not vanish keep their strongest channel.
    removed: dict[int, list[int]] = {}
    cls_of = {}
    for i in np.flatnonzero(~alive & lab):
        g, ch = int(dg.group_of_cls[uniq[i]]), int(dg.chan_of_cls[uniq[i]])
        removed.setdefault(g, []).append(ch)
        cls_of[(g, ch)] = i
    restored: list[tuple[int, int]] = []
    for g, chans in removed.items():
        if len(chans) == dg.groups[g].size and not dg.groups[g].removable:
            best = max(chans, key=lambda ch: (strength[cls_of[(g, ch)]], -ch))
            chans.remove(best)
            alive[cls_of[(g, best)]] = True
            restored.append((g, best))
    plan = Plan({g: c for g, c in removed.items() if c})
    removed_mask = dg.removed_classes(plan)
    _, problems = dg.vanish_blockers(removed_mask)
    if problems:
        scores = {g: np.full(dg.groups[g].size, -np.inf) for g in plan}
        for i in np.flatnonzero(lab & prunable):
            g = int(dg.group_of_cls[uniq[i]])
            if g in scores:
                scores[g][int(dg.chan_of_cls[uniq[i]])] = strength[i]
        scores = {g: np.where(np.isfinite(s), s, -1e30) for g, s in scores.items()}
        plan = _repair(dg, plan, scores)
        removed_mask = dg.removed_classes(plan)
        alive[lab] = ~removed_mask[uniq[lab]]

    # Kernel masks among surviving channels.
    restored_c = np.zeros(nc, bool)
    for g, ch in restored:
        restored_c[cls_of[(g, ch)]] = True
    masks: dict[str, torch.Tensor] = {}
    n_kept = n_between = n_total = 0
    for b in cg.kernel_blocks:
        blk = cg.blocks[b]
        exist = np.isfinite(blk.logw)
        sc = node_c[blk.src_matrix()]
        dc = node_c[blk.dst]
        between = exist & alive[sc] & alive[dc][:, None]
        eff = kept[b] & between
        if restored_c.any():
            rows = np.flatnonzero(restored_c[dc] & ~eff.any(1) & between.any(1))
            if len(rows):
                cols = np.where(between[rows], blk.logw[rows], -np.inf).argmax(1)
                eff[rows, cols] = True
            colmask = restored_c[sc] & between
            if colmask.any():
                for cl in np.unique(sc[colmask]).tolist():
                    sel = (sc == cl) & between
                    if (eff & sel).any():
                        continue
                    flat = np.where(sel, blk.logw, -np.inf)
                    r, c = np.unravel_index(int(flat.argmax()), flat.shape)
                    eff[r, c] = True
        n_total += int(exist.sum())
        n_between += int(between.sum())
        n_kept += int(eff.sum())
        if blk.param is not None:
            m = torch.from_numpy(eff.T.copy() if blk.transposed else eff.copy())
            masks[blk.param] = masks[blk.param] | m if blk.param in masks else m
    total_ch = sum(g.size for g in dg.groups if g.prunable)
    return LeanPlan(plan, masks, n_total, n_kept, n_between, total_ch, total_ch - plan.n_removed, restored)


def slim_kernel_masks(dg: DependencyGraph, plan: Plan, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The kernel masks re-indexed for the slim model ``gp.apply(model, dg, plan)``."""
    removed = dg.removed_classes(plan)
    out = {}
    for param, m in masks.items():
        for d in (0, 1):
            labels = dg.member_labels.get((param, d))
            if labels is not None and len(labels) == m.shape[d]:
                keep = torch.from_numpy(dg.keep_mask(labels, removed))
                m = m[keep] if d == 0 else m[:, keep]
        if m.numel():
            out[param] = m
    return out


@torch.no_grad()
def apply_kernel_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> int:
    """Zero the kernels ``masks`` drops in ``model``'s weights, in place; returns how many."""
    params = dict(model.named_parameters())
    zeroed = 0
    for name, m in masks.items():
        w = params.get(name)
        if w is None or tuple(w.shape[:2]) != tuple(m.shape):
            continue
        drop = ~m.to(w.device)
        w[drop] = 0
        zeroed += int(drop.sum())
    return zeroed


class KernelMasker:
    """Keeps dropped kernels at zero while training (a ``graphprune.train.finetune`` plugin).

    ``after_step`` re-zeroes them; ``hook()`` instead masks their gradients (for any
    training loop; with zero start values SGD, Adam and AdamW keep them at zero) and
    returns handles to ``remove()``.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor]) -> None:
        self.masks = dict(masks)

    def after_step(self, model: nn.Module) -> None:
        apply_kernel_masks(model, self.masks)

    def hook(self, model: nn.Module) -> list[Any]:
        handles = []
        params = dict(model.named_parameters())
        for name, m in self.masks.items():
            w = params.get(name)
            if w is None or tuple(w.shape[:2]) != tuple(m.shape):
                continue
            full = m.to(w.device, w.dtype).reshape(tuple(m.shape) + (1,) * (w.dim() - 2))
            handles.append(w.register_hook(lambda g, full=full: g * full.to(g.device)))
        return handles


# --------------------------------------------------------------------------------------
# One-shot and scheduled pruning
# --------------------------------------------------------------------------------------
def geometric_keep(final_keep: float, steps: int) -> list[float]:
    """LEAN's schedule: the kept fraction after each of ``steps`` steps, ``final_keep ** (k / steps)``.

    >>> [round(k, 3) for k in geometric_keep(0.25, 2)]
    [0.5, 0.25]
    """
    if not 0 < final_keep <= 1:
        raise InputError(f"final_keep must be in (0, 1], got {final_keep!r}")
    return [final_keep ** ((k + 1) / steps) for k in range(steps)]


def lean_plan(
    model: nn.Module,
    dg: DependencyGraph,
    keep: float | int,
    *,
    criterion: str = "lean",
    n: int = 32,
    exclude: Iterable[str] | None = None,
    ignore: Iterable[int | str] = (),
    max_paths: int | None = None,
    progress: bool = False,
) -> tuple[LeanPlan, ChannelGraph, Extraction]:
    """Graph, extraction and plan in one call. ``criterion``: ``lean`` (chains of operator
    norms), ``opnorm`` or ``l1`` (individual kernels, global threshold)."""
    cg = ChannelGraph.build(model, dg, criterion=criterion, n=n, exclude=exclude)
    ext = extract(cg, keep, method="lean" if criterion == "lean" else "individual",
                  max_paths=max_paths, progress=progress)
    return plan_from_kernels(dg, cg, ext, ignore=ignore), cg, ext


def prune(
    model: nn.Module,
    example_inputs: Any,
    ratio: float = 0.5,
    *,
    steps: int = 1,
    callback: Callable[[torch.fx.GraphModule, int], Any] | None = None,
    criterion: str = "lean",
    n: int = 32,
    exclude: Iterable[str] | None = None,
    ignore: Iterable[int | str] = (),
    leaf_modules: Iterable[type | str] = (),
    mask_kernels: bool | None = None,
    schedule: Sequence[float] | None = None,
    max_paths: int | None = None,
    progress: bool = False,
) -> PruneResult:
    """LEAN pruning: remove ``ratio`` of the kernels, then every channel left without kernels.

    ``ratio`` is the fraction of *kernels* (kernel edges of the channel graph) removed:
    ``1 - ratio`` are kept. With ``steps > 1`` this runs LEAN's geometric schedule: step
    ``k`` keeps ``(1 - ratio) ** (k / steps)`` of the original kernels, re-tracing the
    current slim model, and calls ``callback(slim_model, step)`` after each step (e.g. a
    short fine-tune; a module it returns replaces the slim model). ``mask_kernels``
    (default: on when ``steps > 1``) zeroes the non-kept kernels inside surviving
    channels and holds them at zero through the callback (gradient hooks), so later
    steps see them as gone. ``criterion`` ``"opnorm"`` / ``"l1"`` are the individual
    baselines (global threshold on single kernels), with the same channel removal.
    ``schedule`` gives the kept fraction of the original kernels after each step
    explicitly (e.g. ``[0.8, 0.5, 0.3, 0.1, 0.05]``) and overrides ``ratio``/``steps``.

    Returns a ``gp.PruneResult`` (``plan`` on the original model's graph) with a
    ``lean`` attribute: one dict per step (keep fraction, kernels and channels kept,
    extra sparsity from masks, chains, seconds).
    """
    from graphprune.api import PruneResult  # noqa: F811  (api imports this module lazily)
    from graphprune.metrics import count
    from graphprune.rewrite import apply

    check_schedule(ratio, steps, callback)
    if criterion not in CRITERIA:
        raise InputError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if schedule is not None:
        schedule = [float(k) for k in schedule]
        if not schedule or any(not 0 < k <= 1 for k in schedule):
            raise InputError(f"schedule must be a non-empty list of kept fractions in (0, 1], got {schedule!r}")
        steps = len(schedule)
    mask = steps > 1 if mask_kernels is None else bool(mask_kernels)
    exclude = None if exclude is None else list(exclude)
    ignore, leaf_modules = list(ignore), list(leaf_modules)
    dg0 = DependencyGraph.build(model, example_inputs, leaf_modules=leaf_modules)
    before = count(model, example_inputs)
    steps_done = StepPlans(dg0, ignore)
    current, dg = model, dg0
    total0 = None
    stats: list[dict[str, Any]] = []
    keeps = schedule or (geometric_keep(1 - ratio, steps) if ratio > 0 else [1.0] * steps)
    for step, keep in enumerate(keeps, start=1):
        t0 = time.perf_counter()
        if step > 1:
            dg = DependencyGraph.build(current, example_inputs, leaf_modules=leaf_modules)
        skip = steps_done.skip(dg)
        cg = ChannelGraph.build(current, dg, criterion=criterion, n=n, exclude=exclude)
        if total0 is None:
            total0 = cg.n_kernels
        budget = int(round(keep * total0))
        ext = extract(cg, budget, method="lean" if criterion == "lean" else "individual",
                      max_paths=max_paths, progress=progress)
        lp = plan_from_kernels(dg, cg, ext, ignore=skip)
        slim = apply(current, dg, lp.plan)
        handles: list[Any] = []
        masker = None
        if mask:
            masker = KernelMasker(slim_kernel_masks(dg, lp.plan, lp.kernel_masks))
            apply_kernel_masks(slim, masker.masks)
            handles = masker.hook(slim)
        steps_done.record(dg, lp.plan)
        row = {"step": step, "keep": keep, "original_kernels": total0, "budget": budget, "paths": ext.n_paths,
               "path_kernels": ext.path_kernels, "seconds": time.perf_counter() - t0,
               **lp.summary(), "masked": mask}
        if callback is not None:
            returned = callback(slim, step)
            if isinstance(returned, nn.Module):
                slim = returned
        for h in handles:
            h.remove()
        if masker is not None:
            apply_kernel_masks(slim, masker.masks)
        stats.append(row)
        current = slim
    result = PruneResult(current, steps_done.composed(), before, count(current, example_inputs), dg0,
                         steps_done.history)
    result.lean = stats
    return result

