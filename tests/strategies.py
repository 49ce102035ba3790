"""Hypothesis strategies: random architectures and random pruning plans.

``architectures()`` draws an ``Arch`` (``fuzznet``): a small DAG of operations over 4-D
feature maps ``[B, C, H, W]`` and, after a flatten or a global pool, 2-D features
``[B, F]``, on one input or two: convolutions (plain, depthwise, grouped, strided,
functional with free weights), transposed convolutions (stride 1 or 2, grouped),
BatchNorm, LayerNorm (on features, and over the channels of maps ConvNeXt-style, between
permutes), GroupNorm, activations (module, functional, method and in-place forms), add,
mul, squeeze-excitation gating, cat, split/chunk, pooling, upsampling, padding, flatten,
linear layers, and attention over the spatial tokens of a map (``nn.MultiheadAttention``,
or a hand-written qkv Linear + ``F.scaled_dot_product_attention`` + projection, with
run-time or literal sizes, optionally residual), and ``again``: a second call of an
earlier op's module (conv, convT, BatchNorm, LayerNorm, GroupNorm, activation module,
linear) on another value of that op's input shape. ``FuzzNet(arch)`` builds it as an
``nn.Module`` whose forward is plain torch code, traceable by ``torch.fx``;
``arch.source()`` prints that code, to paste as a repro.

``architectures(hazardous=True)`` also draws the hazard ops and model traits of
``hazards`` (channel counts as numbers, reductions and pooling over channel axes, weight
statistics, channel indexing, tied weights, a grouped conv called twice, dropout;
dict/list/nested outputs, in-place ops on the input, training mode, the export fallback).

``plans(dg)`` draws a plan for a built ``DependencyGraph``: explicit channel sets
(valid or not), ``gp.select`` on random scores (any scope, target, rounding), or a
deliberately broken plan.
"""

from __future__ import annotations

import warnings

import hazards
import numpy as np
import torch
from fuzznet import MAX_C, MAX_HW, Arch, FuzzNet, FuzzNet2, Op, build, n_outputs
from hypothesis import strategies as st
from torch import nn

import graphprune as gp

__all__ = ["Arch", "Op", "FuzzNet", "FuzzNet2", "build", "architectures", "plans", "ACTIVATIONS"]

ACTIVATIONS = ("relu", "relu_inplace", "F.relu", "torch.relu", "method_relu", "gelu", "silu",
               "sigmoid", "hardswish", "leaky_relu", "tanh", "relu6")


def _conv_out(h: int, k: int, stride: int, pad: int) -> int:
    return (h + 2 * pad - k) // stride + 1


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


def _draw_op(draw, arch: Arch, hazardous: bool = False, without: frozenset = frozenset()) -> None:
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
    if hazardous:
        kinds += hazards.kinds(arch, maps, flats, without)
    kind = draw(st.sampled_from(kinds))

    def emit(op: Op, *out_shapes: tuple[int, ...]) -> None:
        arch.ops.append(op)
        arch.shapes.extend(out_shapes)

    if kind in hazards.WEIGHTS:
        hazards.draw_op(draw, arch, kind, emit, _pick)
        return

    if kind in ("add", "mul", "iadd") and any(len(v) > 1 for v in by_shape.values()):
        pool = [v for v in by_shape.values() if len(v) > 1]
        same = draw(st.sampled_from(pool))
        a = _pick(draw, same)
        b = draw(st.sampled_from([j for j in same if j != a]))
        emit(Op(kind, (a, b)), shapes[a])
        return
    if kind == "again":
        j, x = draw(st.sampled_from(reuse))
        out_index = arch.n_inputs + sum(n_outputs(o) for o in arch.ops[:j])
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
def architectures(draw, max_ops: int = 12, hazardous: bool = False, without: frozenset = frozenset()) -> Arch:
    """A random ``Arch`` of 1..``max_ops`` operations on a ``[B, c_in, hw, hw]`` input, and
    sometimes a second input ``[B, c_in2, hw, hw]``; with ``hazardous``, hazard ops among
    them and model traits (``hazards``), but none of the kinds or traits named in ``without``."""
    hw = draw(st.sampled_from([4, 6, 8]))
    arch = Arch(c_in=draw(st.integers(1, 4)), hw=hw)
    if hazardous:
        hazards.draw_traits(draw, arch, without)
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
        _draw_op(draw, arch, hazardous, without)
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


# --- plans ------------------------------------------------------------------------------


@st.composite
def plans(draw, dg: gp.DependencyGraph, model: nn.Module | None = None, x: torch.Tensor | None = None):
    """A plan for ``dg``: ``("explicit"|"select"|"broken", plan)``.

    Explicit plans pick random channels of random prunable groups, mostly of groups that can
    lose some channels (sometimes all of a group's channels: one in ten removable groups, one
    in thirty others, for which the plan is refused); ``select`` plans come from
    ``gp.select`` on random scores; broken plans name a missing group, an index out of
    range or an unprunable group, and must be rejected with a ``PlanError``.
    """
    prunable = [g for g in dg.groups if g.prunable]
    modes = ["explicit"] * 3 + ["select"] * 3 + ["broken"] if prunable else ["broken"]
    mode = draw(st.sampled_from(modes))
    if mode == "explicit":
        # groups that can lose some channels: one channel of a one-channel group is all of it
        partial = [g for g in prunable if g.size > 1 or g.removable]
        pool = prunable if not partial or hazards.one_in(draw, 10) else partial
        chosen = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=len(pool),
                               unique_by=lambda g: g.id))
        plan = {}
        for g in chosen:
            # all of a group: valid for removable groups only (a plan emptying another is refused,
            # and one such group spoils the whole plan, so those are drawn less often)
            everything = hazards.one_in(draw, 10 if g.removable else 30) or g.size == 1
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
