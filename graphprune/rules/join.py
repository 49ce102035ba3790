"""Tensors joined and cut along an axis: cat, stack, split, chunk, unbind.

Channel flow: a concatenation places its inputs' channels side by side (offsets come
from the recorded shapes) and ties the other axes; a split gives each piece its slice
of the labels. No values are mixed and no count is read as a value: exact. ``unbind``
along a channel axis picks channels one by one, so that axis is pinned.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx

from graphprune.rules.base import CONCAT, Multi, arg, as_array, aten_ops, norm_dim, register


@register(torch.cat, torch.concat, torch.concatenate, *aten_ops("cat.default"), kind=CONCAT)
def cat(ctx, node, module):
    """Channels of the inputs sit side by side along ``dim``; other axes are tied."""
    tensors = arg(node, 0, "tensors")
    if isinstance(tensors, torch.fx.Node):  # a tuple of tensors computed elsewhere (x.chunk(4)[1:3])
        labels, shapes = list(ctx.labels(tensors) or ()), list(ctx.shape(tensors))
    else:
        labels, shapes = [ctx.labels(t) for t in tensors], [ctx.shape(t) for t in tensors]
    out_shape = ctx.shape(node)
    d = norm_dim(arg(node, 1, "dim", 0), len(out_shape))
    out = []
    reason = f"joined with a non-channel axis by {ctx.describe_node()}"
    for k, size in enumerate(out_shape):
        if k == d:
            parts = [lab[k] for lab in labels]
            out.append(None if all(p is None for p in parts) else np.concatenate(
                [as_array(p, shape[k]) for p, shape in zip(parts, shapes)]))
        else:
            out.append(ctx.couple([lab[k] for lab in labels], size, reason))
    return tuple(out)


@register(torch.stack, *aten_ops("stack.default"))
def stack(ctx, node, module):
    tensors = list(arg(node, 0, "tensors"))
    out_shape = ctx.shape(node)
    d = norm_dim(arg(node, 1, "dim", 0), len(out_shape))
    labels = [ctx.labels(t) for t in tensors]
    reason = f"stacked with a non-channel axis by {ctx.describe_node()}"
    tied = [ctx.couple([lab[k] for lab in labels], ctx.shape(tensors[0])[k], reason)
            for k in range(len(out_shape) - 1)]
    return tuple(tied[:d]) + (None,) + tuple(tied[d:])


def _split_patch(rw, node):
    """Rewrite split/chunk as ``torch.split`` with the surviving size of every piece."""
    x = node.args[0]
    old = rw.old_shape(node)
    ndim = len(old[0])
    d = _split_dim(node, ndim)
    pieces = rw.labels(node)
    if all(p[d] is None for p in pieces):
        return
    sizes = [int(rw.keep(p[d]).sum()) if p[d] is not None else s[d] for p, s in zip(pieces, old)]
    rw.replace(node, torch.split, (x, sizes), {"dim": d})


def _split_dim(node, ndim):
    return norm_dim(arg(node, 2, "dim", 0), ndim)


@register(torch.split, torch.chunk, torch.tensor_split, "split", "chunk", "tensor_split",
          *aten_ops("split.Tensor", "split_with_sizes.default", "chunk.default"), patch=_split_patch)
def split(ctx, node, module):
    """Pieces of one axis: each output keeps its slice of the input's labels."""
    labels = ctx.labels(node.args[0])
    shapes = ctx.shape(node)
    d = _split_dim(node, len(shapes[0]))
    out, offset = [], 0
    for s in shapes:
        piece = list(labels)
        if labels[d] is not None:
            piece[d] = labels[d][offset:offset + s[d]]
        offset += s[d]
        out.append(tuple(piece))
    return Multi(out)


@register(torch.unbind, "unbind", *aten_ops("unbind.int"))
def unbind(ctx, node, module):
    """Slices along one axis: that axis' channels are picked, the rest pass."""
    labels = ctx.labels(node.args[0])
    d = norm_dim(arg(node, 1, "dim", 0), len(labels))
    ctx.pin(labels[d], f"{ctx.describe_node()} picks channels one by one")
    rest = labels[:d] + labels[d + 1:]
    return Multi(rest for _ in ctx.shape(node))
