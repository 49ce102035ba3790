"""Ops that move, join, cut or reduce axes: pooling, resize, cat, split, indexing,
reshape/flatten/view, permute, reductions, softmax, shape queries."""

from __future__ import annotations

import builtins
import operator

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from graphprune.rules.base import Multi, arg, as_array, register, target_name

# --- pooling and resizing: leading axes pass, spatial axes are new ------------------------


def _spatial(n_spatial: int | None):
    def build(ctx, node, module):
        labels = ctx.labels(node.args[0] if node.args else node.kwargs.get("input"))
        out_shape = ctx.shape(node)
        if labels is None or not isinstance(out_shape, torch.Size):
            return None
        k = n_spatial if n_spatial is not None else max(len(out_shape) - 2, 0)
        keep = len(out_shape) - k
        return tuple(labels[:keep]) + (None,) * k
    build.__name__ = f"spatial{n_spatial or ''}d"
    return build


for _k, _mods, _fns in (
    (1, (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d),
     (F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d)),
    (2, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d),
     (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d)),
    (3, (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d),
     (F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d)),
):
    register(*_mods, *_fns)(_spatial(_k))
register(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate,
         F.upsample, F.upsample_nearest, F.upsample_bilinear)(_spatial(None))


@register(F.pad)
def pad(ctx, node, module):
    """Padding of spatial axes keeps channels; padding a channel axis pins it."""
    labels = ctx.labels(node.args[0])
    widths = arg(node, 1, "pad", ())
    n = len(widths) // 2
    out = list(labels)
    for d in range(len(out) - n, len(out)):
        ctx.pin(out[d], f"{ctx.describe_node()} pads a channel axis")
        out[d] = None
    return tuple(out)


# --- joining and cutting ----------------------------------------------------------------


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


@register(torch.cat, torch.concat, torch.concatenate)
def cat(ctx, node, module):
    """Channels of the inputs sit side by side along ``dim``; other axes are tied."""
    tensors = list(arg(node, 0, "tensors"))
    out_shape = ctx.shape(node)
    d = _dim(arg(node, 1, "dim", 0), len(out_shape))
    labels = [ctx.labels(t) for t in tensors]
    out = []
    reason = f"joined with a non-channel axis by {ctx.describe_node()}"
    for k, size in enumerate(out_shape):
        if k == d:
            parts = [lab[k] for lab in labels]
            out.append(None if all(p is None for p in parts) else np.concatenate(
                [as_array(p, ctx.shape(t)[k]) for p, t in zip(parts, tensors)]))
        else:
            out.append(ctx.couple([lab[k] for lab in labels], size, reason))
    return tuple(out)


@register(torch.stack)
def stack(ctx, node, module):
    tensors = list(arg(node, 0, "tensors"))
    out_shape = ctx.shape(node)
    d = _dim(arg(node, 1, "dim", 0), len(out_shape))
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
    return _dim(arg(node, 2, "dim", 0), ndim)


@register(torch.split, torch.chunk, torch.tensor_split, "split", "chunk", "tensor_split",
          patch=_split_patch)
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


def _index_items(index, ndim):
    """Expand an index into (input axis or None, item) pairs."""
    items = list(index) if isinstance(index, tuple) else [index]
    n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
    out, d = [], 0
    for it in items:
        if it is Ellipsis:
            for _ in range(ndim - n_real):
                out.append((d, slice(None)))
                d += 1
        elif it is None:
            out.append((None, None))
        else:
            out.append((d, it))
            d += 1
    while d < ndim:
        out.append((d, slice(None)))
        d += 1
    return out


def _getitem_patch(rw, node):
    x, index = node.args
    if not isinstance(x, torch.fx.Node) or isinstance(rw.labels(x), Multi):
        return
    labels, shape = rw.labels(x), rw.old_shape(x)
    if not isinstance(shape, torch.Size):
        return
    items = list(index) if isinstance(index, tuple) else [index]
    new_items, k = [], 0
    for d, it in _index_items(index, len(shape)):
        if d is None or labels[d] is None or not isinstance(it, (slice, int)):
            new_items.append(it)
            continue
        keep = rw.keep(labels[d])
        if isinstance(it, int):
            new_items.append(int(keep[:it % shape[d]].sum()))
        else:
            start, stop, _ = it.indices(shape[d])
            new_items.append(slice(int(keep[:start].sum()), int(keep[:stop].sum())))
        k += 1
    if k:
        rw.set_arg(node, 1, "index", tuple(new_items) if isinstance(index, tuple) or len(new_items) > 1 else new_items[0])
    del items


@register(operator.getitem, patch=_getitem_patch)
def getitem(ctx, node, module):
    """Picking a piece of a split, or slicing a tensor with ints, slices, None, ``...``."""
    x, index = node.args
    labels = ctx.labels(x)
    shape = ctx.shape(x)
    if isinstance(labels, Multi):
        return labels[index] if isinstance(index, int) else None
    if not isinstance(shape, torch.Size):
        return None
    out = []
    for d, it in _index_items(index, len(shape)):
        if d is None:
            out.append(None)
        elif isinstance(it, slice):
            if labels[d] is not None and it.step not in (None, 1):
                ctx.pin(labels[d], f"{ctx.describe_node()} slices a channel axis with a step")
                out.append(None)
            else:
                out.append(labels[d][it] if labels[d] is not None else None)
        elif isinstance(it, int):
            if labels[d] is not None:
                k = it % shape[d]
                ctx.pin(labels[d][k:k + 1], f"{ctx.describe_node()} picks one channel")
        else:
            # Advanced indexing (a gather along axis d): the index's axes replace axis d.
            # Gathering channels would reorder them, so a channel axis is pinned.
            ctx.pin(labels[d], f"{ctx.describe_node()} gathers channels with a tensor index")
            index_shape = ctx.shape(it) if isinstance(it, torch.fx.Node) else np.shape(it)
            if sum(1 for _, x in _index_items(index, len(shape))
                   if not isinstance(x, (slice, int)) and x is not None) > 1 \
                    or not isinstance(index_shape, (torch.Size, tuple)):
                ctx.pin_all(labels, f"{ctx.describe_node()} indexes with several tensors")
                return tuple(None for _ in ctx.shape(node))
            out.extend([None] * len(index_shape))
    out_shape = ctx.shape(node)
    if len(out) != len(out_shape):
        ctx.pin_all(labels, f"{ctx.describe_node()} indexes in a way graphprune does not follow")
        return tuple(None for _ in out_shape)
    return tuple(out)


# --- reshaping ------------------------------------------------------------------------


def _runs(in_shape, out_shape):
    """Pair runs of input and output axes (size-1 axes skipped) with equal products."""
    ins = [d for d in range(len(in_shape)) if in_shape[d] != 1]
    outs = [d for d in range(len(out_shape)) if out_shape[d] != 1]
    i = j = 0
    while i < len(ins) and j < len(outs):
        run_in, run_out = [ins[i]], [outs[j]]
        p_in, p_out = in_shape[ins[i]], out_shape[outs[j]]
        i, j = i + 1, j + 1
        while p_in != p_out:
            if p_in < p_out and i < len(ins):
                run_in.append(ins[i])
                p_in *= in_shape[ins[i]]
                i += 1
            elif j < len(outs):
                run_out.append(outs[j])
                p_out *= out_shape[outs[j]]
                j += 1
            else:
                return
        yield run_in, run_out


def reshape_labels(ctx, in_shape, labels, out_shape):
    """Carry labels through a reshape by matching runs of axes with equal products.

    Merging axes where one carries channels repeats each channel over a block
    (flatten into a Linear); merging several channel axes gives their product
    (``ctx.compose``). Splitting a channel axis keeps labels on the one output axis
    they vary along (unflatten), or factorises them over several axes (attention heads,
    channel shuffle) so that one factor can be pruned and the rest kept whole.
    """
    out = [None] * len(out_shape)
    for d in range(len(in_shape)):
        if in_shape[d] == 1 and labels[d] is not None and len(out_shape) != len(in_shape):
            ctx.pin(labels[d], f"{ctx.describe_node()} drops a one-channel axis")
    for run_in, run_out in _runs(in_shape, out_shape):
        carrying = [d for d in run_in if labels[d] is not None]
        if not carrying:
            continue
        if len(run_in) == 1 and len(run_out) == 1:
            out[run_out[0]] = labels[run_in[0]]
            continue
        sizes = [in_shape[d] for d in run_in]
        block = labels[carrying[0]] if len(carrying) == 1 else ctx.compose([labels[d] for d in carrying])
        view = [in_shape[d] if d in carrying else 1 for d in run_in]
        grid = np.broadcast_to(block.reshape(view), sizes).reshape([out_shape[d] for d in run_out])
        varying = [a for a in range(grid.ndim) if not (grid == np.take(grid, [0], axis=a)).all()]
        if len(varying) <= 1:
            a = varying[0] if varying else 0
            index = tuple(slice(None) if k == a else 0 for k in range(grid.ndim))
            out[run_out[a]] = np.ascontiguousarray(grid[index])
            continue
        index = tuple(slice(None) if k in varying else 0 for k in range(grid.ndim))
        for a, factor in zip(varying, ctx.factorize(np.ascontiguousarray(grid[index]))):
            out[run_out[a]] = factor
    return tuple(out)


def _shape_args(node):
    """(index of the first size argument, sizes, packed) of view/reshape/expand calls."""
    name = target_name(node)
    if name in ("view", "reshape", "expand") and len(node.args) > 1:
        rest = node.args[1:]
        packed = len(rest) == 1 and isinstance(rest[0], (tuple, list))
        return 1, list(rest[0]) if packed else list(rest), packed
    if name == "unflatten":
        return 2, list(arg(node, 2, "sizes")), True
    return None


def _reshape_patch(rw, node):
    """Sizes of channel axes in view/reshape/expand/unflatten become the slim widths.

    Literal ints and values computed at run time from other widths (``C // heads``)
    are both replaced, since either may no longer hold after pruning; ``-1`` stays.
    """
    module = rw.module(node)
    if isinstance(module, nn.Unflatten):
        found = 2, list(module.unflattened_size), True
    else:
        found = _shape_args(node)
    if found is None:
        return
    first, sizes, packed = found
    out_labels, new_shape = rw.labels(node), rw.new_shape(node)
    if isinstance(module, nn.Unflatten):
        d0 = _dim(module.dim, len(new_shape) - len(sizes) + 1)
        axes = range(d0, d0 + len(sizes))
    elif target_name(node) == "unflatten":
        d0 = _dim(arg(node, 1, "dim"), len(new_shape) - len(sizes) + 1)
        axes = range(d0, d0 + len(sizes))
    else:
        if len(sizes) != len(out_labels):
            return
        axes = range(len(sizes))
    changed = False
    for k, d in enumerate(axes):
        if out_labels[d] is not None and not (isinstance(sizes[k], int) and sizes[k] == -1):
            changed |= sizes[k] != new_shape[d]
            sizes[k] = new_shape[d]
    if not changed:
        return
    if isinstance(module, nn.Unflatten):
        rw.replace_module(node, nn.Unflatten(module.dim, tuple(sizes)))
    elif target_name(node) == "unflatten":
        rw.set_arg(node, 2, "sizes", tuple(sizes))
    else:
        rw.set_args(node, tuple(node.args[:first]) + ((tuple(sizes),) if packed else tuple(sizes)))


@register(torch.flatten, torch.reshape, nn.Flatten, nn.Unflatten, torch.squeeze, torch.unsqueeze,
          torch.unflatten, "flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten",
          "view_as", "reshape_as", patch=_reshape_patch)
def reshape(ctx, node, module):
    """flatten / view / reshape / squeeze / unsqueeze / unflatten, from recorded shapes."""
    x = node.args[0]
    labels, in_shape, out_shape = ctx.labels(x), ctx.shape(x), ctx.shape(node)
    if labels is None or not isinstance(out_shape, torch.Size):
        return None
    return reshape_labels(ctx, in_shape, labels, out_shape)


@register(torch.permute, torch.transpose, torch.swapaxes, torch.t, "permute", "transpose",
          "swapaxes", "t", "movedim")
def permute(ctx, node, module):
    """Axes are reordered; labels follow their axis."""
    labels = ctx.labels(node.args[0])
    ndim = len(labels)
    name = target_name(node)
    rest = [a for a in node.args[1:]]
    if name == "t":
        order = list(range(ndim))[::-1]
    elif name in ("transpose", "swapaxes"):
        a, b = (_dim(int(v), ndim) for v in rest[:2])
        order = list(range(ndim))
        order[a], order[b] = order[b], order[a]
    elif name == "movedim":
        src, dst = _dim(rest[0], ndim), _dim(rest[1], ndim)
        order = [d for d in range(ndim) if d != src]
        order.insert(dst, src)
    else:
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        if not dims:
            dims = arg(node, 1, "dims", ())
        order = [_dim(int(v), ndim) for v in dims]
    return tuple(labels[d] for d in order)


# --- reductions and normalisation over an axis --------------------------------------------


@register(torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
          torch.norm, "mean", "sum", "amax", "amin", "std", "var", "logsumexp", "norm")
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
    if dims is None:
        axes = list(range(len(labels)))
    else:
        axes = [_dim(int(d), len(labels)) for d in ([dims] if isinstance(dims, int) else dims)]
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
    if not isinstance(out_shape, torch.Size) or len(out) != len(out_shape):
        return tuple(None for _ in out_shape) if isinstance(out_shape, torch.Size) else None
    return tuple(out)


@register(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, nn.Softmax, nn.LogSoftmax,
          "softmax", "log_softmax")
def softmax(ctx, node, module):
    """Softmax keeps every axis; over a channel axis the channels become inexact."""
    labels = ctx.labels(node.args[0])
    dim = module.dim if module is not None else arg(node, 1, "dim", None)
    if dim is None:
        ctx.pin_all(labels, f"{ctx.describe_node()} normalises without a dim")
        return tuple(None for _ in labels)
    d = _dim(dim, len(labels))
    ctx.inexact(labels[d], f"{ctx.describe_node()} normalises over channels")
    return labels


@register("size", "dim", "numel", builtins.getattr, builtins.len)
def shape_query(ctx, node, module):
    """``x.size(1)``, ``x.shape``: metadata, no channels flow (the value adapts at run time)."""
    out = ctx.shape(node)
    if isinstance(out, torch.Size):
        ctx.pin_all(ctx.labels(node.args[0]), f"{ctx.describe_node()} returns a tensor")
        return tuple(None for _ in out)
    return None
