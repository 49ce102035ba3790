"""Ops that reshape or move axes: view/reshape/flatten/unflatten/squeeze, permute/transpose,
expand/repeat, pixel (un)shuffle, and shape queries.

Channel flow: labels follow their axis through a permutation; through a reshape they
are carried by matching runs of axes with equal products (a flatten into a Linear
repeats each channel over a block; splitting a channel axis factorises it, as for
attention heads, so that one factor can be pruned and the others kept whole). The
slim graph's literal and computed sizes of channel axes become the slim widths
(their ``patch``). No values are mixed. A shape query (``x.size(1)``) reads a width
as a number: the slim graph keeps its original value (see ``shape_query``).
"""

from __future__ import annotations

import builtins

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from graphprune.probe import channelwise
from graphprune.rules.base import arg, aten_ops, is_inplace, norm_dim, register, target_name


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
    covered: set[int] = set()
    for run_in, run_out in _runs(in_shape, out_shape):
        covered.update(run_in)
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
    for d, lab in enumerate(labels):  # axes no run of equal products reaches: not followed
        if d not in covered and in_shape[d] != 1:
            ctx.pin(lab, f"{ctx.describe_node()} reshapes a channel axis in a way graphprune does not follow")
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
    A ``view`` whose input narrowed becomes a ``reshape`` (unless its result is written in
    place): narrower axes change which strides are contiguous, so a view the original
    could take (after a copy made by a reshape of a transposed tensor) may not exist in
    the slim model, where a width of 1 lets that reshape return a view instead.
    """
    _view_as_reshape(rw, node)
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
        d0 = norm_dim(module.dim, len(new_shape) - len(sizes) + 1)
        axes = range(d0, d0 + len(sizes))
    elif target_name(node) == "unflatten":
        d0 = norm_dim(arg(node, 1, "dim"), len(new_shape) - len(sizes) + 1)
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
        rw.replace_module(node, nn.Unflatten(module.dim, tuple(sizes)).train(module.training))
    elif target_name(node) == "unflatten":
        rw.set_arg(node, 2, "sizes", tuple(sizes))
    else:
        rw.set_args(node, tuple(node.args[:first]) + ((tuple(sizes),) if packed else tuple(sizes)))


_VIEWS = {"view": "reshape", "view_as": "reshape_as"}


def _view_as_reshape(rw, node) -> None:
    x = node.args[0] if node.args else None
    if not isinstance(x, torch.fx.Node) or rw.new_shape(x) == tuple(rw.old_shape(x) or ()):
        return
    if any(is_inplace(u, rw.module(u)) for u in node.users):
        return
    if node.op == "call_method" and node.target in _VIEWS:
        node.target = _VIEWS[node.target]
    elif node.op == "call_function" and node.target is getattr(torch.ops.aten.view, "default", None):
        node.target = torch.ops.aten.reshape.default


@register(torch.flatten, torch.reshape, nn.Flatten, nn.Unflatten, torch.squeeze, torch.unsqueeze,
          torch.unflatten, "flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten",
          "view_as", "reshape_as", *aten_ops("view.default", "reshape.default", "_unsafe_view.default", "flatten.using_ints",
                   "unflatten.int", "squeeze.dim", "squeeze.dims", "squeeze.default", "unsqueeze.default"),
          patch=_reshape_patch)
def reshape(ctx, node, module):
    """flatten / view / reshape / squeeze / unsqueeze / unflatten, from recorded shapes."""
    x = node.args[0]
    labels, in_shape, out_shape = ctx.labels(x), ctx.shape(x), ctx.shape(node)
    if labels is None or not isinstance(out_shape, torch.Size):
        return None
    return reshape_labels(ctx, in_shape, labels, out_shape)


@register(torch.permute, torch.transpose, torch.swapaxes, torch.t, "permute", "transpose",
          "swapaxes", "t", "movedim",
          *aten_ops("permute.default", "transpose.int", "t.default"))
def permute(ctx, node, module):
    """Axes are reordered; labels follow their axis."""
    labels = ctx.labels(node.args[0])
    ndim = len(labels)
    name = target_name(node)
    rest = [a for a in node.args[1:]]
    if name == "t":
        order = list(range(ndim))[::-1]
    elif name in ("transpose", "swapaxes"):
        a, b = (norm_dim(int(v), ndim) for v in rest[:2])
        order = list(range(ndim))
        order[a], order[b] = order[b], order[a]
    elif name == "movedim":
        src, dst = norm_dim(rest[0], ndim), norm_dim(rest[1], ndim)
        order = [d for d in range(ndim) if d != src]
        order.insert(dst, src)
    else:
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        if not dims:
            dims = arg(node, 1, "dims", ())
        order = [norm_dim(int(v), ndim) for v in dims]
    return tuple(labels[d] for d in order)


@register("expand", "expand_as", "repeat", *aten_ops("expand.default", "repeat.default"), patch=_reshape_patch)
def expand(ctx, node, module):
    """Broadcast copies: axes that keep their size keep their labels."""
    labels, in_shape, out_shape = ctx.labels(node.args[0]), ctx.shape(node.args[0]), ctx.shape(node)
    offset = len(out_shape) - len(in_shape)
    out = [None] * len(out_shape)
    for d, lab in enumerate(labels):
        if out_shape[d + offset] == in_shape[d]:
            out[d + offset] = lab
        else:
            ctx.pin(lab, f"{ctx.describe_node()} repeats a channel axis")
    return tuple(out)


@register(torch.repeat_interleave, "repeat_interleave", *aten_ops("repeat_interleave.self_int"))
def repeat_interleave(ctx, node, module):
    """``x.repeat_interleave(r, dim)`` with an int ``r``: each position along ``dim`` is copied ``r``
    times in a row, so its label is too (grouped-query attention: a key/value head becomes ``r``
    query heads, and removing it removes all ``r``); other axes keep their labels. Per-position
    counts (a tensor ``r``), ``output_size`` or no ``dim`` (the flattened form) pin what they touch."""
    x = node.args[0]
    labels, ndim = ctx.labels(x), len(ctx.shape(x))
    repeats, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
    if dim is None or not isinstance(repeats, int) or arg(node, 3, "output_size") is not None:
        why = f"{ctx.describe_node()} repeats positions by counts graphprune does not follow"
        for lab in labels:
            ctx.pin(lab, why)
        return tuple(None for _ in ctx.shape(node))
    d = norm_dim(dim, ndim)
    return tuple(np.repeat(lab, repeats) if k == d and lab is not None else lab for k, lab in enumerate(labels))


@register(nn.PixelShuffle, F.pixel_shuffle, *aten_ops("pixel_shuffle.default"))
def pixel_shuffle(ctx, node, module):
    """[C r^2, H, W] -> [C, H r, W r]: each output channel owns a block of r^2 inputs."""
    labels = ctx.labels(node.args[0])
    r = module.upscale_factor if module is not None else arg(node, 1, "upscale_factor")
    cin = ctx.shape(node.args[0])[-3]
    lab = labels[-3]
    for spatial in labels[-2:]:  # output positions interleave input positions and channels
        ctx.pin(spatial, f"{ctx.describe_node()} mixes a channel axis into space")
    if lab is None:
        return tuple(None for _ in ctx.shape(node))
    heads = lab[:: r * r]
    ctx.couple([lab, np.repeat(heads, r * r)], cin, f"{ctx.describe_node()} with unlabelled input")
    return tuple(labels[:-3]) + (heads, None, None)


@register(F.fold, *aten_ops("col2im.default"))
def col2im(ctx, node, module):
    """``F.fold`` / ``aten.col2im`` ([N, C k, L] -> [N, C, H, W]): each output channel sums its own
    block of ``k`` input rows (kernel positions) over space; the ``L`` axis (patches) is pinned
    if it carries channels."""
    labels = ctx.labels(node.args[0])
    kernel = arg(node, 2, "kernel_size")
    k = int(np.prod(kernel)) if isinstance(kernel, (tuple, list)) else int(kernel) ** 2
    ctx.pin(labels[-1], f"{ctx.describe_node()} folds a channel axis into space")
    lab, rows = labels[-2], ctx.shape(node.args[0])[-2]
    if lab is None:
        return tuple(labels[:-2]) + (None, None, None)
    heads = lab[::k]
    ctx.couple([lab, np.repeat(heads, k)], rows, f"{ctx.describe_node()} with unlabelled input")
    return tuple(labels[:-2]) + (heads, None, None)


@register(nn.PixelUnshuffle, F.pixel_unshuffle)
def pixel_unshuffle(ctx, node, module):
    labels = ctx.labels(node.args[0])
    r = module.downscale_factor if module is not None else arg(node, 1, "downscale_factor")
    lab = labels[-3]
    for spatial in labels[-2:]:
        ctx.pin(spatial, f"{ctx.describe_node()} mixes a channel axis into space")
    return tuple(labels[:-3]) + (None if lab is None else np.repeat(lab, r * r), None, None)


@register("size", "dim", "numel", builtins.getattr, builtins.len, *aten_ops("sym_size.int", "sym_numel.default"))
def shape_query(ctx, node, module):
    """``x.size(1)``, ``x.shape``, ``x.numel()``, ``len(x)``: numbers read off a tensor.

    A number read off a channel axis is a *width* (``ctx.mark_width``): the slim graph
    keeps its original value (``y.sum(1) / y.size(1)``, ``x.shape[-1] ** -0.5``, the
    ``C // heads`` of a reshape of another tensor), as the masked original computes;
    where a reshape's output axis carries channels, the reshape's own patch writes the
    slim width. Attributes that are tensors (``x.T``) have no rule: pinned.
    """
    out = ctx.shape(node)
    labels = ctx.labels(node.args[0])
    if isinstance(out, torch.Size):  # a tensor attribute (x.real, x.T): kept if it is channel-wise
        probed = channelwise(ctx, node, module)
        if probed is not None:
            return probed
        ctx.pin_all(labels, f"{ctx.describe_node()} returns a tensor")
        return tuple(None for _ in out)
    if type(labels) is not tuple:
        return None
    widths = [d for d, lab in enumerate(labels) if lab is not None]
    name = target_name(node)
    if name in ("size", "sym_size"):
        dim = arg(node, 1, "dim")
        if dim is None:
            ctx.width_axes[node.name] = widths
        elif norm_dim(dim, len(labels)) in widths:
            ctx.mark_width(node)
    elif name == "getattr" and node.args[1] == "shape":
        ctx.width_axes[node.name] = widths
    elif (name in ("numel", "sym_numel") and widths) or (name == "len" and 0 in widths):
        ctx.mark_width(node)
    return None


@register(*aten_ops("_assert_tensor_metadata.default", "_assert_scalar.default", "sym_constrain_range_for_size.default"))
def metadata_check(ctx, node, module):
    """Checks torch.export inserts (dtype, device, size asserts): they return nothing and read no
    values; the slim graph's tensors keep dtype and device."""
    return None
