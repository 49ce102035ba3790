"""LEAN's channel graph: one node per channel of every layer output, one edge per kernel.

``ChannelGraph.build(model, dg)`` walks the traced graph once and asks each node's rule
(``graphprune.rules``) what the node is: a weighted layer (``LAYER`` with its declared
weight, stride and groups operands) adds a block of kernel edges weighted by operator
norms (``graphprune.lean.norms``); a norm with running statistics (``NORM``) is folded
into the edges that feed it; a concatenation (``CONCAT``) maps positions onto its
sources; every other op is channel-wise. So the same network gives the same graph
whether it was traced by fx or by ``torch.export``.

>>> import torch, graphprune as gp
>>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
...                             torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(),
...                             torch.nn.Conv2d(4, 2, 1))
>>> dg = gp.DependencyGraph.build(model, torch.randn(1, 1, 8, 8))
>>> ChannelGraph.build(model, dg)  # the output layer is left out by default
ChannelGraph(11 nodes, 20 kernel edges, 0 fixed edges, 2 blocks)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from graphprune.errors import InputError
from graphprune.graph import DependencyGraph
from graphprune.lean.norms import kernel_l1_norms, kernel_operator_norms
from graphprune.rules.base import CONCAT, LAYER, NORM, arg, find_rule, is_transposed, operand, operand_param
from graphprune.tracing import require_values

__all__ = ["Block", "ChannelGraph", "CRITERIA"]

CRITERIA = ("lean", "opnorm", "l1")


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
        require_values(model, "LEAN's operator norms")
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


class _Builder:
    """Walks the traced graph once and builds the channel graph's nodes and blocks."""

    def __init__(self, cg: ChannelGraph, model: nn.Module, dg: DependencyGraph, criterion: str, n: int,
                 fold: bool, exclude: set[str]) -> None:
        self.cg, self.dg, self.criterion, self.n, self.fold = cg, dg, criterion, n, fold
        self.exclude = exclude
        self.modules = dict(dg.gm.named_modules())
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
        rule = find_rule(node, module)
        kind = rule.kind if rule is not None else ""
        if kind == LAYER and self.weighted(node, module, rule, dry=True) and not self.excluded(node) \
                and self.weighted(node, module, rule):
            return
        if kind == NORM and rule.operands.running_var is not None and self.batch_norm(node, module, rule):
            return
        self.generic(node, kind)

    def tensor(self, value: Any) -> torch.Tensor | None:
        """A tensor operand: a parameter reached through ``get_attr``, or the tensor itself."""
        if isinstance(value, torch.fx.Node):
            if value.op != "get_attr":
                return None
            target, value = value.target, self.dg.gm
            for part in target.split("."):
                value = getattr(value, part, None)
        return value if isinstance(value, torch.Tensor) else None

    def weighted(self, node: torch.fx.Node, module: nn.Module | None, rule: Any, dry: bool = False) -> bool:
        """A layer the rules call ``LAYER`` (conv, linear, their functional and ATen forms): fresh
        output nodes and one kernel block. False if the layer is one the graph cannot model.

        ``dry``: only say whether the node is a supported layer."""
        x = node.args[0] if node.args else None
        if not isinstance(x, torch.fx.Node) or x.name not in self.chan:
            return False
        param = operand_param(rule, node, "weight")
        weight = self.tensor(operand(rule, node, module, "weight"))
        if param is None or weight is None:
            return False
        groups = operand(rule, node, module, "groups", 1) or 1
        stride = operand(rule, node, module, "stride", 1) or 1
        transposed = is_transposed(rule, node)
        if transposed and groups != 1:
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

    def batch_norm(self, node: torch.fx.Node, module: nn.Module | None, rule: Any) -> bool:
        """A norm with running statistics (the rules' ``NORM`` with a ``running_var`` operand):
        its per-channel scale ``|gamma| / sqrt(running_var + eps)`` is folded into the kernels
        that write its input, or else becomes a fixed scaling edge per channel."""
        x = node.args[0]
        if not isinstance(x, torch.fx.Node) or x.name not in self.chan:
            return False
        keys, nodes = self.chan[x.name]
        running_var = self.tensor(operand(rule, node, module, "running_var"))
        tracked = getattr(module, "track_running_stats", True) and not operand(rule, node, module, "training", False)
        if not self.fold or running_var is None or not tracked:
            self.chan[node.name] = (keys, nodes)
            return True
        weight = self.tensor(operand(rule, node, module, "weight"))
        with torch.no_grad():
            f = 1.0 / torch.sqrt(running_var.double() + operand(rule, node, module, "eps", 1e-5))
            if weight is not None:
                f = f * weight.detach().double().abs()
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

    def generic(self, node: torch.fx.Node, kind: str) -> None:
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
        if kind == CONCAT:
            parts = arg(node, 0, "tensors")
            dim = arg(node, 1, "dim", 0)
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
