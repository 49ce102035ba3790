"""Layers with weights: convolutions (plain, grouped, depthwise, transposed), Linear, norms.

Module forms and functional forms (``F.conv2d(x, self.w)``) share one core each: the
module form labels the module's parameters, the functional form uses the labels of
its weight argument (a ``get_attr`` node or anything computed from parameters).
"""

from __future__ import annotations

import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from graphprune.rules.base import arg, register

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
         nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _conv_core(ctx, x, w, b, groups: int, transposed: bool, out_shape, weight_node=None):
    """Tie a convolution's input channels to its weight and return its output labels.

    ``groups == 1``: the output is a fresh set of channels; the input channels are the
    weight's input axis. ``groups > 1`` (grouped, depthwise): only whole conv groups
    can go, so each group's input and output channels form one channel class.
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
    elif ctx.grouped_mode == "channels" and not transposed and cin // groups > 1 and xin is not None:
        # The same input and output positions in every conv group: `groups` is kept.
        ipg, opg = cin // groups, cout // groups
        _, in_pos = ctx.factorize(xin.reshape(groups, ipg), free=1)
        ctx.couple([w[1], in_pos], ipg, reason)
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
    batch = x_lab[0] if x_lab is not None else None
    return (batch, out) + (None,) * (len(out_shape) - 2)


def _module_weights(ctx, node, module, out_axis: int, in_axis: int | None):
    name = node.target
    w = [None] * module.weight.dim()
    w[out_axis] = ctx.module_param(name, "weight", out_axis, "out")
    if in_axis is not None:
        w[in_axis] = ctx.module_param(name, "weight", in_axis, "in")
    b = ctx.module_param(name, "bias", 0, "pass")
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


@register(*_CONV, patch=_conv_patch)
def conv(ctx, node, module):
    """nn.ConvNd: weight [out, in/groups, *k]."""
    channels_mode = ctx.grouped_mode == "channels" and module.in_channels // module.groups > 1
    if module.groups == 1 or channels_mode:
        w, b = _module_weights(ctx, node, module, 0, 1)
    else:
        w, b = _module_weights(ctx, node, module, 0, None)
    return _conv_core(ctx, node.args[0], w, b, module.groups, False, ctx.shape(node))


@register(*_CONV_T, resize=_resize_conv)
def conv_transpose(ctx, node, module):
    """nn.ConvTransposeNd: weight [in, out/groups, *k]."""
    name = node.target
    w = [None] * module.weight.dim()
    w[0] = ctx.module_param(name, "weight", 0, "in" if module.groups == 1 else "pass")
    if module.groups == 1:
        w[1] = ctx.module_param(name, "weight", 1, "out")
    b = ctx.module_param(name, "bias", 0, "pass")
    return _conv_core(ctx, node.args[0], w, (b,) if b is not None else None,
                      module.groups, True, ctx.shape(node))


def _patch_groups(index: int, transposed: bool):
    def patch(rw, node):
        groups = arg(node, index, "groups", 1)
        if groups == 1 or rw.info(node).get("grouped") == "channels":
            return
        x = node.args[0]
        old_in, new_in = rw.old_shape(x)[1], rw.new_shape(x)[1]
        rw.set_arg(node, index, "groups", groups * new_in // old_in)
    return patch


def weight_labels(ctx, weight) -> list:
    """Labels of a weight argument with every axis labelled (size-1 axes included)."""
    labels = list(ctx.labels(weight) or ())
    name = ctx.attr_name(weight)
    if name is not None:
        labels = [lab if lab is not None else ctx.param(name, d, "pass") for d, lab in enumerate(labels)]
    return labels


def _functional_conv(transposed: bool):
    def build(ctx, node, module):
        weight, bias = arg(node, 1, "weight"), arg(node, 2, "bias")
        groups = arg(node, 6, "groups", 1)
        if groups > 1 and ctx.grouped_mode == "channels":
            ctx.set_role(weight, 1, "in")
        w = weight_labels(ctx, weight)
        b = weight_labels(ctx, bias) if bias is not None else None
        return _conv_core(ctx, node.args[0], w, b, groups, transposed, ctx.shape(node), weight)
    build.__name__ = "conv_transpose_function" if transposed else "conv_function"
    return build


register(F.conv1d, F.conv2d, F.conv3d, patch=_patch_groups(6, False))(_functional_conv(False))
register(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
         patch=_patch_groups(6, True))(_functional_conv(True))


def _linear_core(ctx, x, w, b, weight_node=None):
    x_lab = ctx.labels(x)
    fin = ctx.shape(x)[-1]
    ctx.couple([w[1], x_lab[-1] if x_lab else None], fin,
               f"input of {ctx.describe_node()} is not a channel axis")
    ctx.set_role(weight_node, 1, "in")
    ctx.set_role(weight_node, 0, "out")
    out = w[0]
    ctx.mark_produced(out)
    if b is not None:
        ctx.couple([b[0], out], len(out), f"bias of {ctx.describe_node()}")
    rest = x_lab[:-1] if x_lab else (None,) * (len(ctx.shape(ctx.node)) - 1)
    return tuple(rest) + (out,)


def _resize_linear(module: nn.Linear) -> None:
    module.out_features, module.in_features = module.weight.shape


@register(nn.Linear, resize=_resize_linear)
def linear(ctx, node, module):
    """nn.Linear: weight [out, in] over the last axis; other axes pass through."""
    w, b = _module_weights(ctx, node, module, 0, 1)
    return _linear_core(ctx, node.args[0], w, b)


@register(F.linear)
def linear_function(ctx, node, module):
    weight, bias = arg(node, 1, "weight"), arg(node, 2, "bias")
    b = weight_labels(ctx, bias) if bias is not None else None
    return _linear_core(ctx, node.args[0], weight_labels(ctx, weight), b, weight)


def _norm_core(ctx, x, params):
    x_lab = ctx.labels(x)
    size = ctx.shape(x)[1]
    coupled = ctx.couple([x_lab[1] if x_lab else None, *params], size,
                         f"{ctx.describe_node()} normalises a non-channel axis")
    return x_lab[:1] + (coupled,) + x_lab[2:]


def _resize_norm(module: nn.Module) -> None:
    ref = module.weight if module.weight is not None else module.running_mean
    if ref is not None:
        module.num_features = ref.shape[0]


@register(*_NORM, resize=_resize_norm)
def batch_norm(ctx, node, module):
    """BatchNorm / InstanceNorm: per-channel weight, bias and running statistics."""
    params = [ctx.module_param(node.target, a, 0, "pass")
              for a in ("weight", "bias", "running_mean", "running_var")]
    return _norm_core(ctx, node.args[0], [p for p in params if p is not None])


@register(F.batch_norm, F.instance_norm)
def batch_norm_function(ctx, node, module):
    names = ("running_mean", "running_var", "weight", "bias")
    params = []
    for i, name in enumerate(names, start=1):
        t = arg(node, i, name)
        lab = ctx.labels(t) if t is not None else None
        if lab:
            params.append(lab[0])
    return _norm_core(ctx, node.args[0], params)
