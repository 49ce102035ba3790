"""Linear maps over the last axis: nn.Linear, F.linear, nn.Bilinear, matrix products,
embedding tables (also in bags), pairwise distances.

Channel flow: a Linear's input features are its weight's columns and its outputs are
fresh channels; a matrix product ties the contracted axes channel by channel and
broadcasts its batch axes (a parameter on either side is a layer whose free axis
produces channels). Values are mixed along the contracted axis only, which is exact:
a removed channel contributes zero. Nothing reads a channel count as a value.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphprune.rules.base import LAYER, Multi, Operands, aten_ops, operand_shape, register

MODULE = Operands(weight="weight", bias="bias", width="out_features")
FUNCTION = Operands(weight=1, bias=2)


def linear_core(ctx, x, w, b, weight_node=None):
    """Couple ``x``'s last axis to the weight's columns; the weight's rows are the output."""
    x_lab = ctx.labels(x)
    fin = ctx.shape(x)[-1]
    ctx.couple([w[1], x_lab[-1] if x_lab else None], fin,
               f"input of {ctx.describe_node()} is not a channel axis")
    ctx.set_role(weight_node, 1, "in")
    ctx.set_role(weight_node, 0, "out")
    out = w[0]
    ctx.mark_produced(out)
    if b is not None:
        ctx.couple([b[0], out], len(out), f"bias of {ctx.describe_node()}")
    rest = x_lab[:-1] if x_lab else (None,) * (len(ctx.shape(ctx.node)) - 1)
    return tuple(rest) + (out,)


def linear_macs(shapes, node, module, rule) -> int:
    """``out * prod(w[1:])``: one multiply-add per output element and input feature."""
    w, out = operand_shape(shapes, rule, node, "weight"), shapes.of(node)
    return math.prod(out) * math.prod(w[1:]) if w is not None and out is not None else 0


def _resize_linear(module: nn.Linear) -> None:
    module.out_features, module.in_features = module.weight.shape


@register(nn.Linear, resize=_resize_linear, macs=linear_macs, operands=MODULE, kind=LAYER)
def linear(ctx, node, module):
    """nn.Linear: weight [out, in] over the last axis; other axes pass through."""
    w = [ctx.operand_param("weight", 0, "out"), ctx.operand_param("weight", 1, "in")]
    b = ctx.operand_param("bias", 0, "pass")
    return linear_core(ctx, node.args[0], w, (b,) if b is not None else None)


@register(F.linear, *aten_ops("linear.default"), macs=linear_macs, operands=FUNCTION, kind=LAYER)
def linear_function(ctx, node, module):
    """F.linear / aten.linear with a free weight (a parameter or a computed tensor)."""
    weight, bias = ctx.operand("weight"), ctx.operand("bias")
    b = ctx.weight_labels(bias, "bias") if bias is not None else None
    return linear_core(ctx, node.args[0], ctx.weight_labels(weight), b, weight)


def _resize_bilinear(module: nn.Bilinear) -> None:
    module.out_features, module.in1_features, module.in2_features = module.weight.shape


@register(nn.Bilinear, resize=_resize_bilinear, macs=linear_macs,
          operands=Operands(weight="weight", bias="bias", width="out_features"))
def bilinear(ctx, node, module):
    """nn.Bilinear: y_k = x1^T W_k x2 + b_k, weight [out, in1, in2]; x1, x2 on their last axes."""
    x1, x2 = node.args[:2]
    reason = f"input of {ctx.describe_node()} is not a channel axis"
    for x, d in ((x1, 1), (x2, 2)):
        lab = ctx.labels(x)
        ctx.couple([ctx.operand_param("weight", d, "in"), lab[-1] if lab else None], ctx.shape(x)[-1], reason)
    out = ctx.operand_param("weight", 0, "out")
    b = ctx.operand_param("bias", 0, "pass")
    if b is not None:
        ctx.couple([b, out], len(out), f"bias of {ctx.describe_node()}")
    rest = ctx.labels(x1)
    rest = rest[:-1] if rest else (None,) * (len(ctx.shape(node)) - 1)
    return tuple(rest) + (out,)


def tie_batch(ctx, shapes_labels, out_batch_shape, reason):
    """Broadcast-tie the leading (batch) axes of several operands, as elementwise ops do."""
    out = []
    nb = len(out_batch_shape)
    for d, size in enumerate(out_batch_shape):
        arrays = []
        for shape, lab in shapes_labels:
            k = d - (nb - len(shape))
            if k >= 0 and shape[k] == size:
                arrays.append(lab[k])
        out.append(ctx.couple(arrays, size, reason) if arrays else None)
    return out


def _matmul_macs(shapes, node, module, rule) -> int:
    """``out * a[-1]``: one multiply-add per output element and contracted position."""
    out, a = shapes.of(node), shapes.of(node.args[0])
    if out is None:
        return 0
    return math.prod(out) * (a[-1] if a is not None and len(a) else 1)


@register(torch.matmul, operator.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm",
          *aten_ops("matmul.default", "bmm.default", "mm.default"), macs=_matmul_macs)
def matmul(ctx, node, module):
    """``a @ b``: the contracted axes are tied channel by channel; batch axes broadcast.

    A parameter on either side is a layer: its free axis produces new channels.
    """
    a, b = node.args[:2]
    sa, sb, out_shape = ctx.shape(a), ctx.shape(b), ctx.shape(node)
    la, lb = ctx.labels(a), ctx.labels(b)
    if len(sa) < 2 or len(sb) < 2 or la is None or lb is None:
        ctx.pin_all((la, lb), f"{ctx.describe_node()} multiplies vectors")
        return tuple(None for _ in out_shape)
    reason = f"contracted with a non-channel axis in {ctx.describe_node()}"
    ctx.couple([la[-1], lb[-2]], sa[-1], reason)
    for x, lab, free in ((a, la, -2), (b, lb, -1)):
        name = ctx.attr_name(x)
        if name is not None:
            ctx.mark_produced(lab[free])
            ctx.set_role(x, len(ctx.shape(x)) + free, "out")
            ctx.set_role(x, len(ctx.shape(x)) + (-1 if free == -2 else -2), "in")
    batch = tie_batch(ctx, [(sa[:-2], la[:-2]), (sb[:-2], lb[:-2])], out_shape[:-2], reason)
    for lab in batch:
        ctx.mark_heads(lab)
    return tuple(batch) + (la[-2], lb[-1])


def _addmm_macs(shapes, node, module, rule) -> int:
    """``bias + a @ b``: as ``a @ b``."""
    out, a = shapes.of(node), shapes.of(node.args[1])
    return math.prod(out) * a[-1] if out is not None and a is not None else 0


@register(torch.addmm, "addmm", *aten_ops("addmm.default"), macs=_addmm_macs)
def addmm(ctx, node, module):
    """``addmm(bias, a, b)`` (Hugging Face's ``Conv1D``: weight ``[in, out]``): a matrix product
    whose result broadcasts against ``bias``; a parameter ``b`` produces the output columns."""
    bias, a, b = node.args[:3]
    sa, sb = ctx.shape(a), ctx.shape(b)
    la, lb = ctx.labels(a), ctx.labels(b)
    reason = f"contracted with a non-channel axis in {ctx.describe_node()}"
    if la is None or lb is None or len(sa) != 2 or len(sb) != 2:
        ctx.pin_all((la, lb, ctx.labels(bias)), f"{ctx.describe_node()} multiplies vectors")
        return tuple(None for _ in ctx.shape(node))
    ctx.couple([la[1], lb[0]], sa[1], reason)
    if ctx.attr_name(b) is not None:
        ctx.mark_produced(lb[1])
        ctx.set_role(b, 1, "out")
        ctx.set_role(b, 0, "in")
    out = [la[0], lb[1]]
    lbias, sbias = ctx.labels(bias), ctx.shape(bias)
    if isinstance(sbias, torch.Size):  # broadcasting add of the bias
        for k, size in enumerate(sbias):
            d = k + 2 - len(sbias)
            if d >= 0 and size == ctx.shape(node)[d]:
                out[d] = ctx.couple([out[d], lbias[k]], size, f"bias of {ctx.describe_node()}")
    return tuple(out)


def _resize_embedding(module: nn.Embedding) -> None:
    module.embedding_dim = module.weight.shape[1]


def _embedding_core(ctx, indices, weight_dim):
    """Rows of a table picked by ``indices``: the index axes pass, the table's columns are the
    output channels (a layer's outputs: each channel is one column of the table)."""
    ctx.mark_produced(weight_dim)
    lab = ctx.labels(indices)
    rest = tuple(lab) if isinstance(lab, tuple) else (None,) * (len(ctx.shape(ctx.node)) - 1)
    return rest + (weight_dim,)


@register(nn.Embedding, resize=_resize_embedding,
          operands=Operands(weight="weight", width="embedding_dim"))
def embedding(ctx, node, module):
    """nn.Embedding: weight [num_embeddings, dim]; the dim axis is produced (tied to an output
    Linear through the shared weight when the embeddings are tied)."""
    return _embedding_core(ctx, node.args[0], ctx.operand_param("weight", 1, "out"))


# F.embedding(input, weight, ...); aten.embedding(weight, indices, ...)
@register(F.embedding, operands=Operands(input=0, weight=1))
@register(*aten_ops("embedding.default"), operands=Operands(input=1, weight=0))
def embedding_function(ctx, node, module):
    weight = ctx.operand("weight")
    labels = ctx.weight_labels(weight)
    ctx.set_role(weight, 1, "out")
    return _embedding_core(ctx, ctx.operand("input"), labels[1] if len(labels) > 1 else None)


def _einsum_parts(node) -> tuple[list[str], str, list]:
    """(subscripts per operand, output subscripts, operands) with ``...`` spelled out."""
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    ins = lhs.split(",")
    spare = iter(sorted(set("ABCDEFGHIJKLMNOPQRSTUVWXYZ") - set(equation)))
    dots = ""
    for k, sub in enumerate(ins):
        if "..." in sub:
            shape = operands[k].meta.get("shape") if isinstance(operands[k], torch.fx.Node) else None
            n = len(shape) - (len(sub) - 3)
            dots = dots if len(dots) >= n else dots + "".join(next(spare) for _ in range(n - len(dots)))
            ins[k] = sub.replace("...", dots[len(dots) - n:])
    if not arrow:  # implicit output: the letters used once, in order
        letters = "".join(ins)
        rhs = dots + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in dots))
    return ins, rhs.replace("...", dots), operands


def _einsum_macs(shapes, node, module, rule) -> int:
    """One multiply-add per combination of every letter's positions (each product of two operands)."""
    ins, rhs, operands = _einsum_parts(node)
    sizes: dict[str, int] = {}
    for sub, x in zip(ins, operands):
        shape = shapes.of(x)
        if shape is None:
            return 0
        sizes.update({c: max(sizes.get(c, 1), n) for c, n in zip(sub, shape)})
    return math.prod(sizes.values()) * max(len(operands) - 1, 1)


@register(torch.einsum, torch.functional.einsum, *aten_ops("einsum.default"), macs=_einsum_macs)
def einsum(ctx, node, module):
    """``torch.einsum``: axes that share a letter are tied channel by channel; contracted letters sum
    their products (exact: a removed channel adds zero); an output axis carries its letter's labels.
    A letter repeated within one operand (a diagonal) pins. A parameter operand is a layer: its
    letters that reach the output produce channels."""
    ins, rhs, operands = _einsum_parts(node)
    reason = f"{ctx.describe_node()} ties a channel axis to a non-channel axis"
    by_letter: dict[str, list] = {}
    for sub, x in zip(ins, operands):
        labels, shape = ctx.labels(x), ctx.shape(x)
        if len(set(sub)) != len(sub):
            ctx.pin_all(labels, f"{ctx.describe_node()} takes a diagonal")
            return tuple(None for _ in ctx.shape(node))
        for d, c in enumerate(sub):
            by_letter.setdefault(c, []).append((labels[d] if labels else None, shape[d]))
    tied = {c: ctx.couple([lab for lab, n in pairs if n > 1], max(n for _, n in pairs), reason)
            for c, pairs in by_letter.items()}
    for sub, x in zip(ins, operands):
        if ctx.attr_name(x) is not None:
            for d, c in enumerate(sub):
                if c in rhs and tied[c] is not None:
                    ctx.mark_produced(tied[c])
                    ctx.set_role(x, d, "out")
                elif c not in rhs:
                    ctx.set_role(x, d, "in")
    return tuple(tied[c] for c in rhs)


# aten._embedding_bag(weight, indices, offsets, scale_grad_by_freq, mode, sparse, per_sample_weights, ...)
@register(*aten_ops("_embedding_bag.default"), operands=Operands(input=1, weight=0))
def embedding_bag(ctx, node, module):
    """``nn.EmbeddingBag``: returns (output [bags, dim], offset2bag, bag_size, max_indices); each
    output column sums, averages or takes the max of one table column: the table's columns are
    the output channels, as for ``embedding``; the bookkeeping outputs carry none."""
    weight = ctx.operand("weight")
    labels = ctx.weight_labels(weight)
    ctx.set_role(weight, 1, "out")
    dim_labels = labels[1] if len(labels) > 1 else None
    ctx.mark_produced(dim_labels)
    shapes = ctx.shape(node)
    out = (None,) * (len(shapes[0]) - 1) + (dim_labels,)
    for user in node.users:  # max_indices [bags, dim] names rows per column: not followed
        if not (user.target is operator.getitem and (user.args[1] == 0 or not user.users)):
            ctx.pin(dim_labels, f"{ctx.describe_node()} has its bookkeeping outputs read")
    return Multi([out, *(tuple(None for _ in s) for s in shapes[1:])])


@register(*aten_ops("_cdist_forward.default"))
def cdist(ctx, node, module):
    """``torch.cdist(x1 [..., P, M], x2 [..., R, M])`` -> [..., P, R]: distances over the features
    ``M``, tied between ``x1`` and ``x2`` (a feature zero in both adds nothing to a p-norm
    distance: exact); ``P`` and ``R`` pass, the batch axes are tied."""
    x1, x2 = node.args[0], node.args[1]
    l1, l2 = ctx.labels(x1), ctx.labels(x2)
    s1, s2, out_shape = ctx.shape(x1), ctx.shape(x2), ctx.shape(node)
    l1 = l1 if l1 is not None else (None,) * len(s1)
    l2 = l2 if l2 is not None else (None,) * len(s2)
    ctx.couple([l1[-1], l2[-1]], s1[-1], f"{ctx.describe_node()} compares features with a non-channel axis")
    batch = []
    for d in range(len(out_shape) - 2):
        arrays = []
        for lab, s in ((l1, s1), (l2, s2)):
            k = d - (len(out_shape) - len(s))
            if k >= 0 and s[k] == out_shape[d]:
                arrays.append(lab[k])
            elif k >= 0:
                ctx.pin(lab[k], f"{ctx.describe_node()} broadcasts a channel axis")
        batch.append(ctx.couple(arrays, out_shape[d], f"{ctx.describe_node()} with a non-channel axis")
                     if arrays else None)
    return (*batch, l1[-2], l2[-2])


@register(*aten_ops("_pdist_forward.default"))
def pdist(ctx, node, module):
    """``F.pdist(x [N, M])`` -> [N (N - 1) / 2]: distances over the features (a zero feature adds
    nothing: exact); pairs of rows are positions (pinned)."""
    labels = ctx.labels(node.args[0])
    if labels is not None:
        ctx.pin(labels[0], f"{ctx.describe_node()} pairs up the positions of a channel axis")
    return (None,)
