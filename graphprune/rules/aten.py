"""ATen ops, for graphs obtained with ``torch.export`` when symbolic tracing fails.

Most ATen overloads take the arguments of their functional counterparts, so they share
those rules; the few that differ get small adapters here.
"""

from __future__ import annotations

import torch

from graphprune.graph import unlabelled
from graphprune.rules import layers, pointwise, shape, tensor_ops
from graphprune.rules.base import Multi, arg, register

aten = torch.ops.aten


def _ops(*names: str) -> list:
    """Overloads that exist in this torch build (``"relu.default"`` -> aten.relu.default)."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload or "default", None)
        if op is not None:
            found.append(op)
    return found


register(*_ops(
    "relu.default", "relu_.default", "relu6.default", "gelu.default", "silu.default",
    "silu_.default", "sigmoid.default", "sigmoid_.default", "tanh.default", "hardswish.default",
    "hardswish_.default", "hardsigmoid.default", "hardtanh.default", "hardtanh_.default",
    "leaky_relu.default", "elu.default", "mish.default", "dropout.default", "dropout_.default",
    "feature_dropout.default", "clone.default",
    "detach.default", "alias.default", "abs.default", "exp.default", "neg.default",
    "sqrt.default", "clamp.default", "clamp_min.default", "clamp_max.default",
    "contiguous.default", "_to_copy.default", "to.dtype",
))(pointwise.pointwise)
register(*_ops(
    "add.Tensor", "add_.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar", "mul.Tensor",
    "mul_.Tensor", "mul.Scalar", "div.Tensor", "div.Scalar", "pow.Tensor_Scalar",
    "maximum.default", "minimum.default", "where.self",
))(pointwise.elementwise)
register(*_ops("conv1d.default", "conv2d.default", "conv3d.default"),
         patch=layers._patch_groups(6, False))(layers._functional_conv(False))
register(*_ops("conv_transpose1d.default", "conv_transpose2d.input", "conv_transpose3d.input"),
         patch=layers._patch_groups(6, True))(layers._functional_conv(True))
register(*_ops("linear.default"))(layers.linear_function)
register(*_ops("layer_norm.default"), patch=tensor_ops._layer_norm_patch)(tensor_ops.layer_norm_function)
register(*_ops("max_pool1d.default", "avg_pool1d.default", "adaptive_avg_pool1d.default"))(shape._spatial(1))
register(*_ops("max_pool2d.default", "avg_pool2d.default", "adaptive_avg_pool2d.default",
               "_adaptive_avg_pool2d.default"))(shape._spatial(2))
register(*_ops("max_pool3d.default", "avg_pool3d.default", "adaptive_avg_pool3d.default"))(shape._spatial(3))
register(*_ops("upsample_nearest2d.vec", "upsample_bilinear2d.vec", "upsample_nearest2d.default",
               "upsample_bilinear2d.default", "upsample_nearest1d.vec", "upsample_linear1d.vec"))(
    shape._spatial(None))
register(*_ops("cat.default"))(shape.cat)
register(*_ops("stack.default"))(shape.stack)
register(*_ops("split.Tensor", "split_with_sizes.default", "chunk.default"),
         patch=shape._split_patch)(shape.split)
register(*_ops("view.default", "reshape.default", "_unsafe_view.default", "flatten.using_ints",
               "unflatten.int", "squeeze.dim", "squeeze.dims", "squeeze.default",
               "unsqueeze.default"), patch=shape._reshape_patch)(shape.reshape)
register(*_ops("expand.default"), patch=shape._reshape_patch)(tensor_ops.expand)
register(*_ops("permute.default", "transpose.int", "t.default"))(shape.permute)
register(*_ops("mean.dim", "sum.dim_IntList", "amax.default", "amin.default"))(shape.reduction)
register(*_ops("softmax.int", "_softmax.default", "log_softmax.int"))(shape.softmax)
register(*_ops("matmul.default", "bmm.default", "mm.default"))(tensor_ops.matmul)
register(*_ops("scaled_dot_product_attention.default"),
         patch=tensor_ops._sdpa_patch)(tensor_ops.scaled_dot_product_attention)
register(*_ops("unbind.int"))(tensor_ops.unbind)
register(*_ops("roll.default", "flip.default"))(tensor_ops.roll)
register(*_ops("pixel_shuffle.default"))(tensor_ops.pixel_shuffle)
register(*_ops("constant_pad_nd.default"))(shape.pad)


@register(*_ops("batch_norm.default"))
def aten_batch_norm(ctx, node, module):
    """aten.batch_norm(input, weight, bias, running_mean, running_var, training, ...)."""
    params = []
    for i in (1, 2, 3, 4):
        t = node.args[i] if len(node.args) > i else None
        lab = ctx.labels(t) if t is not None else None
        if lab:
            params.append(lab[0])
    return layers._norm_core(ctx, node.args[0], params)


@register(*_ops("_native_batch_norm_legit_no_training.default"))
def aten_batch_norm_no_training(ctx, node, module):
    """Returns (output, mean, rstd); only the output carries channels."""
    out = aten_batch_norm(ctx, node, module)
    shapes = ctx.shape(node)
    return Multi([out] + [unlabelled(s) for s in shapes[1:]])


def _slice_patch(rw, node):
    """aten.slice(x, dim, start, end, step): bounds follow the surviving channels."""
    x = node.args[0]
    labels, shape_ = rw.labels(x), rw.old_shape(x)
    d = shape._dim(arg(node, 1, "dim", 0), len(shape_))
    if labels is None or labels[d] is None:
        return
    start, stop, _ = slice(arg(node, 2, "start", None), arg(node, 3, "end", None)).indices(shape_[d])
    keep = rw.keep(labels[d])
    rw.set_arg(node, 2, "start", int(keep[:start].sum()))
    rw.set_arg(node, 3, "end", int(keep[:stop].sum()))


@register(*_ops("slice.Tensor"), patch=_slice_patch)
def aten_slice(ctx, node, module):
    labels = ctx.labels(node.args[0])
    size = ctx.shape(node.args[0])
    d = shape._dim(arg(node, 1, "dim", 0), len(size))
    step = arg(node, 4, "step", 1)
    out = list(labels)
    if out[d] is not None:
        if step != 1:
            ctx.pin(out[d], f"{ctx.describe_node()} slices a channel axis with a step")
            out[d] = None
        else:
            start, stop, _ = slice(arg(node, 2, "start", None), arg(node, 3, "end", None)).indices(size[d])
            out[d] = out[d][start:stop]
    return tuple(out)


@register(*_ops("select.int"))
def aten_select(ctx, node, module):
    labels = ctx.labels(node.args[0])
    size = ctx.shape(node.args[0])
    d = shape._dim(arg(node, 1, "dim", 0), len(size))
    if labels[d] is not None:
        k = arg(node, 2, "index") % size[d]
        ctx.pin(labels[d][k:k + 1], f"{ctx.describe_node()} picks one channel")
    return tuple(labels[:d]) + tuple(labels[d + 1:])
