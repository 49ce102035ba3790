"""Convolutions: plain, grouped, depthwise and transposed; module, functional and ATen forms.

Channel flow: the input channels are the weight's input axis; the output channels are
fresh (a producer). Grouped convolutions (``groups > 1``) lose whole conv groups, or
with ``grouped="channels"`` the same channels from every group. Values are mixed
across the input channels of a group, which is exact: a removed channel is zero;
they are also mixed along the spatial axes, so channels found there (a tensor whose
rows came from a matrix product) are pinned. Nothing here reads a channel count as a
value or takes statistics over channels.
"""

from __future__ import annotations

import math

import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from graphprune.rules.base import LAYER, Operands, aten_ops, is_transposed, operand_shape, register

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

MODULE = Operands(weight="weight", bias="bias", stride="stride", groups="groups", width="out_channels")
MODULE_T = Operands(weight="weight", bias="bias", stride="stride", groups="groups", width="out_channels",
                    transposed=True)
FUNCTION = Operands(weight=1, bias=2, stride=3, groups=6)  # conv1d..3d, aten.convNd
FUNCTION_T = Operands(weight=1, bias=2, stride=3, groups=6, transposed=True)  # conv_transposeNd
# aten.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
# the core ATen form every convolution decomposes to; ``transposed`` is a per-call flag
CONVOLUTION = Operands(weight=1, bias=2, stride=3, groups=8, transposed=6)


def conv_core(ctx, x, w, b, groups: int, transposed: bool, out_shape, weight_node=None):
    """Tie a convolution's input channels to its weight and return its output labels.

    ``groups == 1``: the output is a fresh set of channels; the input channels are the
    weight's input axis. ``groups > 1`` (grouped, depthwise): only whole conv groups
    can go, so each group's input and output channels form one channel class; with
    ``grouped="channels"``, the same positions of every group go, from the input (the
    weight's input axis) and from the output, each on its own. Every call of a module
    shares its weight: an input that is not a channel axis keeps every weight column.
    """
    x_lab = ctx.labels(x)
    xin = x_lab[1] if x_lab is not None else None
    cin, cout = ctx.shape(x)[1], out_shape[1]
    reason = f"input of {ctx.describe_node()} is not a channel axis"
    in_axis, out_axis = (1, 0) if not transposed else (0, 1)
    if groups == 1:
        ctx.couple([w[in_axis], xin], cin, reason)
        ctx.set_role(weight_node, in_axis, "in")
        out = w[out_axis]
        ctx.set_role(weight_node, out_axis, "out")
        ctx.mark_produced(out)
    elif ctx.grouped_mode == "channels" and not transposed and cin // groups > 1:
        # The same input and output positions in every conv group: `groups` is kept.
        ipg, opg = cin // groups, cout // groups
        if xin is not None:
            _, in_pos = ctx.factorize(xin.reshape(groups, ipg), free=1)
            ctx.couple([w[1], in_pos], ipg, reason)
        else:  # every column reads this input (a module called on it and on channels): all stay
            ctx.pin(w[1], reason)
        ctx.set_role(weight_node, 1, "in")
        out = w[0]
        ctx.set_role(weight_node, 0, "out")
        ctx.mark_produced(out)
        if opg > 1:
            ctx.factorize(out.reshape(groups, opg), free=1)
        else:
            ctx.pin(out, f"{ctx.describe_node()} has one output per group")
        ctx.node_info[ctx.node.name] = {"grouped": "channels"}
    else:
        ipg, opg = cin // groups, cout // groups
        if not transposed:
            out = w[0]
            ctx.set_role(weight_node, 0, "out")
            ctx.mark_produced(out)
        else:
            ctx.couple([w[0], xin], cin, reason)
            out = ctx.produce(cout)
        heads = out[::opg]
        ctx.union(out, np.repeat(heads, opg))
        ctx.couple([xin, np.repeat(heads, ipg)], cin, reason)
    if b is not None:
        ctx.couple([b[0], out], cout, f"bias of {ctx.describe_node()}")
    for spatial in (x_lab[2:] if x_lab is not None else ()):  # the kernel mixes positions along them
        ctx.pin(spatial, f"{ctx.describe_node()} convolves along a channel axis")
    batch = x_lab[0] if x_lab is not None else None
    return (batch, out) + (None,) * (len(out_shape) - 2)


def conv_macs(shapes, node, module, rule) -> int:
    """One multiply-add per output element and weight entry of its group: ``out * prod(w[1:])``;
    transposed: ``in * prod(w[1:])``."""
    w = operand_shape(shapes, rule, node, "weight")
    x = shapes.of(node.args[0]) if is_transposed(rule, node) else shapes.of(node)
    if w is None or x is None:
        return 0
    return math.prod(x) * math.prod(w[1:])


def _module_weights(ctx, node, module, out_axis: int, in_axis: int | None):
    w = [None] * module.weight.dim()
    w[out_axis] = ctx.operand_param("weight", out_axis, "out")
    if in_axis is not None:
        w[in_axis] = ctx.operand_param("weight", in_axis, "in")
    b = ctx.operand_param("bias", 0, "pass")
    return w, (b,) if b is not None else None


def _conv_patch(rw, node) -> None:
    """Width attributes of a conv module follow its sliced weight."""
    module = rw.module(node)
    if module.groups > 1 and rw.info(node).get("grouped") == "channels":
        module.in_channels = module.weight.shape[1] * module.groups
        module.out_channels = module.weight.shape[0]
        return
    _resize_conv(module)


def _resize_conv(module: nn.Module) -> None:
    w = module.weight
    transposed = isinstance(module, _CONV_T)
    if transposed:
        per_group = module.in_channels // module.groups
        groups = w.shape[0] // per_group if module.groups > 1 else 1
        module.in_channels, module.out_channels = w.shape[0], w.shape[1] * groups
    else:
        per_group = module.out_channels // module.groups
        groups = w.shape[0] // per_group if module.groups > 1 else 1
        module.in_channels, module.out_channels = w.shape[1] * groups, w.shape[0]
    module.groups = groups


@register(*_CONV, patch=_conv_patch, macs=conv_macs, operands=MODULE, kind=LAYER)
def conv(ctx, node, module):
    """nn.ConvNd: weight [out, in/groups, *k]."""
    groups = ctx.operand("groups")
    channels_mode = ctx.grouped_mode == "channels" and module.in_channels // groups > 1
    w, b = _module_weights(ctx, node, module, 0, 1 if groups == 1 or channels_mode else None)
    return conv_core(ctx, node.args[0], w, b, groups, False, ctx.shape(node))


@register(*_CONV_T, resize=_resize_conv, macs=conv_macs, operands=MODULE_T, kind=LAYER)
def conv_transpose(ctx, node, module):
    """nn.ConvTransposeNd: weight [in, out/groups, *k]."""
    groups = ctx.operand("groups")
    w = [None] * module.weight.dim()
    w[0] = ctx.operand_param("weight", 0, "in" if groups == 1 else "pass")
    if groups == 1:
        w[1] = ctx.operand_param("weight", 1, "out")
    b = ctx.operand_param("bias", 0, "pass")
    return conv_core(ctx, node.args[0], w, (b,) if b is not None else None, groups, True, ctx.shape(node))


def _patch_groups(rw, node):
    """Functional ``groups=`` shrinks with the input when whole conv groups go."""
    groups = rw.operand(node, "groups", 1)
    if groups == 1 or rw.info(node).get("grouped") == "channels":
        return
    x = node.args[0]
    old_in, new_in = rw.old_shape(x)[1], rw.new_shape(x)[1]
    rw.set_operand(node, "groups", groups * new_in // old_in)


def _functional_conv(ctx, node, module):
    """F.convNd / F.conv_transposeNd / aten.convNd / aten.convolution with a free weight (a
    parameter or computed)."""
    weight, bias = ctx.operand("weight"), ctx.operand("bias")
    groups = ctx.operand("groups", 1)
    if groups > 1 and ctx.grouped_mode == "channels":
        ctx.set_role(weight, 1, "in")
    w = ctx.weight_labels(weight)
    b = ctx.weight_labels(bias, "bias") if bias is not None else None
    return conv_core(ctx, node.args[0], w, b, groups, is_transposed(ctx.rule, node), ctx.shape(node), weight)


register(F.conv1d, F.conv2d, F.conv3d, *aten_ops("conv1d.default", "conv2d.default", "conv3d.default"),
         patch=_patch_groups, macs=conv_macs, operands=FUNCTION, kind=LAYER)(_functional_conv)
register(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
         *aten_ops("conv_transpose1d.default", "conv_transpose2d.input", "conv_transpose3d.input"),
         patch=_patch_groups, macs=conv_macs, operands=FUNCTION_T, kind=LAYER)(_functional_conv)
register(*aten_ops("convolution.default"), patch=_patch_groups, macs=conv_macs, operands=CONVOLUTION,
         kind=LAYER)(_functional_conv)
