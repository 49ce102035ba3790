"""Reductions and normalisations along an axis: sum, mean, max, var, norm, softmax; ops that
order or accumulate along an axis: max/min with indices, argmax, topk, sort, cumsum, FFTs.

Channel flow: reduced axes disappear (or become size 1); the others pass through.
What each says about values along a channel axis: a sum over channels stays exact (a
removed channel adds nothing); a mean, max, variance or softmax over channels changes
with the channels that remain, so those channels are marked inexact, with that reason.
Positions along a channel axis (argmax, indices, topk, sort) and running sums along it
(cumsum, FFTs) name or mix channels that removal renumbers: that axis is pinned.
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphprune.rules.base import Multi, Operands, arg, aten_ops, norm_dim, register, target_name, unlabelled


@register(torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
          torch.norm, "mean", "sum", "amax", "amin", "std", "var", "logsumexp", "norm",
          *aten_ops("mean.dim", "mean.default", "sum.dim_IntList", "sum.default", "amax.default", "amin.default"))
def reduction(ctx, node, module):
    """Reducing spatial axes keeps channels.

    A sum over channels stays exact (a removed channel adds nothing); a mean, max or
    variance over channels changes with the channel count, so those channels are
    marked inexact (hand-written LayerNorm, channel statistics).
    """
    labels = ctx.labels(node.args[0])
    if labels is None:
        return None
    name = target_name(node)
    dim_index = 2 if name == "norm" else 1
    axes = _axes(arg(node, dim_index, "dim", None), len(labels))
    return _reduce(ctx, node, labels, axes, bool(arg(node, dim_index + 1, "keepdim", False)))


def _axes(dims, ndim):
    """Reduced axes: ``None`` or ``()`` means all of them (``dim=()`` reduces every axis too)."""
    if dims is None or (isinstance(dims, (tuple, list)) and not dims):
        return list(range(ndim))
    return [norm_dim(int(d), ndim) for d in ([dims] if isinstance(dims, int) else dims)]


def _reduce(ctx, node, labels, axes, keepdim):
    out_shape = ctx.shape(node)
    out = []
    for d, lab in enumerate(labels):
        if d in axes:
            if target_name(node) not in _EXACT_OVER_CHANNELS:
                ctx.inexact(lab, f"{ctx.describe_node()} reduces over channels")
            if keepdim:
                out.append(None)
        else:
            out.append(lab)
    if not isinstance(out_shape, torch.Size) or len(out) != len(out_shape):  # not followed: never guess
        ctx.pin_all(labels, f"{ctx.describe_node()} reduces axes in a way graphprune does not follow")
        return tuple(None for _ in out_shape) if isinstance(out_shape, torch.Size) else None
    return tuple(out)


_EXACT_OVER_CHANNELS = ("sum", "any")  # a removed (zero) channel adds nothing to a sum or an any
_KEYWORD_ONLY = 99  # an argument position no call reaches: the operand is looked up by keyword

def aten_reduction(ctx, node, module):
    """Core ATen reductions: as ``reduction``, with the axes where the rule declares them."""
    labels = ctx.labels(node.args[0])
    if labels is None:
        return None
    axes = _axes(ctx.operand("dim"), len(labels))
    return _reduce(ctx, node, labels, axes, bool(ctx.operand("keepdim", False)))


# the core ATen reductions, with where their axes and keepdim flag are
for _names, _operands in (
    (("prod.dim_int", "any.dim", "any.dims"), Operands(dim=1, keepdim=2)),
    (("prod.default", "any.default"), Operands()),  # every axis
    (("var.dim",), Operands(dim=1, keepdim=3)),  # var.dim(self, dim, unbiased, keepdim)
    (("var.correction",), Operands(dim=1, keepdim=_KEYWORD_ONLY)),  # (self, dim, *, correction, keepdim)
):
    register(*aten_ops(*_names), operands=_operands)(aten_reduction)


@register(*aten_ops("argmax.default", "argmin.default"), operands=Operands(dim=1, keepdim=2))
def arg_reduction(ctx, node, module):
    """``argmax`` / ``argmin`` return positions: along a channel axis they name channels, which
    removal renumbers, so that axis is pinned (every axis, when the tensor is flattened)."""
    labels = ctx.labels(node.args[0])
    if labels is None:
        return None
    dim = ctx.operand("dim")
    if dim is None:
        ctx.pin_all(labels, f"{ctx.describe_node()} returns positions in the flattened tensor")
        return unlabelled(ctx.shape(node))
    d = norm_dim(dim, len(labels))
    ctx.pin(labels[d], f"{ctx.describe_node()} returns positions along a channel axis")
    keep = (None,) if ctx.operand("keepdim", False) else ()
    return tuple(labels[:d]) + keep + tuple(labels[d + 1:])


def _positions_read(node) -> bool:
    """Whether the indices output (1) of a (values, indices) op is read."""
    return any(not (u.target is operator.getitem and (u.args[1] == 0 or not u.users)) for u in node.users)


@register(*aten_ops("max.dim", "min.dim"), operands=Operands(dim=1, keepdim=2))
@register(*aten_ops("topk.default"), operands=Operands(dim=2))
@register(*aten_ops("sort.default"), operands=Operands(dim=1))
def ordered(ctx, node, module):
    """(values, indices) along one axis: ``max.dim`` / ``min.dim`` / ``topk`` / ``sort``.

    Along another axis each channel is treated on its own: exact. Along a channel axis,
    ``max``/``min`` values change with the channels that remain (inexact, as ``amax``), and
    their indices name channels (pinned when read); ``topk`` and ``sort`` order the channels
    into positions that are not channels (pinned).
    """
    labels = ctx.labels(node.args[0])
    if labels is None:
        return None
    d = norm_dim(ctx.operand("dim", -1), len(labels))
    picks = target_name(node) in ("max", "min")
    if labels[d] is not None:
        if picks and not _positions_read(node):
            ctx.inexact(labels[d], f"{ctx.describe_node()} takes the extreme over channels")
        else:
            ctx.pin(labels[d], f"{ctx.describe_node()} orders or indexes along a channel axis")
    keep = () if picks and not ctx.operand("keepdim", False) else (None,)
    out = tuple(labels[:d]) + keep + tuple(labels[d + 1:])
    return Multi([out, out])


@register(*aten_ops("cumsum.default"), operands=Operands(dim=1))
@register(*aten_ops("_fft_r2c.default", "_fft_c2r.default"), operands=Operands(dim=1))
def along_axes(ctx, node, module):
    """Ops that mix values along their axes (``cumsum``, FFTs): every other axis passes; a
    channel axis among theirs is pinned (a removed channel would change the channels after it)."""
    labels = ctx.labels(node.args[0])
    if labels is None:
        return None
    out = list(labels)
    for d in _axes(ctx.operand("dim"), len(labels)):
        ctx.pin(out[d], f"{ctx.describe_node()} mixes values along a channel axis")
        out[d] = None
    return tuple(out)


@register(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, nn.Softmax, nn.LogSoftmax,
          "softmax", "log_softmax", *aten_ops("softmax.int", "_softmax.default", "log_softmax.int",
                                              "_log_softmax.default"))
def softmax(ctx, node, module):
    """Softmax keeps every axis; over a channel axis the channels become inexact."""
    labels = ctx.labels(node.args[0])
    dim = module.dim if module is not None else arg(node, 1, "dim", None)
    if dim is None:
        ctx.pin_all(labels, f"{ctx.describe_node()} normalises without a dim")
        return tuple(None for _ in labels)
    d = norm_dim(dim, len(labels))
    ctx.inexact(labels[d], f"{ctx.describe_node()} normalises over channels")
    return labels
