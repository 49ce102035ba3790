"""Indexing and shifting: ``x[...]``, ATen slice and select, roll and flip; reading and writing
at positions given by tensors: gather, scatter, index_put, index_select, slice/select_scatter,
diagonal.

Channel flow: an int/slice/None/``...`` index keeps the labels of what it selects and
the slim graph's bounds follow the surviving channels; a strided slice over a whole
channel axis (``x[..., 1::2]``) makes channels go in blocks of the step, so it keeps its
offset; picking one channel, gathering with a tensor index, rolling or flipping a
channel axis reorder or single out channels, so those axes are pinned. No values are
mixed. The positional ATen ops (gather, scatter, index_put, ...) pin the axis whose
positions they read or write where it carries channels, and tie their operands' other
axes position by position where they line up (pinned where they do not).
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx

from graphprune.rules.base import Multi, Operands, arg, aten_ops, norm_dim, register, target_name, unlabelled


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


def _slim_item(keep, item, size):
    """Index item ``item`` (an int or a slice of an axis of ``size``) in the slim model, where
    ``keep`` marks the axis' surviving positions."""
    if isinstance(item, int):
        return int(keep[:item % size].sum())
    if item.step not in (None, 1):  # whole blocks of `step` go (see _strided): same offset, to the end
        return slice(item.indices(size)[0], None, item.step)
    start, stop, _ = item.indices(size)
    return slice(int(keep[:start].sum()), int(keep[:stop].sum()))


def _sliced(ctx, labels, item, size):
    """Labels of one axis cut by slice ``item`` (run-time bounds read from the example)."""
    item = _concrete(ctx, item, labels)
    if labels is None:
        return None
    if item.step not in (None, 1):
        return _strided(ctx, labels, item, size)
    return labels[item]


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
        if keep.all():  # nothing goes on this axis (bounds computed at run time pin theirs)
            new_items.append(it)
            continue
        new_items.append(_slim_item(keep, it, shape[d]))
        k += 1
    if k:
        rw.set_arg(node, 1, "index", tuple(new_items) if isinstance(index, tuple) or len(new_items) > 1 else new_items[0])
    del items


def _strided(ctx, labels, item, size):
    """Labels of ``x[..., start::step]`` on a channel axis (``x[..., ::2]``, ``x[..., 1::2]``: the
    interleaved pairs of rotary embeddings). Channels go in whole blocks of ``step``
    (factorised ``[size // step, step]``, the block index free), so every strided slice
    keeps its offset in the slim model; a slice that stops short of the last block pins."""
    start, stop, step = item.indices(size)
    if step < 1 or size % step or not 0 <= start < step or stop < size - step + start + 1:
        ctx.pin(labels, f"{ctx.describe_node()} slices a channel axis with a step")
        return None
    ctx.factorize(labels.reshape(size // step, step), free=0)
    return labels[start::step]


def _concrete(ctx, item, labels):
    """An index item with run-time numbers (``x[:, :n]``, ``x[:, k]``) as the numbers the example
    gave. Positions the slim graph cannot recompute (numbers that are not widths, which the
    rewrite folds) pin a channel axis they cut."""
    def value(v):
        if not isinstance(v, torch.fx.Node):
            return v
        if not ctx.is_width(v):
            ctx.pin(labels, f"{ctx.describe_node()} indexes a channel axis at a position computed at run time")
        return ctx.shape(v)

    if isinstance(item, slice):
        return slice(value(item.start), value(item.stop), value(item.step))
    return value(item) if isinstance(ctx.shape(item), int) else item


@register(operator.getitem, patch=_getitem_patch)
def getitem(ctx, node, module):
    """Picking a piece of a split, or slicing a tensor with ints, slices, None, ``...``."""
    x, index = node.args
    if isinstance(x, torch.fx.Node) and x.name in ctx.width_axes:  # an entry of x.shape / x.size()
        axes, picked = ctx.width_axes[x.name], list(range(len(ctx.shape(x))))[index]
        if isinstance(picked, int) and picked in axes:
            ctx.mark_width(node)
        elif isinstance(picked, list):
            ctx.width_axes[node.name] = [i for i, d in enumerate(picked) if d in axes]
        return None
    labels = ctx.labels(x)
    shape = ctx.shape(x)
    if isinstance(labels, Multi):
        if isinstance(index, slice):
            return Multi(labels[index])
        return labels[index] if isinstance(index, int) else None
    if not isinstance(shape, torch.Size):
        return None
    out = []
    for d, it in _index_items(index, len(shape)):
        if isinstance(it, torch.fx.Node) and d is not None:
            it = _concrete(ctx, it, labels[d])
        if d is None:
            out.append(None)
        elif isinstance(it, slice):
            out.append(_sliced(ctx, labels[d], it, shape[d]))
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


def _axis(rw, node):
    """``(labels, size, dim)`` of the axis an ATen slice/select cuts, or None if it has no channels."""
    x = node.args[0]
    labels, size = rw.labels(x), rw.old_shape(x)
    d = norm_dim(arg(node, 1, "dim", 0), len(size))
    return None if labels is None or labels[d] is None else (labels[d], size[d], d)


def _aten_slice_item(node):
    return slice(arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1))


def _slice_patch(rw, node):
    """aten.slice(x, dim, start, end, step): bounds follow the surviving channels."""
    found = _axis(rw, node)
    if found is None or rw.keep(found[0]).all():
        return
    new = _slim_item(rw.keep(found[0]), _aten_slice_item(node), found[1])
    rw.set_arg(node, 2, "start", new.start)
    rw.set_arg(node, 3, "end", new.stop)


@register(*aten_ops("slice.Tensor"), patch=_slice_patch)
def aten_slice(ctx, node, module):
    """``x[..., start:end:step]`` as torch.export records it: as the getitem rule."""
    labels = list(ctx.labels(node.args[0]))
    size = ctx.shape(node.args[0])
    d = norm_dim(arg(node, 1, "dim", 0), len(size))
    labels[d] = _sliced(ctx, labels[d], _aten_slice_item(node), size[d])
    return tuple(labels)


def _select_patch(rw, node):
    """aten.select(x, dim, index): the picked channel (kept, it is pinned) moves to its slim position."""
    found = _axis(rw, node)
    if found is not None:
        rw.set_arg(node, 2, "index", _slim_item(rw.keep(found[0]), arg(node, 2, "index"), found[1]))


@register(*aten_ops("select.int"), patch=_select_patch)
def aten_select(ctx, node, module):
    labels = ctx.labels(node.args[0])
    size = ctx.shape(node.args[0])
    d = norm_dim(arg(node, 1, "dim", 0), len(size))
    if labels[d] is not None:
        k = arg(node, 2, "index") % size[d]
        ctx.pin(labels[d][k:k + 1], f"{ctx.describe_node()} picks one channel")
    return tuple(labels[:d]) + tuple(labels[d + 1:])


@register(torch.roll, torch.flip, "roll", "flip", *aten_ops("roll.default", "flip.default"))
def roll(ctx, node, module):
    """Cyclic shifts and flips of spatial axes keep channels; of a channel axis they pin it."""
    labels = ctx.labels(node.args[0])
    name = target_name(node)
    dims = arg(node, 2, "dims", None) if name == "roll" else arg(node, 1, "dims", None)
    if dims is None:
        ctx.pin_all(labels, f"{ctx.describe_node()} shifts the flattened tensor")
        return tuple(None for _ in labels)
    dims = [dims] if isinstance(dims, int) else dims
    out = list(labels)
    for d in dims:
        d = norm_dim(d, len(labels))
        ctx.pin(out[d], f"{ctx.describe_node()} permutes channels")
        out[d] = None
    return tuple(out)


# --- reading and writing at positions given by tensors (core ATen) ---------------------------


def _tensor_labels(ctx, x):
    """Labels of a tensor argument, ``None`` per axis when it carries none."""
    labels = ctx.labels(x)
    return tuple(labels) if isinstance(labels, tuple) else unlabelled(ctx.shape(x))


def _tie_or_pin(ctx, tensors, k, reason):
    """Tie axis ``k`` of ``tensors`` position by position when they all have its size; else pin
    its channels on every one of them (their positions do not line up)."""
    sizes = {ctx.shape(t)[k] for t in tensors}
    arrays = [_tensor_labels(ctx, t)[k] for t in tensors]
    if len(sizes) == 1:
        return ctx.couple(arrays, sizes.pop(), reason)
    for lab in arrays:
        ctx.pin(lab, reason)
    return None


@register(*aten_ops("gather.default"), operands=Operands(dim=1))
def gather(ctx, node, module):
    """``torch.gather(x, dim, index)``: reads ``x`` at positions along ``dim`` (a channel axis
    there is pinned); the other axes of ``x`` and ``index`` line up and are tied; the output
    is shaped like ``index``."""
    x, index = node.args[0], arg(node, 2, "index")
    ndim = len(ctx.shape(x))
    d = norm_dim(ctx.operand("dim"), ndim)
    ctx.pin(_tensor_labels(ctx, x)[d], f"{ctx.describe_node()} reads positions along a channel axis")
    reason = f"{ctx.describe_node()} lines up a channel axis with an axis of its index that is not that channel"
    return tuple(_tensor_labels(ctx, index)[k] if k == d else _tie_or_pin(ctx, [x, index], k, reason)
                 for k in range(ndim))


@register(*aten_ops("scatter.src", "scatter.value", "scatter_add.default", "scatter_reduce.two"),
          operands=Operands(dim=1))
def scatter(ctx, node, module):
    """``x.scatter(dim, index, src)`` (add, reduce): writes ``src`` into ``x`` at positions along
    ``dim``, so that axis of every operand is pinned where it carries channels; the other
    axes line up position by position when ``x``, ``index`` and ``src`` have the same size
    there (tied), else they are pinned."""
    x, index = node.args[0], arg(node, 2, "index")
    src = node.args[3] if len(node.args) > 3 else node.kwargs.get("src", node.kwargs.get("value"))
    tensors = [t for t in (x, index, src) if isinstance(t, torch.fx.Node)]
    ndim = len(ctx.shape(x))
    d = norm_dim(ctx.operand("dim"), ndim)
    for t in tensors:
        ctx.pin(_tensor_labels(ctx, t)[d], f"{ctx.describe_node()} writes at positions along a channel axis")
    reason = f"{ctx.describe_node()} lines up a channel axis with an axis of an operand that is not that channel"
    return tuple(_tensor_labels(ctx, x)[k] if k == d else _tie_or_pin(ctx, tensors, k, reason)
                 for k in range(ndim))


@register(*aten_ops("index_put.default"))
def index_put(ctx, node, module):
    """``x[i0, i1, ...] = values`` as torch.export records it (``index_put(x, indices, values)``):
    the indexed leading axes of ``x`` are positions (pinned), as are the index tensors; the
    trailing axes of ``x`` line up with the trailing axes of ``values`` (tied)."""
    x, indices, values = node.args[0], node.args[1], node.args[2]
    labels = _tensor_labels(ctx, x)
    shape = ctx.shape(x)
    if any(i is None for i in indices):  # an index list with gaps: not followed
        for t in (x, values, *indices):
            if isinstance(t, torch.fx.Node):
                ctx.pin_all(ctx.labels(t), f"{ctx.describe_node()} indexes with a gap in its index list")
        return labels
    k = len(indices)
    for d in range(k):
        ctx.pin(labels[d], f"{ctx.describe_node()} writes at positions along a channel axis")
    for i in indices:
        ctx.pin_all(ctx.labels(i), f"{ctx.describe_node()} takes positions from a channel axis")
    out = list(labels)
    if isinstance(values, torch.fx.Node):
        v_labels, v_shape = _tensor_labels(ctx, values), ctx.shape(values)
        trailing = len(shape) - k
        for j, lab in enumerate(v_labels):
            d = len(shape) - (len(v_shape) - j)  # the axis of x that axis j of values lines up with
            if j >= len(v_shape) - trailing and d >= k and v_shape[j] == shape[d]:
                out[d] = ctx.couple([out[d], lab], shape[d], f"{ctx.describe_node()} writes a non-channel axis")
            else:
                ctx.pin(lab, f"{ctx.describe_node()} writes values along an indexed axis")
    return tuple(out)


@register(*aten_ops("index_select.default"), operands=Operands(dim=1))
def index_select(ctx, node, module):
    """``x.index_select(dim, index)``: picks positions along ``dim`` (a channel axis there is
    pinned); the other axes pass."""
    labels = _tensor_labels(ctx, node.args[0])
    d = norm_dim(ctx.operand("dim"), len(labels))
    ctx.pin(labels[d], f"{ctx.describe_node()} picks channels with a tensor index")
    index = arg(node, 2, "index")
    picked = _tensor_labels(ctx, index)[0] if isinstance(index, torch.fx.Node) else None
    return tuple(labels[:d]) + (picked,) + tuple(labels[d + 1:])


@register(*aten_ops("select_scatter.default"), operands=Operands(dim=2))
@register(*aten_ops("slice_scatter.default"), operands=Operands(dim=2))
def slice_scatter(ctx, node, module):
    """``select_scatter(x, src, dim, index)`` / ``slice_scatter(x, src, dim, start, end, step)``:
    ``src`` is written into a slice of ``x`` along ``dim``; the slice's bounds are positions
    there (pinned); the other axes of ``x`` and ``src`` are tied."""
    x, src = node.args[0], node.args[1]
    labels, s_labels = _tensor_labels(ctx, x), _tensor_labels(ctx, src)
    d = norm_dim(ctx.operand("dim", 0), len(labels))
    reason = f"{ctx.describe_node()} writes into a slice of a channel axis"
    ctx.pin(labels[d], reason)
    rest = list(s_labels)
    if len(rest) == len(labels):  # slice_scatter: src keeps the axis
        ctx.pin(rest[d], reason)
    else:  # select_scatter: src lacks it
        rest.insert(d, None)
    tie = f"{ctx.describe_node()} writes a non-channel axis"
    shape = ctx.shape(x)
    return tuple(labels[d] if k == d else ctx.couple([labels[k], rest[k]], shape[k], tie)
                 for k in range(len(labels)))


@register(*aten_ops("diagonal.default"))
def diagonal(ctx, node, module):
    """``x.diagonal(offset, dim1, dim2)``: positions of two axes are read together (pinned where
    they carry channels); the other axes pass and the diagonal is a new last axis."""
    labels = _tensor_labels(ctx, node.args[0])
    d1 = norm_dim(arg(node, 2, "dim1", 0), len(labels))
    d2 = norm_dim(arg(node, 3, "dim2", 1), len(labels))
    for d in (d1, d2):
        ctx.pin(labels[d], f"{ctx.describe_node()} takes a diagonal across a channel axis")
    return tuple(lab for k, lab in enumerate(labels) if k not in (d1, d2)) + (None,)
