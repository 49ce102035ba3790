"""Spatial ops: pooling, resizing (upsample, interpolate) and padding.

Channel flow: the leading (batch, channel) axes pass through; the spatial axes are new
(unlabelled). These ops mix values along their spatial axes, so removal is exact as
long as those axes carry no channels; where one does (a channels-last ``[B, N, C]``
tensor through ``avg_pool1d`` or ``F.interpolate``), its channels are pinned.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphprune.rules.base import Multi, aten_ops, register, unlabelled


def _spatial(n_spatial: int | None):
    def build(ctx, node, module):
        labels = ctx.labels(node.args[0] if node.args else node.kwargs.get("input"))
        out_shape = ctx.shape(node)
        if labels is None or not isinstance(out_shape, torch.Size):
            return None
        k = n_spatial if n_spatial is not None else max(len(out_shape) - 2, 0)
        keep = len(out_shape) - k
        for lab in labels[keep:]:  # values are mixed along these axes: channels there cannot go
            ctx.pin(lab, f"{ctx.describe_node()} pools or resamples a channel axis")
        return tuple(labels[:keep]) + (None,) * k
    build.__name__ = f"spatial{n_spatial or ''}d"
    return build


for _k, _mods, _fns, _aten in (
    (1, (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d),
     (F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d),
     ("max_pool1d.default", "avg_pool1d.default", "adaptive_avg_pool1d.default")),
    (2, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d),
     (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d),
     ("max_pool2d.default", "avg_pool2d.default", "adaptive_avg_pool2d.default",
      "_adaptive_avg_pool2d.default")),
    (3, (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d),
     (F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d),
     ("max_pool3d.default", "avg_pool3d.default", "adaptive_avg_pool3d.default", "_adaptive_avg_pool3d.default")),
):
    register(*_mods, *_fns, *aten_ops(*_aten))(_spatial(_k))
register(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate,
         F.upsample, F.upsample_nearest, F.upsample_bilinear,
         *aten_ops("upsample_nearest2d.vec", "upsample_bilinear2d.vec", "upsample_nearest2d.default",
                   "upsample_bilinear2d.default", "upsample_nearest1d.vec", "upsample_linear1d.vec"))(
    _spatial(None))


def _with_indices(n_spatial: int):
    spatial = _spatial(n_spatial)

    def build(ctx, node, module):
        """(output, indices): the indices are positions in each channel's own plane."""
        x = node.args[0]
        labels, out_shape = ctx.labels(x), ctx.shape(node)[0]
        if labels is None:
            return None
        k = len(out_shape) - n_spatial
        for lab in labels[k:]:
            ctx.pin(lab, f"{ctx.describe_node()} pools or resamples a channel axis")
        out = tuple(labels[:k]) + (None,) * n_spatial
        return Multi([out, out])
    build.__name__ = f"{spatial.__name__}_with_indices"
    return build


register(*aten_ops("max_pool2d_with_indices.default"))(_with_indices(2))
register(*aten_ops("max_pool3d_with_indices.default"))(_with_indices(3))


@register(*aten_ops("grid_sampler_2d.default"))
def grid_sample(ctx, node, module):
    """``F.grid_sample`` (input [N, C, H, W], grid [N, Ho, Wo, 2]): each channel is sampled on
    its own (exact); positions along the input's spatial axes and every axis of the grid are
    coordinates, so channels found there are pinned."""
    x, grid = node.args[0], node.args[1]
    labels, g_labels = ctx.labels(x), ctx.labels(grid)
    labels = labels if labels is not None else unlabelled(ctx.shape(x))
    for lab in labels[2:]:
        ctx.pin(lab, f"{ctx.describe_node()} samples along a channel axis")
    if g_labels is not None:
        for lab in g_labels[1:]:
            ctx.pin(lab, f"{ctx.describe_node()} reads coordinates from a channel axis")
    batch = ctx.couple([labels[0], g_labels[0] if g_labels is not None else None], ctx.shape(node)[0],
                       f"{ctx.describe_node()} samples a batch with a non-channel axis")
    return (batch, labels[1]) + (None,) * (len(ctx.shape(node)) - 2)


@register(F.pad, *aten_ops("constant_pad_nd.default", "reflection_pad1d.default", "reflection_pad2d.default",
                           "reflection_pad3d.default", "replication_pad1d.default", "replication_pad2d.default",
                           "replication_pad3d.default"))
def pad(ctx, node, module):
    """Padding of spatial axes keeps channels; an axis padded by (0, 0) is untouched (Swin
    pads ``[B, H, W, C]`` with ``(0, 0, ...)``); padding or cropping a channel axis pins it.
    The ATen reflection and replication pads (``padding`` the last 1-3 axes, as ``F.pad``)
    copy positions along the padded axes, which are pinned the same way."""
    labels = ctx.labels(node.args[0])
    widths = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
    n = len(widths) // 2
    out = list(labels)
    for i in range(n):
        d = len(out) - 1 - i
        if widths[2 * i] == 0 and widths[2 * i + 1] == 0:  # literal zeros (a node is never == 0)
            continue
        ctx.pin(out[d], f"{ctx.describe_node()} pads a channel axis")
        out[d] = None
    return tuple(out)
