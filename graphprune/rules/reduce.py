"""Reductions and normalisations along an axis: sum, mean, max, var, norm, softmax.

Channel flow: reduced axes disappear (or become size 1); the others pass through.
What each says about values along a channel axis: a sum over channels stays exact (a
removed channel adds nothing); a mean, max, variance or softmax over channels changes
with the channels that remain, so those channels are marked inexact, with that reason.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphprune.rules.base import arg, aten_ops, norm_dim, register, target_name


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
    out_shape = ctx.shape(node)
    if labels is None:
        return None
    name = target_name(node)
    dim_index = 2 if name == "norm" else 1
    dims = arg(node, dim_index, "dim", None)
    if dims is None or (isinstance(dims, (tuple, list)) and not dims):  # dim=() reduces every axis too
        axes = list(range(len(labels)))
    else:
        axes = [norm_dim(int(d), len(labels)) for d in ([dims] if isinstance(dims, int) else dims)]
    keepdim = bool(arg(node, dim_index + 1, "keepdim", False))
    out = []
    for d, lab in enumerate(labels):
        if d in axes:
            if name != "sum":
                ctx.inexact(lab, f"{ctx.describe_node()} reduces over channels")
            if keepdim:
                out.append(None)
        else:
            out.append(lab)
    if not isinstance(out_shape, torch.Size) or len(out) != len(out_shape):  # not followed: never guess
        ctx.pin_all(labels, f"{ctx.describe_node()} reduces axes in a way graphprune does not follow")
        return tuple(None for _ in out_shape) if isinstance(out_shape, torch.Size) else None
    return tuple(out)


@register(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, nn.Softmax, nn.LogSoftmax,
          "softmax", "log_softmax", *aten_ops("softmax.int", "_softmax.default", "log_softmax.int"))
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
