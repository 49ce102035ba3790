"""Hypothesis strategies: random architectures and random pruning plans.

``architectures()`` draws an ``Arch``: a small DAG of operations over 4-D feature maps
``[B, C, H, W]`` and, after a flatten or a global pool, 2-D features ``[B, F]``, on one
input or two: convolutions (plain, depthwise, grouped, strided, functional with free
weights), transposed convolutions (stride 1 or 2, grouped), BatchNorm, LayerNorm (on
features, and over the channels of maps ConvNeXt-style, between permutes), GroupNorm,
activations (module, functional, method and in-place forms), add, mul,
squeeze-excitation gating, cat, split/chunk, pooling, upsampling, padding, flatten,
linear layers, and attention over the spatial tokens of a map (``nn.MultiheadAttention``,
or a hand-written qkv Linear + ``F.scaled_dot_product_attention`` + projection, with
run-time or literal sizes, optionally residual), and ``again``: a second call of an
earlier op's module (conv, convT, BatchNorm, LayerNorm, GroupNorm, activation module,
linear) on another value of that op's input shape. ``FuzzNet(arch)`` builds it as an
``nn.Module`` whose forward is plain torch code, traceable by ``torch.fx``;
``arch.source()`` prints that code, to paste as a repro.

``plans(dg)`` draws a plan for a built ``DependencyGraph``: explicit channel sets
(valid or not), ``gp.select`` on random scores (any scope, target, rounding), or a
deliberately broken plan.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

import graphprune as gp

ACTIVATIONS = ("relu", "relu_inplace", "F.relu", "torch.relu", "method_relu", "gelu", "silu",
               "sigmoid", "hardswish", "leaky_relu", "tanh", "relu6")
MAX_C = 12
MAX_HW = 16


@dataclass(frozen=True)
class Op:
    kind: str
    inputs: tuple[int, ...]
    args: tuple = ()


@dataclass
class Arch:
    """A random network: input ``[B, c_in, hw, hw]``, ``ops`` in order, ``outputs`` indices.

    Value 0 is the input; with ``c_in2`` > 0 value 1 is a second input ``[B, c_in2, hw, hw]``.
    Every op appends its outputs (one, or several for splits). ``shapes[i]`` is
    ``(C, H, W)`` or ``(F,)`` of value ``i`` (batch dimension left out).
    """

    c_in: int
    hw: int
    ops: list[Op] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    outputs: tuple[int, ...] = ()
    c_in2: int = 0

    @property
    def n_inputs(self) -> int:
        return 2 if self.c_in2 else 1

    def source(self) -> str:
        """The forward pass as Python lines (``v0``, and ``v1`` for two inputs, are the inputs)."""
        ins = [f"v0: [B, {self.c_in}, {self.hw}, {self.hw}]"]
        if self.c_in2:
            ins.append(f"v1: [B, {self.c_in2}, {self.hw}, {self.hw}]")
        lines = [f"# input{'s' if self.c_in2 else ''}: {', '.join(ins)}"]
        k = self.n_inputs
        for i, op in enumerate(self.ops):
            n_out = _n_outputs(op)
            outs = ", ".join(f"v{k + j}" for j in range(n_out))
            ins = ", ".join(f"v{j}" for j in op.inputs)
            if op.kind == "again":
                j = op.args[0]
                lines.append(f"{outs} = again#{i}({ins})  # reuses op {j}'s module ({self.ops[j].kind}#{j})"
                             f" -> {self.shapes[k:k + n_out]}")
                k += n_out
                continue
            lines.append(f"{outs} = {op.kind}#{i}({ins}{', ' if op.args else ''}"
                         f"{', '.join(map(repr, op.args))})  # -> {self.shapes[k:k + n_out]}")
            k += n_out
        lines.append(f"return {', '.join(f'v{j}' for j in self.outputs)}")
        return "\n".join(lines)

    def __repr__(self) -> str:  # hypothesis prints this for a falsifying example
        return "Arch(\n" + self.source() + "\n)"


def _n_outputs(op: Op) -> int:
    if op.kind == "split":
        return len(op.args[0])
    if op.kind == "chunk":
        return op.args[0]
    return 1


def _conv_out(h: int, k: int, stride: int, pad: int) -> int:
    return (h + 2 * pad - k) // stride + 1


def _affine(norm: nn.Module, gen: torch.Generator) -> nn.Module:
    """A LayerNorm/GroupNorm with random affine parameters (they start at ones and zeros)."""
    if getattr(norm, "weight", None) is not None:
        with torch.no_grad():
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen) + 0.5)
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=gen) * 0.1)
    return norm


class FuzzNet(nn.Module):
    """The module an ``Arch`` describes; eval mode, BatchNorm with random statistics."""

    def __init__(self, arch: Arch, seed: int = 0) -> None:
        super().__init__()
        self.arch = arch
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.layers = nn.ModuleDict()
            for i, op in enumerate(arch.ops):
                self._make(i, op, arch.shapes[op.inputs[0]][0], gen)
        self.eval()

    def _make(self, i: int, op: Op, c: int, gen: torch.Generator) -> None:
        L = self.layers
        if op.kind == "conv":
            c_out, k, stride, groups, bias = op.args
            L[f"conv{i}"] = nn.Conv2d(c, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=bias)
        elif op.kind == "fconv":
            c_out, k, groups, bias = op.args
            self.register_parameter(f"w{i}", nn.Parameter(torch.randn(c_out, c // groups, k, k, generator=gen) * 0.3))
            self.register_parameter(f"b{i}", nn.Parameter(torch.randn(c_out, generator=gen) * 0.1) if bias else None)
        elif op.kind == "bn":
            bn = nn.BatchNorm2d(c) if len(op.args) == 0 else nn.BatchNorm1d(c)
            with torch.no_grad():
                bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                bn.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            L[f"bn{i}"] = bn
        elif op.kind == "act":
            name = op.args[0]
            module = {"relu": nn.ReLU(), "relu_inplace": nn.ReLU(inplace=True), "gelu": nn.GELU(),
                      "silu": nn.SiLU(), "hardswish": nn.Hardswish(), "leaky_relu": nn.LeakyReLU(0.1),
                      "relu6": nn.ReLU6()}.get(name)
            if module is not None:
                L[f"act{i}"] = module
        elif op.kind == "se":
            (r,) = op.args
            L[f"se{i}"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, r, 1), nn.ReLU(),
                                        nn.Conv2d(r, c, 1), nn.Sigmoid())
        elif op.kind == "pool":
            mode = op.args[0]
            L[f"pool{i}"] = {"max2": nn.MaxPool2d(2), "avg2": nn.AvgPool2d(2),
                             "max3s1": nn.MaxPool2d(3, 1, 1), "adapt1": nn.AdaptiveAvgPool2d(1),
                             "adapt2": nn.AdaptiveAvgPool2d(2)}[mode]
        elif op.kind == "up" and op.args[0] == "module":
            L[f"up{i}"] = nn.Upsample(scale_factor=2, mode="nearest")
        elif op.kind == "linear":
            n_out, bias = op.args
            L[f"linear{i}"] = nn.Linear(c, n_out, bias=bias)
        elif op.kind == "flatten" and op.args[0] == "module":
            L[f"flatten{i}"] = nn.Flatten()
        elif op.kind == "ln":
            L[f"ln{i}"] = _affine(nn.LayerNorm(c, elementwise_affine=op.args[1]), gen)
        elif op.kind == "gn":
            g, affine = op.args
            L[f"gn{i}"] = _affine(nn.GroupNorm(g, c, affine=affine), gen)
        elif op.kind == "convT":
            c_out, k, stride, pad, out_pad, groups, bias = op.args
            L[f"convT{i}"] = nn.ConvTranspose2d(c, c_out, k, stride, pad, out_pad, groups, bias)
        elif op.kind == "mha":
            attn = nn.MultiheadAttention(c, op.args[0], batch_first=True)
            with torch.no_grad():  # biases start at zero: random ones, so they count
                attn.in_proj_bias.copy_(torch.randn(3 * c, generator=gen) * 0.1)
                attn.out_proj.bias.copy_(torch.randn(c, generator=gen) * 0.1)
            L[f"mha{i}"] = attn
        elif op.kind == "sdpa":
            heads, d = op.args[:2]
            L[f"qkv{i}"] = nn.Linear(c, 3 * heads * d)
            L[f"proj{i}"] = nn.Linear(heads * d, c)

    def forward(self, x: torch.Tensor):
        return self._run([x])

    def _run(self, vals: list):
        L = self.layers
        for i, op in enumerate(self.arch.ops):
            ins = [vals[j] for j in op.inputs]
            kind, a = op.kind, op.args
            if kind == "conv":
                out = L[f"conv{i}"](ins[0])
            elif kind == "fconv":
                out = F.conv2d(ins[0], getattr(self, f"w{i}"), getattr(self, f"b{i}"), 1, a[1] // 2, 1, a[2])
            elif kind == "bn":
                out = L[f"bn{i}"](ins[0])
            elif kind == "act":
                name = a[0]
                if name == "F.relu":
                    out = F.relu(ins[0])
                elif name == "torch.relu":
                    out = torch.relu(ins[0])
                elif name == "method_relu":
                    out = ins[0].relu()
                elif name == "sigmoid":
                    out = torch.sigmoid(ins[0])
                elif name == "tanh":
                    out = ins[0].tanh()
                else:
                    out = L[f"act{i}"](ins[0])
            elif kind == "add":
                out = ins[0] + ins[1]
            elif kind == "iadd":
                out = ins[0] * 1.0
                out += ins[1]
            elif kind == "mul":
                out = ins[0] * ins[1]
            elif kind == "se":
                out = ins[0] * L[f"se{i}"](ins[0])
            elif kind == "scale":
                out = ins[0] * a[0] + a[1]
            elif kind == "cat":
                out = torch.cat(ins, dim=1)
            elif kind == "split":
                parts = torch.split(ins[0], list(a[0]), dim=1)
                vals.extend(parts[j] for j in range(len(a[0])))  # fx cannot iterate a Proxy
                continue
            elif kind == "chunk":
                parts = ins[0].chunk(a[0], 1)
                vals.extend(parts[j] for j in range(a[0]))
                continue
            elif kind == "pool":
                out = L[f"pool{i}"](ins[0])
            elif kind == "fpool":
                out = F.max_pool2d(ins[0], 2) if a[0] == "max" else F.avg_pool2d(ins[0], 2)
            elif kind == "up":
                out = L[f"up{i}"](ins[0]) if a[0] == "module" else F.interpolate(ins[0], scale_factor=2.0)
            elif kind == "pad":
                out = F.pad(ins[0], (1, 1, 1, 1))
            elif kind == "gap":
                out = ins[0].mean((2, 3)) if a[0] == "mean" else torch.flatten(F.adaptive_avg_pool2d(ins[0], 1), 1)
            elif kind == "flatten":
                out = L[f"flatten{i}"](ins[0]) if a[0] == "module" else (
                    torch.flatten(ins[0], 1) if a[0] == "torch" else ins[0].reshape(ins[0].shape[0], -1))
            elif kind == "linear":
                out = L[f"linear{i}"](ins[0])
            elif kind == "ln":
                out = L[f"ln{i}"](ins[0]) if a[0] == "flat" else (
                    L[f"ln{i}"](ins[0].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
            elif kind == "gn":
                out = L[f"gn{i}"](ins[0])
            elif kind == "convT":
                out = L[f"convT{i}"](ins[0])
            elif kind in ("mha", "sdpa"):
                out = self._attention(i, op, ins[0])
            elif kind == "again":
                out = self._reuse(a[0], ins[0])
            else:  # pragma: no cover - the strategy draws only the kinds above
                raise AssertionError(kind)
            vals.append(out)
        outs = [vals[j] for j in self.arch.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _reuse(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Op ``j``'s module (created for op ``j``) called again, on ``x``."""
        op = self.arch.ops[j]
        module = self.layers[f"{op.kind}{j}"]
        if op.kind == "ln" and op.args[0] == "channels":
            return module(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return module(x)

    def _attention(self, i: int, op: Op, x: torch.Tensor) -> torch.Tensor:
        """Attention over the ``H*W`` tokens of map ``x``, back to a map.

        ``sizes``: ``"batch"`` takes B (and N) from ``x.shape`` at run time, ``"literal"``
        writes every size as a constant (batch 1, as ``build`` makes it).
        """
        L = self.layers
        c, h, w = self.arch.shapes[op.inputs[0]]
        sizes, residual = op.args[-2:]
        b, n = (x.shape[0], x.shape[2] * x.shape[3]) if sizes == "batch" else (1, h * w)
        t = x.flatten(2).transpose(1, 2)  # [B, N, C]
        if op.kind == "mha":
            y = L[f"mha{i}"](t, t, t, need_weights=False)[0]
        else:
            heads, d = op.args[:2]
            qkv = L[f"qkv{i}"](t).reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            y = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, d]
            y = L[f"proj{i}"](y.transpose(1, 2).reshape(b, n, heads * d))
        out = y.transpose(1, 2).reshape(b, c, h, w)
        return out + x if residual else out


class FuzzNet2(FuzzNet):
    """A ``FuzzNet`` of an ``Arch`` with two inputs."""

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return self._run([x, y])


# --- architectures ------------------------------------------------------------------------


def _pick(draw, candidates: list[int]) -> int:
    """One of ``candidates`` (value indices), biased towards the most recent."""
    recent = candidates[-4:]
    return draw(st.sampled_from(recent)) if draw(st.integers(0, 3)) else draw(st.sampled_from(candidates))


# activations that are modules (the others are functions), which ``again`` can call again
_MODULE_ACTS = ("relu", "relu_inplace", "gelu", "silu", "hardswish", "leaky_relu", "relu6")


def _reusable(op: Op) -> bool:
    return op.kind in ("conv", "convT", "bn", "ln", "gn", "linear") or (
        op.kind == "act" and op.args[0] in _MODULE_ACTS)


def _reuse_candidates(arch: Arch) -> list[tuple[int, int]]:
    """``(op index, value index)`` pairs: an earlier op's module and another value of the
    shape that op's input has."""
    out = []
    for j, op in enumerate(arch.ops):
        if _reusable(op):
            want = arch.shapes[op.inputs[0]]
            out += [(j, i) for i, s in enumerate(arch.shapes) if s == want and i != op.inputs[0]]
    return out


def _draw_op(draw, arch: Arch) -> None:
    shapes = arch.shapes
    reuse = _reuse_candidates(arch)
    maps = [i for i, s in enumerate(shapes) if len(s) == 3]
    flats = [i for i, s in enumerate(shapes) if len(s) == 1]
    kinds = []
    if maps:
        kinds += ["conv"] * 5 + ["fconv", "bn", "bn", "act", "act", "se", "pool", "fpool", "up", "pad",
                                 "scale", "split", "chunk", "gap", "flatten", "iadd", "ln", "gn",
                                 "convT", "convT", "attn", "attn"]
    if flats:
        kinds += ["linear", "linear", "act", "bn1d", "scale", "ln1d", "ln1d"]
    by_shape: dict[tuple, list[int]] = {}
    for i, s in enumerate(shapes):
        by_shape.setdefault(s, []).append(i)
    if any(len(v) > 1 for v in by_shape.values()):
        kinds += ["add", "add", "add", "mul", "iadd"]
    by_hw: dict[tuple, list[int]] = {}
    for i in maps:
        by_hw.setdefault(shapes[i][1:], []).append(i)
    if any(len(v) > 1 for v in by_hw.values()):
        kinds += ["cat", "cat"]
    if reuse:
        kinds += ["again", "again", "again"]
    kind = draw(st.sampled_from(kinds))

    def emit(op: Op, *out_shapes: tuple[int, ...]) -> None:
        arch.ops.append(op)
        arch.shapes.extend(out_shapes)

    if kind in ("add", "mul", "iadd") and any(len(v) > 1 for v in by_shape.values()):
        pool = [v for v in by_shape.values() if len(v) > 1]
        same = draw(st.sampled_from(pool))
        a = _pick(draw, same)
        b = draw(st.sampled_from([j for j in same if j != a]))
        emit(Op(kind, (a, b)), shapes[a])
        return
    if kind == "again":
        j, x = draw(st.sampled_from(reuse))
        out_index = arch.n_inputs + sum(_n_outputs(o) for o in arch.ops[:j])
        emit(Op("again", (x,), (j,)), shapes[out_index])
        return
    if kind == "cat":
        pool = [v for v in by_hw.values() if len(v) > 1]
        same = draw(st.sampled_from(pool))
        ins = draw(st.lists(st.sampled_from(same), min_size=2, max_size=3))
        c = sum(shapes[j][0] for j in ins)
        emit(Op("cat", tuple(ins)), (c, *shapes[ins[0]][1:]))
        return
    if kind in ("linear", "bn1d", "ln1d") or (kind in ("act", "scale") and flats and (not maps or draw(st.booleans()))):
        x = _pick(draw, flats)
        (f,) = shapes[x]
        if kind == "linear":
            n = draw(st.integers(1, MAX_C))
            emit(Op("linear", (x,), (n, draw(st.booleans()))), (n,))
        elif kind == "bn1d":
            emit(Op("bn", (x,), ("1d",)), (f,))
        elif kind == "ln1d":
            emit(Op("ln", (x,), ("flat", draw(st.booleans()))), (f,))
        elif kind == "act":
            emit(Op("act", (x,), (draw(st.sampled_from(ACTIVATIONS)),)), (f,))
        else:
            emit(Op("scale", (x,), (draw(st.sampled_from([0.5, 2.0, -1.0])), draw(st.sampled_from([0.0, 1.0])))), (f,))
        return
    x = _pick(draw, maps)
    c, h, w = shapes[x]
    if kind == "conv":
        k = draw(st.sampled_from([1, 3]))
        stride = draw(st.sampled_from([1, 1, 1, 2])) if h >= 4 else 1
        mode = draw(st.sampled_from(["plain", "plain", "depthwise", "grouped"]))
        if mode == "depthwise":
            c_out, groups = c * draw(st.sampled_from([1, 1, 2])), c
        elif mode == "grouped" and c > 1:
            divisors = [g for g in range(2, c + 1) if c % g == 0]
            groups = draw(st.sampled_from(divisors))
            c_out = groups * draw(st.integers(1, max(1, MAX_C // groups)))
        else:
            c_out, groups = draw(st.integers(1, MAX_C)), 1
        if c_out > 2 * MAX_C:
            c_out, groups = draw(st.integers(1, MAX_C)), 1
        pad = k // 2
        emit(Op("conv", (x,), (c_out, k, stride, groups, draw(st.booleans()))),
             (c_out, _conv_out(h, k, stride, pad), _conv_out(w, k, stride, pad)))
    elif kind == "fconv":
        k = draw(st.sampled_from([1, 3]))
        groups = draw(st.sampled_from([1, c])) if c > 1 else 1
        c_out = groups * draw(st.integers(1, max(1, MAX_C // groups))) if groups > 1 else draw(st.integers(1, MAX_C))
        emit(Op("fconv", (x,), (c_out, k, groups, draw(st.booleans()))), (c_out, h, w))
    elif kind == "bn":
        emit(Op("bn", (x,)), (c, h, w))
    elif kind == "act":
        emit(Op("act", (x,), (draw(st.sampled_from(ACTIVATIONS)),)), (c, h, w))
    elif kind == "se":
        emit(Op("se", (x,), (draw(st.integers(1, 4)),)), (c, h, w))
    elif kind in ("pool", "fpool"):
        modes = ["max3s1", "adapt1", "adapt2"] + (["max2", "avg2"] if h >= 2 and w >= 2 else [])
        if kind == "fpool" and h >= 2 and w >= 2:
            emit(Op("fpool", (x,), (draw(st.sampled_from(["max", "avg"])),)), (c, h // 2, w // 2))
            return
        mode = draw(st.sampled_from(modes))
        out = {"max2": (h // 2, w // 2), "avg2": (h // 2, w // 2), "max3s1": (h, w), "adapt1": (1, 1),
               "adapt2": (2, 2)}[mode]
        emit(Op("pool", (x,), (mode,)), (c, *out))
    elif kind == "up" and h * 2 <= MAX_HW:
        emit(Op("up", (x,), (draw(st.sampled_from(["module", "functional"])),)), (c, 2 * h, 2 * w))
    elif kind == "pad" and h + 2 <= MAX_HW:
        emit(Op("pad", (x,)), (c, h + 2, w + 2))
    elif kind == "scale":
        emit(Op("scale", (x,), (draw(st.sampled_from([0.5, 2.0, -1.0])), draw(st.sampled_from([0.0, 1.0])))),
             (c, h, w))
    elif kind == "split" and c >= 2:
        cut = draw(st.integers(1, c - 1))
        emit(Op("split", (x,), ((cut, c - cut),)), (cut, h, w), (c - cut, h, w))
    elif kind == "chunk" and c >= 2 and c % 2 == 0:
        emit(Op("chunk", (x,), (2,)), (c // 2, h, w), (c // 2, h, w))
    elif kind == "gap":
        emit(Op("gap", (x,), (draw(st.sampled_from(["mean", "pool_flatten"])),)), (c,))
    elif kind == "ln":
        emit(Op("ln", (x,), ("channels", draw(st.booleans()))), (c, h, w))
    elif kind == "gn" and c * h * w > 1:  # GroupNorm needs more than one value a group
        g = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0 and c // g * h * w > 1]))
        emit(Op("gn", (x,), (g, draw(st.booleans()))), (c, h, w))
    elif kind == "convT":
        _draw_conv_transpose(draw, emit, x, c, h, w)
    elif kind == "attn":
        sizes, residual = draw(st.sampled_from(["batch", "literal"])), draw(st.booleans())
        if draw(st.sampled_from(["sdpa", "mha"])) == "mha":
            heads = draw(st.sampled_from([g for g in range(1, min(c, 4) + 1) if c % g == 0]))
            emit(Op("mha", (x,), (heads, sizes, residual)), (c, h, w))
        else:
            heads, d = draw(st.integers(1, 3)), draw(st.integers(1, 4))
            emit(Op("sdpa", (x,), (heads, d, sizes, residual)), (c, h, w))
    elif kind == "flatten" and c * h * w <= 1024:
        emit(Op("flatten", (x,), (draw(st.sampled_from(["module", "torch", "reshape"])),)), (c * h * w,))
    else:  # the drawn kind does not fit this input: a plain conv instead
        c_out = draw(st.integers(1, MAX_C))
        emit(Op("conv", (x,), (c_out, 3, 1, 1, True)), (c_out, h, w))


# (k, padding, output_padding) of a transposed conv: stride 1 (H -> H + k - 1 - 2 pad), or
# stride 2, each doubling H
_CONVT_STRIDE1 = [(1, 0, 0), (3, 1, 0), (2, 0, 0), (3, 0, 0), (2, 1, 0)]
_CONVT_STRIDE2 = [(2, 0, 0), (3, 1, 1), (4, 1, 0), (1, 0, 1)]


def _draw_conv_transpose(draw, emit, x: int, c: int, h: int, w: int) -> None:
    stride = draw(st.sampled_from([1, 1, 2])) if 2 * max(h, w) <= MAX_HW else 1

    def size(n: int, k: int, pad: int, out_pad: int) -> int:
        return (n - 1) * stride - 2 * pad + k + out_pad

    fits = [t for t in (_CONVT_STRIDE1 if stride == 1 else _CONVT_STRIDE2)
            if all(1 <= size(n, *t) <= MAX_HW for n in (h, w))]
    k, pad, out_pad = draw(st.sampled_from(fits))
    mode = draw(st.sampled_from(["plain", "grouped", "depthwise", "plain"]))
    proper = [g for g in range(2, c) if c % g == 0]  # divisors that leave several channels a group
    if mode == "depthwise" and c > 1:
        c_out, groups = c * draw(st.sampled_from([1, 1, 2])), c
    elif mode == "grouped" and proper:
        groups = draw(st.sampled_from(proper))
        c_out = groups * draw(st.integers(1, max(1, MAX_C // groups)))
    else:
        c_out, groups = draw(st.integers(1, MAX_C)), 1
    emit(Op("convT", (x,), (c_out, k, stride, pad, out_pad, groups, draw(st.booleans()))),
         (c_out, size(h, k, pad, out_pad), size(w, k, pad, out_pad)))


@st.composite
def architectures(draw, max_ops: int = 12) -> Arch:
    """A random ``Arch`` of 1..``max_ops`` operations on a ``[B, c_in, hw, hw]`` input, and
    sometimes a second input ``[B, c_in2, hw, hw]``."""
    hw = draw(st.sampled_from([4, 6, 8]))
    arch = Arch(c_in=draw(st.integers(1, 4)), hw=hw)
    arch.shapes.append((arch.c_in, hw, hw))
    if draw(st.integers(0, 4)) == 4:  # one network in five has two inputs (shrinks to one)
        arch.c_in2 = draw(st.integers(1, 4))
        arch.shapes.append((arch.c_in2, hw, hw))
    # a stem conv first, so most networks have channels to prune
    c0 = draw(st.integers(2, MAX_C))
    arch.ops.append(Op("conv", (0,), (c0, draw(st.sampled_from([1, 3])), 1, 1, draw(st.booleans()))))
    arch.shapes.append((c0, hw, hw))
    if arch.c_in2 and draw(st.booleans()):  # a stem for the second input, often as wide as the first
        c1 = draw(st.sampled_from([c0, c0, draw(st.integers(1, MAX_C))]))
        arch.ops.append(Op("conv", (1,), (c1, draw(st.sampled_from([1, 3])), 1, 1, draw(st.booleans()))))
        arch.shapes.append((c1, hw, hw))
    for _ in range(draw(st.integers(1, max(1, max_ops - 1)))):
        _draw_op(draw, arch)
    head = draw(st.sampled_from(["linear", "conv", "linear", "none"]))  # simplest first: a head
    last = len(arch.shapes) - 1
    if head == "conv" and len(arch.shapes[last]) == 3:
        c, h, w = arch.shapes[last]
        arch.ops.append(Op("conv", (last,), (draw(st.integers(1, 4)), 1, 1, 1, True)))
        arch.shapes.append((arch.ops[-1].args[0], h, w))
    elif head == "linear":
        if len(arch.shapes[last]) == 3:
            arch.ops.append(Op("gap", (last,), ("mean",)))
            arch.shapes.append((arch.shapes[last][0],))
        n = draw(st.integers(1, 4))
        arch.ops.append(Op("linear", (len(arch.shapes) - 1,), (n, True)))
        arch.shapes.append((n,))
    last = len(arch.shapes) - 1
    extra = draw(st.lists(st.integers(1, last), max_size=2, unique=True))
    arch.outputs = tuple(dict.fromkeys([last, *extra]))
    return arch


def build(arch: Arch, batch: int = 1, dtype: torch.dtype = torch.float64,
          seed: int = 0) -> tuple[FuzzNet, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """The model of ``arch`` (eval mode, ``dtype``) and a random example input: a tensor,
    or a tuple of two for an ``Arch`` with two inputs (call ``model(*x)``)."""
    model = (FuzzNet2 if arch.c_in2 else FuzzNet)(arch, seed).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, arch.c_in, arch.hw, arch.hw, generator=gen, dtype=dtype)
    if not arch.c_in2:
        return model, x
    return model, (x, torch.randn(batch, arch.c_in2, arch.hw, arch.hw, generator=gen, dtype=dtype))


# --- plans ------------------------------------------------------------------------------


@st.composite
def plans(draw, dg: gp.DependencyGraph, model: nn.Module | None = None, x: torch.Tensor | None = None):
    """A plan for ``dg``: ``("explicit"|"select"|"broken", plan)``.

    Explicit plans pick random channels of random prunable groups (sometimes all of a
    group's channels, valid only for removable groups); ``select`` plans come from
    ``gp.select`` on random scores; broken plans name a missing group, an index out of
    range or an unprunable group, and must be rejected with a ``PlanError``.
    """
    prunable = [g for g in dg.groups if g.prunable]
    modes = ["explicit"] * 3 + ["select"] * 3 + ["broken"] if prunable else ["broken"]
    mode = draw(st.sampled_from(modes))
    if mode == "explicit":
        chosen = draw(st.lists(st.sampled_from(prunable), min_size=1, max_size=len(prunable),
                               unique_by=lambda g: g.id))
        plan = {}
        for g in chosen:
            everything = draw(st.integers(0, 9)) == 0
            if everything:
                plan[g.id] = list(range(g.size))
            else:
                plan[g.id] = draw(st.lists(st.integers(0, g.size - 1), min_size=1,
                                           max_size=max(1, g.size - 1), unique=True))
        return mode, gp.Plan(plan)
    if mode == "select":
        seed = draw(st.integers(0, 2**16))
        rng = np.random.default_rng(seed)
        scores = {g.id: rng.random(g.size) for g in prunable}
        ratio = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9]))
        scope = draw(st.sampled_from(["local", "global"]))
        round_to = draw(st.sampled_from([None, None, 2]))
        target = draw(st.sampled_from(["channels", "channels", "macs", "params"]))
        with warnings.catch_warnings():  # unreachable MACs/params targets warn; that is fine here
            warnings.simplefilter("ignore", RuntimeWarning)
            return mode, gp.select(dg, scores, ratio, scope=scope, round_to=round_to, target=target)
    # broken
    kind = draw(st.sampled_from(["missing_group", "out_of_range", "unprunable"]))
    pinned = [g for g in dg.groups if not g.prunable]
    if kind == "out_of_range" and prunable:
        g = draw(st.sampled_from(prunable))
        return mode, gp.Plan({g.id: [g.size + draw(st.integers(0, 3))]})
    if kind == "unprunable" and pinned:
        g = draw(st.sampled_from(pinned))
        return mode, gp.Plan({g.id: [0]})
    return mode, gp.Plan({len(dg.groups) + draw(st.integers(0, 3)): [0]})
