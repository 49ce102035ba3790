"""Size and speed of a model: parameters, multiply-accumulates, CPU latency.

MACs follow the convention of common counters (fvcore, thop for conv/linear): one MAC
per multiply-add of convolutions, transposed convolutions, linear layers and matrix
products, counted for the batch of the example inputs. Normalisation, activations,
pooling and additions are not counted (they fold or are memory-bound).
"""

from __future__ import annotations

import math
import operator
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from graphprune.modules import SlimMultiheadAttention
from graphprune.tracing import normalize_inputs, trace

__all__ = ["Counts", "count", "latency"]


@dataclass(frozen=True)
class Counts:
    """Parameter count and MACs of a model for given example inputs."""

    params: int
    macs: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _numel(shape: Any) -> int:
    return math.prod(shape) if isinstance(shape, torch.Size) else 0


def _module_macs(module: nn.Module, node: torch.fx.Node) -> int:
    out = _numel(node.meta.get("shape"))
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        x = node.args[0].meta["shape"]
        return _numel(x) * module.weight.shape[1] * math.prod(module.weight.shape[2:])
    if isinstance(module, nn.modules.conv._ConvNd):
        return out * math.prod(module.weight.shape[1:])
    if isinstance(module, nn.Linear):
        return out * module.in_features
    if isinstance(module, nn.Bilinear):
        return out * module.in1_features * module.in2_features
    if isinstance(module, (nn.MultiheadAttention, SlimMultiheadAttention)):
        return _attention_macs(module, node)
    return 0


def _attention_macs(module: nn.Module, node: torch.fx.Node) -> int:
    """Projections plus q k^T and attn v for (Slim)MultiheadAttention."""
    q = node.args[0].meta["shape"]
    k = (node.args[1] if len(node.args) > 1 else node.kwargs["key"]).meta["shape"]
    if isinstance(module, SlimMultiheadAttention):
        inner, e_in, e_out = module.num_heads * module.head_dim, module.in_dim, module.out_dim
    else:
        inner = e_in = e_out = module.embed_dim
    batch_first = module.batch_first
    n_q = q[1] if batch_first else q[0]
    n_k = k[1] if batch_first else k[0]
    batch = q[0] if batch_first else q[1]
    proj = batch * (n_q + 2 * n_k) * e_in * inner + batch * n_q * inner * e_out
    return proj + 2 * batch * n_q * n_k * inner


_aten = torch.ops.aten
_CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, _aten.conv1d.default, _aten.conv2d.default,
                   _aten.conv3d.default)
_CONVT_FUNCTIONS = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                    _aten.conv_transpose1d.default, _aten.conv_transpose2d.input,
                    _aten.conv_transpose3d.input)
_LINEAR = (F.linear, _aten.linear.default)
_MATMUL = (torch.matmul, torch.bmm, torch.mm, operator.matmul, "matmul", "bmm", "mm",
           _aten.matmul.default, _aten.bmm.default, _aten.mm.default)
_SDPA = (F.scaled_dot_product_attention, _aten.scaled_dot_product_attention.default)


def _function_macs(node: torch.fx.Node) -> int:
    out = _numel(node.meta.get("shape"))
    if node.target in _CONV_FUNCTIONS or node.target in _LINEAR:
        w = node.args[1].meta["shape"] if len(node.args) > 1 else node.kwargs["weight"].meta["shape"]
        return out * math.prod(w[1:])
    if node.target in _CONVT_FUNCTIONS:
        w = node.args[1].meta["shape"]
        return _numel(node.args[0].meta["shape"]) * math.prod(w[1:])
    if node.target in _SDPA:
        q, v = node.args[0].meta["shape"], node.args[2].meta["shape"]
        return math.prod(q[:-1]) * v[-2] * (q[-1] + v[-1])
    if node.target in _MATMUL:
        a = node.args[0].meta.get("shape") if isinstance(node.args[0], torch.fx.Node) else None
        return out * (a[-1] if isinstance(a, torch.Size) and len(a) else 1)
    return 0


def count(model: nn.Module, example_inputs: Any) -> Counts:
    """Parameters and MACs of ``model`` on ``example_inputs``.

    >>> count(torch.nn.Linear(4, 3), torch.randn(2, 4))
    Counts(params=15, macs=24)
    """
    gm = trace(model, example_inputs)
    modules = dict(gm.named_modules())
    macs = 0
    for node in gm.graph.nodes:
        if node.op == "call_module":
            macs += _module_macs(modules[node.target], node)
        elif node.op in ("call_function", "call_method"):
            macs += _function_macs(node)
    params = sum(p.numel() for p in model.parameters())
    return Counts(params=int(params), macs=int(macs))


def latency(
    model: nn.Module,
    example_inputs: Any,
    *,
    repeats: int = 30,
    warmup: int = 5,
    threads: int | None = None,
) -> float:
    """Median wall time in seconds of one forward pass in inference mode on CPU."""
    inputs = normalize_inputs(example_inputs)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    try:
        times = []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                model(*inputs)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        model.train(was_training)
        torch.set_num_threads(old_threads)
