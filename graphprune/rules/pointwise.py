"""Ops that keep every axis: activations, dropout, identity, casts, elementwise arithmetic.

Channel flow: output channel ``i`` is input channel ``i``. Broadcasting arithmetic ties
axes of equal size channel by channel (an axis of size 1 broadcasts); every ATen
overload tagged ``torch.Tag.pointwise`` gets that rule, so whatever ``torch.export``
captures of the elementwise opset is covered. Stochastic depth / drop path scale whole
samples (the batch axis), which keeps channels. These ops mix no values across
positions and read no channel count, so removal is exact.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from graphprune.rules.base import Multi, aten_ops, register

_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Threshold,
)
_ACTIVATION_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.softsign,
    F.logsigmoid, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg,
    torch.sqrt, torch.square, torch.sign, torch.log,
    torch.nn.functional.threshold, operator.neg, operator.pos, torch.clone,
)
_ACTIVATION_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "sqrt",
    "square", "sign", "log", "contiguous", "clone", "detach",
    "float", "double", "to", "type_as", "requires_grad_", "hardswish", "silu",
)
_ACTIVATION_ATEN = aten_ops(
    "relu.default", "relu_.default", "relu6.default", "gelu.default", "silu.default",
    "silu_.default", "sigmoid.default", "sigmoid_.default", "tanh.default", "hardswish.default",
    "hardswish_.default", "hardsigmoid.default", "hardtanh.default", "hardtanh_.default",
    "leaky_relu.default", "elu.default", "mish.default", "dropout.default", "dropout_.default",
    "feature_dropout.default", "clone.default",
    "detach.default", "alias.default", "abs.default", "exp.default", "neg.default",
    "sqrt.default", "contiguous.default", "_to_copy.default", "to.dtype", "to.dtype_layout", "to.device",
    "to.other", "type_as.default", "lift_fresh_copy.default",
)


@register(*_ACTIVATION_MODULES, *_ACTIVATION_FUNCTIONS, *_ACTIVATION_METHODS, *_ACTIVATION_ATEN,
          # wrapped functions of packages imported only by models that use them
          "torchvision.ops.stochastic_depth:stochastic_depth", "timm.layers.drop:drop_path")
def pointwise(ctx, node, module):
    """Output channels are the input's channels, position by position."""
    return ctx.labels(node.args[0])


def _resize_prelu(module: nn.PReLU) -> None:
    module.num_parameters = module.weight.shape[0]


@register(nn.PReLU, resize=_resize_prelu)
def prelu(ctx, node, module):
    """PReLU with one slope per channel owns a slice of ``weight`` on axis 0."""
    labels = ctx.labels(node.args[0])
    if module.num_parameters > 1 and labels is not None and len(labels) > 1:
        slope = ctx.module_param(node.target, "weight", 0, "pass")
        coupled = ctx.couple([labels[1], slope], module.num_parameters, f"PReLU {node.target!r}")
        return labels[:1] + (coupled,) + labels[2:]
    return labels


_BINARY = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
    operator.isub, operator.imul, operator.itruediv, operator.floordiv, operator.pow,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div,
    torch.divide, torch.true_divide, torch.maximum, torch.minimum, torch.where, torch.pow,
    torch.lerp, torch.addcmul, torch.clamp, torch.clip,
)
_BINARY_METHODS = (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum",
    "minimum", "where", "masked_fill", "lerp", "clamp", "clamp_", "clip",
)
_BINARY_ATEN = aten_ops(
    "add.Tensor", "add_.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar", "mul.Tensor",
    "mul_.Tensor", "mul.Scalar", "div.Tensor", "div.Scalar", "pow.Tensor_Scalar",
    "maximum.default", "minimum.default", "where.self", "copy.default", "clamp.default", "clamp.Tensor", "clamp_min.default",
    "clamp_max.default",
)


@register(*_BINARY, *_BINARY_METHODS, *_BINARY_ATEN, torch.Tag.pointwise)
def elementwise(ctx, node, module):
    """Broadcasting arithmetic: axes of equal size are tied channel by channel.

    Every tensor argument counts, positional or keyword (``torch.clamp(x, min=lo)``
    with a per-channel ``lo`` ties ``lo``'s channels to ``x``'s). An axis of size 1 broadcasts (a squeeze-excitation gate of shape [N, C, 1, 1]
    ties only its channel axis). Ints from ``x.size()`` pass through untouched.
    """
    out_shape = ctx.shape(node)
    if not isinstance(out_shape, torch.Size):  # arithmetic on numbers: a width stays a width
        if any(ctx.is_width(a) for a in (*node.args, *node.kwargs.values())):
            ctx.mark_width(node)
        return None
    tensors = [a for a in (*node.args, *node.kwargs.values())
               if isinstance(a, torch.fx.Node) and isinstance(ctx.shape(a), torch.Size)]
    ndim = len(out_shape)
    reason = f"combined with a non-channel axis in {ctx.describe_node()}"
    labels = []
    for d, size in enumerate(out_shape):
        arrays = []
        for t in tensors:
            shape, tl = ctx.shape(t), ctx.labels(t)
            k = d - (ndim - len(shape))
            if k >= 0 and shape[k] == size:
                arrays.append(tl[k])
        labels.append(ctx.couple(arrays, size, reason) if arrays else None)
    return tuple(labels)


@register(*aten_ops("native_dropout.default"))
def native_dropout(ctx, node, module):
    """(output, mask): both follow the input channel by channel."""
    labels = ctx.labels(node.args[0])
    return Multi([labels, labels])


@register(*aten_ops("fill.Scalar", "full_like.default"))
def like(ctx, node, module):
    """A constant tensor shaped like its input (``fill``, ``full_like``, what ``zeros_like``
    lowers to): it reads no values, and its axes follow the input's, so its slim shape does."""
    return ctx.labels(node.args[0])
