"""Matrix products and attention, axis-moving tensor ops, and channel normalisations."""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphprune.rules.base import Multi, arg, register, target_name
from graphprune.rules.shape import _dim, _reshape_patch


def _tie_batch(ctx, shapes_labels, out_batch_shape, reason):
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


@register(torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm")
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
    batch = _tie_batch(ctx, [(sa[:-2], la[:-2]), (sb[:-2], lb[:-2])], out_shape[:-2], reason)
    for lab in batch:
        ctx.mark_heads(lab)
    return tuple(batch) + (la[-2], lb[-1])


def _sdpa_patch(rw, node):
    """Keep the softmax scale of the original head dim when head dims are pruned."""
    if arg(node, 6, "scale", None) is None:
        q = node.args[0]
        rw.set_arg(node, 6, "scale", 1.0 / math.sqrt(rw.old_shape(q)[-1]))


@register(F.scaled_dot_product_attention, patch=_sdpa_patch)
def scaled_dot_product_attention(ctx, node, module):
    """softmax(q k^T) v: q and k share their last axis; q, k, v share batch/head axes."""
    q, k, v = node.args[:3]
    sq, sk, sv = ctx.shape(q), ctx.shape(k), ctx.shape(v)
    lq, lk, lv = ctx.labels(q), ctx.labels(k), ctx.labels(v)
    reason = f"attention axis mixed with a non-channel axis in {ctx.describe_node()}"
    ctx.couple([lq[-1], lk[-1]], sq[-1], reason)
    out_shape = ctx.shape(node)
    batch = _tie_batch(ctx, [(sq[:-2], lq[:-2]), (sk[:-2], lk[:-2]), (sv[:-2], lv[:-2])],
                       out_shape[:-2], reason)
    for lab in batch:
        ctx.mark_heads(lab)
    return tuple(batch) + (lq[-2], lv[-1])


@register("expand", "expand_as", "repeat", patch=_reshape_patch)
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


@register(torch.unbind, "unbind")
def unbind(ctx, node, module):
    """Slices along one axis: that axis' channels are picked, the rest pass."""
    labels = ctx.labels(node.args[0])
    d = _dim(arg(node, 1, "dim", 0), len(labels))
    ctx.pin(labels[d], f"{ctx.describe_node()} picks channels one by one")
    rest = labels[:d] + labels[d + 1:]
    return Multi(rest for _ in ctx.shape(node))


@register(torch.roll, torch.flip, "roll", "flip")
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
        d = _dim(d, len(labels))
        ctx.pin(out[d], f"{ctx.describe_node()} permutes channels")
        out[d] = None
    return tuple(out)


@register(nn.PixelShuffle, F.pixel_shuffle)
def pixel_shuffle(ctx, node, module):
    """[C r^2, H, W] -> [C, H r, W r]: each output channel owns a block of r^2 inputs."""
    labels = ctx.labels(node.args[0])
    r = module.upscale_factor if module is not None else arg(node, 1, "upscale_factor")
    cin = ctx.shape(node.args[0])[-3]
    lab = labels[-3]
    if lab is None:
        return tuple(None for _ in ctx.shape(node))
    heads = lab[:: r * r]
    ctx.couple([lab, np.repeat(heads, r * r)], cin, f"{ctx.describe_node()} with unlabelled input")
    return tuple(labels[:-3]) + (heads, None, None)


@register(nn.PixelUnshuffle, F.pixel_unshuffle)
def pixel_unshuffle(ctx, node, module):
    labels = ctx.labels(node.args[0])
    r = module.downscale_factor if module is not None else arg(node, 1, "downscale_factor")
    lab = labels[-3]
    return tuple(labels[:-3]) + (None if lab is None else np.repeat(lab, r * r), None, None)


# --- normalisation over channel axes -------------------------------------------------


def _layer_norm_core(ctx, x, params, n_axes):
    labels = list(ctx.labels(x))
    shape = ctx.shape(x)
    for k in range(n_axes):
        d = len(labels) - n_axes + k
        axis_params = [p[k] for p in params if p is not None]
        labels[d] = ctx.couple([labels[d], *axis_params], shape[d],
                               f"{ctx.describe_node()} normalises a non-channel axis")
        ctx.inexact(labels[d], f"{ctx.describe_node()} normalises over channels")
    return tuple(labels)


def _layer_norm_patch(rw, node):
    new = rw.new_shape(node)
    module = rw.module(node)
    if module is not None:
        n = len(module.normalized_shape)
        module.normalized_shape = tuple(new[len(new) - n:])
    else:
        shape = arg(node, 1, "normalized_shape")
        n = 1 if isinstance(shape, int) else len(shape)
        rw.set_arg(node, 1, "normalized_shape", tuple(new[len(new) - n:]))


_RMS = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()


def _first_call_labels(ctx, node):
    """Output labels of the first call of ``node``'s module, or None if this is it.

    Calls of one module share its width attributes (``normalized_shape``,
    ``num_groups``), with or without affine parameters to tie them, so their channels
    must be pruned together.
    """
    first = next(n for n in node.graph.nodes if n.op == "call_module" and n.target == node.target)
    return None if first is node else ctx.node_labels.get(first.name)


@register(nn.LayerNorm, *_RMS, patch=_layer_norm_patch)
def layer_norm(ctx, node, module):
    """LayerNorm / RMSNorm: affine parameters follow the normalised axes (inexact)."""
    n = len(module.normalized_shape)
    params = []
    for attr in ("weight", "bias"):
        if getattr(module, attr, None) is not None:
            params.append([ctx.module_param(node.target, attr, k, "pass") for k in range(n)])
    before = _first_call_labels(ctx, node)
    if isinstance(before, tuple) and len(before) >= n:
        params.append(list(before[len(before) - n:]))
    return _layer_norm_core(ctx, node.args[0], params, n)


@register(F.layer_norm, *((F.rms_norm,) if hasattr(F, "rms_norm") else ()), patch=_layer_norm_patch)
def layer_norm_function(ctx, node, module):
    shape = arg(node, 1, "normalized_shape")
    n = 1 if isinstance(shape, int) else len(shape)
    params = []
    for i, attr in ((2, "weight"), (3, "bias")):
        t = arg(node, i, attr)
        lab = ctx.labels(t) if t is not None else None
        if lab is not None:
            params.append(list(lab))
    return _layer_norm_core(ctx, node.args[0], params, n)


def _group_norm_patch(rw, node):
    """Widths from the slim input, not the weight: a GroupNorm without affine parameters
    has no sliced tensor, yet its ``num_groups`` must shrink with its input. With one
    group, channels go one by one (inexact) and the one group stays."""
    module = rw.module(node)
    per_group = module.num_channels // module.num_groups
    module.num_channels = rw.new_shape(node)[1]
    if module.num_groups > 1:
        module.num_groups = module.num_channels // per_group


@register(nn.GroupNorm, patch=_group_norm_patch)
def group_norm(ctx, node, module):
    """GroupNorm: whole normalisation groups are pruned, which keeps it exact."""
    labels = list(ctx.labels(node.args[0]))
    c, g = module.num_channels, module.num_groups
    before = _first_call_labels(ctx, node)  # calls share num_groups: tie their channels
    if before is not None:
        before = before[1] if isinstance(before, tuple) and len(before) > 1 else None
        labels[1] = ctx.couple([labels[1], before], c,
                               f"{ctx.describe_node()} is also called on a non-channel axis")
    lab = labels[1]
    if lab is None:
        return tuple(labels)
    if g > 1:
        ctx.factorize(lab.reshape(g, c // g), free=0)
    else:
        ctx.inexact(lab, f"{ctx.describe_node()} normalises over all channels")
    params = [ctx.module_param(node.target, a, 0, "pass") for a in ("weight", "bias")]
    labels[1] = ctx.couple([labels[1], *[p for p in params if p is not None]], c,
                           f"{ctx.describe_node()} on a non-channel axis")
    return tuple(labels)
