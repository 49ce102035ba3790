"""Normalisation layers: BatchNorm, InstanceNorm, LayerNorm, RMSNorm, GroupNorm.

Channel flow: per-channel parameters and running statistics follow their channel.
What each says about values along a channel axis:

- BatchNorm with running statistics is per channel: exact. With batch statistics
  (training mode, or none tracked) and InstanceNorm, statistics run over the other
  axes: exact while those carry no channels, inexact where they do (weight
  standardisation: ``F.batch_norm`` over a weight reshaped to ``[1, out, in*k*k]``).
- LayerNorm / RMSNorm take statistics over the normalised (channel) axes, so removing
  a channel changes the others: inexact, with that reason.
- GroupNorm takes statistics within each normalisation group: whole groups are pruned,
  which is exact; with one group it is inexact like LayerNorm.
"""

from __future__ import annotations

import operator

import torch.nn as nn
import torch.nn.functional as F

from graphprune.rules.base import NORM, Multi, Operands, aten_ops, register, unlabelled

_BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_RMS = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()

BATCH_NORM_MODULE = Operands(weight="weight", bias="bias", running_mean="running_mean",
                             running_var="running_var", eps="eps")
# F.batch_norm / F.instance_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
BATCH_NORM_FUNCTION = Operands(running_mean=1, running_var=2, weight=3, bias=4, training=5, eps=7)
# aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, ...)
BATCH_NORM_ATEN = Operands(weight=1, bias=2, running_mean=3, running_var=4, training=5, eps=7)
# aten._native_batch_norm_legit_no_training(input, weight, bias, running_mean, running_var, momentum, eps)
BATCH_NORM_NO_TRAINING = Operands(weight=1, bias=2, running_mean=3, running_var=4, eps=6)
_PER_CHANNEL = ("weight", "bias", "running_mean", "running_var")


def norm_core(ctx, x, params, statistics: str = "none"):
    """Couple a channel-first input's axis 1 to per-channel parameters.

    ``statistics`` says over which axes the op computes its statistics at run time:
    ``"batch"`` (every axis but 1: BatchNorm in training mode or without running
    statistics), ``"instance"`` (axes 2 and on: InstanceNorm), ``"none"`` (running
    statistics). Channels on such an axis (a weight reshaped to ``[1, out, in*k*k]`` for
    weight standardisation) change the statistics when they go: inexact.
    """
    x_lab = ctx.labels(x)
    size = ctx.shape(x)[1]
    coupled = ctx.couple([x_lab[1] if x_lab else None, *params], size,
                         f"{ctx.describe_node()} normalises a non-channel axis")
    if x_lab and statistics != "none":
        for d, lab in enumerate(x_lab):
            if d != 1 and (statistics == "batch" or d >= 2):
                ctx.inexact(lab, f"{ctx.describe_node()} takes statistics over channels")
    return x_lab[:1] + (coupled,) + x_lab[2:]


def _resize_norm(module: nn.Module) -> None:
    """``num_features`` from the sliced tensors (a module the graph calls gets ``_norm_patch``,
    which also covers one without tensors)."""
    ref = module.weight if module.weight is not None else module.running_mean
    if ref is not None:
        module.num_features = ref.shape[0]


def _norm_patch(rw, node) -> None:
    """``num_features`` follows the slim input (InstanceNorm often has no tensor to slice)."""
    rw.module(node).num_features = rw.new_shape(node.args[0])[1]


@register(*_BATCH_NORM, resize=_resize_norm, patch=_norm_patch, operands=BATCH_NORM_MODULE, kind=NORM)
def batch_norm(ctx, node, module):
    """BatchNorm / InstanceNorm: per-channel weight, bias and running statistics."""
    params = [ctx.operand_param(a, 0, "pass") for a in _PER_CHANNEL]
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        statistics = "instance" if module.training or not module.track_running_stats else "none"
    else:
        statistics = "batch" if module.training or module.running_mean is None else "none"
    return norm_core(ctx, node.args[0], [p for p in params if p is not None], statistics)


def _operand_labels(ctx, names):
    """Labels of the named tensor operands the call gives (each noted as that operand), in order."""
    found = []
    for name in names:
        t = ctx.operand(name)
        lab = ctx.labels(t) if t is not None else None
        if lab:
            ctx.note_operand(t, name)
            found.append(lab)
    return found


def _function_params(ctx):
    """Labels of the per-channel tensor operands, in argument order."""
    ops = ctx.rule.operands
    names = sorted((n for n in _PER_CHANNEL if getattr(ops, n) is not None), key=lambda n: getattr(ops, n))
    return [lab[0] for lab in _operand_labels(ctx, names)]


@register(F.batch_norm, operands=BATCH_NORM_FUNCTION, kind=NORM)
def batch_norm_function(ctx, node, module):
    """F.batch_norm with free per-channel tensors (batch statistics when ``training``)."""
    batch = ctx.operand("training", False) or ctx.operand("running_mean") is None
    return norm_core(ctx, node.args[0], _function_params(ctx), "batch" if batch else "none")


@register(F.instance_norm, operands=BATCH_NORM_FUNCTION, kind=NORM)
def instance_norm_function(ctx, node, module):
    """F.instance_norm (its ``use_input_stats`` sits where ``training`` does in F.batch_norm)."""
    own = ctx.operand("training", True) or ctx.operand("running_mean") is None
    return norm_core(ctx, node.args[0], _function_params(ctx), "instance" if own else "none")


@register(*aten_ops("batch_norm.default"), operands=BATCH_NORM_ATEN, kind=NORM)
def aten_batch_norm(ctx, node, module):
    """aten.batch_norm(input, weight, bias, running_mean, running_var, training, ...)."""
    batch = ctx.operand("training", False) or ctx.operand("running_mean") is None
    return norm_core(ctx, node.args[0], _function_params(ctx), "batch" if batch else "none")


@register(*aten_ops("_native_batch_norm_legit_no_training.default"), operands=BATCH_NORM_NO_TRAINING,
          kind=NORM)
def aten_batch_norm_no_training(ctx, node, module):
    """Returns (output, mean, rstd); only the output carries channels."""
    out = norm_core(ctx, node.args[0], _function_params(ctx))
    return Multi([out] + [unlabelled(s) for s in ctx.shape(node)[1:]])


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


def _resize_layer_norm(module: nn.Module) -> None:
    if getattr(module, "weight", None) is not None:
        module.normalized_shape = tuple(module.weight.shape)


def _layer_norm_patch(rw, node):
    new = rw.new_shape(node)
    module = rw.module(node)
    if module is not None:
        n = len(module.normalized_shape)
        module.normalized_shape = tuple(new[len(new) - n:])
    else:
        shape = rw.operand(node, "normalized_shape")
        n = 1 if isinstance(shape, int) else len(shape)
        rw.set_operand(node, "normalized_shape", tuple(new[len(new) - n:]))


def first_call_labels(ctx, node):
    """Output labels of the first call of ``node``'s module, or None if this is it.

    Calls of one module share its width attributes (``normalized_shape``,
    ``num_groups``), with or without affine parameters to tie them, so their channels
    must be pruned together.
    """
    first = next(n for n in node.graph.nodes if n.op == "call_module" and n.target == node.target)
    return None if first is node else ctx.node_labels.get(first.name)


@register(nn.LayerNorm, *_RMS, resize=_resize_layer_norm, patch=_layer_norm_patch,
          operands=Operands(weight="weight", bias="bias", eps="eps"), kind=NORM)
def layer_norm(ctx, node, module):
    """LayerNorm / RMSNorm: affine parameters follow the normalised axes (inexact)."""
    n = len(module.normalized_shape)
    params = []
    for attr in ("weight", "bias"):
        if getattr(module, attr, None) is not None:
            params.append([ctx.operand_param(attr, k, "pass") for k in range(n)])
    before = first_call_labels(ctx, node)
    if isinstance(before, tuple) and len(before) >= n:
        params.append(list(before[len(before) - n:]))
    return _layer_norm_core(ctx, node.args[0], params, n)


# F.layer_norm(input, normalized_shape, weight, bias, eps); F.rms_norm(input, normalized_shape, weight, eps)
LAYER_NORM_FUNCTION = Operands(normalized_shape=1, weight=2, bias=3, eps=4)
RMS_NORM_FUNCTION = Operands(normalized_shape=1, weight=2, eps=3)


def _layer_norm_function(ctx, node, module):
    shape = ctx.operand("normalized_shape")
    n = 1 if isinstance(shape, int) else len(shape)
    params = [list(lab) for lab in _operand_labels(ctx, ("weight", "bias"))]
    return _layer_norm_core(ctx, node.args[0], params, n)


register(F.layer_norm, *aten_ops("layer_norm.default"), patch=_layer_norm_patch,
         operands=LAYER_NORM_FUNCTION, kind=NORM)(_layer_norm_function)
if hasattr(F, "rms_norm"):
    register(F.rms_norm, *aten_ops("rms_norm.default"), patch=_layer_norm_patch,
             operands=RMS_NORM_FUNCTION, kind=NORM)(_layer_norm_function)


def _resize_group_norm(module: nn.GroupNorm) -> None:
    if module.weight is not None:
        per_group = module.num_channels // module.num_groups
        module.num_channels = module.weight.shape[0]
        if module.num_groups > 1:
            module.num_groups = module.num_channels // per_group


def _group_norm_patch(rw, node):
    """Widths from the slim input, not the weight: a GroupNorm without affine parameters
    has no sliced tensor, yet its ``num_groups`` must shrink with its input. With one
    group, channels go one by one (inexact) and the one group stays."""
    module = rw.module(node)
    per_group = module.num_channels // module.num_groups
    module.num_channels = rw.new_shape(node)[1]
    if module.num_groups > 1:
        module.num_groups = module.num_channels // per_group


@register(nn.GroupNorm, resize=_resize_group_norm, patch=_group_norm_patch,
          operands=Operands(weight="weight", bias="bias", eps="eps"), kind=NORM)
def group_norm(ctx, node, module):
    """GroupNorm: whole normalisation groups are pruned, which keeps it exact."""
    labels = list(ctx.labels(node.args[0]))
    c, g = module.num_channels, module.num_groups
    before = first_call_labels(ctx, node)  # calls share num_groups: tie their channels
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
    params = [ctx.operand_param(a, 0, "pass") for a in ("weight", "bias")]
    labels[1] = ctx.couple([labels[1], *[p for p in params if p is not None]], c,
                           f"{ctx.describe_node()} on a non-channel axis")
    return tuple(labels)


# F.group_norm(input, num_groups, weight, bias, eps); aten.group_norm(..., eps, cudnn_enabled)
GROUP_NORM_FUNCTION = Operands(groups=1, weight=2, bias=3, eps=4)


def _group_norm_function_patch(rw, node):
    """``num_groups`` shrinks with the channels (whole groups go; one group stays one)."""
    groups = rw.operand(node, "groups")
    if groups > 1:
        per_group = rw.old_shape(node)[1] // groups
        rw.set_operand(node, "groups", rw.new_shape(node)[1] // per_group)


@register(F.group_norm, *aten_ops("group_norm.default"), patch=_group_norm_function_patch,
          operands=GROUP_NORM_FUNCTION, kind=NORM)
def group_norm_function(ctx, node, module):
    """F.group_norm: whole normalisation groups are pruned (exact); one group is inexact."""
    return _group_norm_labels(ctx, list(ctx.labels(node.args[0])), ctx.shape(node)[1])


def _group_norm_labels(ctx, labels, c):
    groups = ctx.operand("groups")
    lab = labels[1] if len(labels) > 1 else None
    if lab is None or not isinstance(groups, int):
        if lab is not None:
            ctx.pin(lab, f"{ctx.describe_node()} takes num_groups from a run-time value")
        return tuple(labels)
    if groups > 1:
        ctx.factorize(lab.reshape(groups, c // groups), free=0)
    else:
        ctx.inexact(lab, f"{ctx.describe_node()} normalises over all channels")
    params = [t_lab[0] for t_lab in _operand_labels(ctx, ("weight", "bias"))]
    labels[1] = ctx.couple([lab, *params], c, f"{ctx.describe_node()} on a non-channel axis")
    return tuple(labels)


# --- the core ATen forms torch.export decomposes norms to -------------------------------------

# aten._native_batch_norm_legit(input, weight, bias, running_mean, running_var, training, momentum, eps)
BATCH_NORM_LEGIT = Operands(weight=1, bias=2, running_mean=3, running_var=4, training=5, eps=7)
# aten._native_batch_norm_legit.no_stats(input, weight, bias, training, momentum, eps)
BATCH_NORM_NO_STATS = Operands(weight=1, bias=2, training=3, eps=5)
# aten.native_layer_norm(input, normalized_shape, weight, bias, eps)
NATIVE_LAYER_NORM = Operands(normalized_shape=1, weight=2, bias=3, eps=4)
# aten.native_group_norm(input, weight, bias, N, C, HxW, group, eps); C is a literal width
NATIVE_GROUP_NORM = Operands(weight=1, bias=2, groups=6, eps=7)
_NATIVE_GROUP_NORM_C = 4


def _statistics_only_read_by_getitem(ctx, node, labels):
    """The statistics outputs (1, 2) of a native norm are for backward passes; one that is read
    (not just the output 0) is not followed: the channels are pinned."""
    for user in node.users:
        if not (user.target is operator.getitem and (user.args[1] == 0 or not user.users)):
            ctx.pin_all(labels, f"{ctx.describe_node()} has its saved statistics read")
            return


@register(*aten_ops("_native_batch_norm_legit.default"), operands=BATCH_NORM_LEGIT, kind=NORM)
@register(*aten_ops("_native_batch_norm_legit.no_stats"), operands=BATCH_NORM_NO_STATS, kind=NORM)
def aten_batch_norm_legit(ctx, node, module):
    """Returns (output, saved mean, saved inverse std); with ``training`` (or no running
    statistics) the statistics are the batch's; the saved ones are per channel when taken."""
    batch = ctx.operand("training", True) or ctx.operand("running_mean") is None
    out = norm_core(ctx, node.args[0], _function_params(ctx), "batch" if batch else "none")
    c = ctx.shape(node)[0][1]
    saved = [(out[1],) if tuple(s) == (c,) else unlabelled(s) for s in ctx.shape(node)[1:]]
    return Multi([out, *saved])


def _native_layer_norm_patch(rw, node):
    shape = rw.operand(node, "normalized_shape")
    new = rw.new_shape(node)[0]
    rw.set_operand(node, "normalized_shape", tuple(new[len(new) - len(shape):]))


@register(*aten_ops("native_layer_norm.default"), patch=_native_layer_norm_patch, operands=NATIVE_LAYER_NORM,
          kind=NORM)
def native_layer_norm(ctx, node, module):
    """Returns (output, mean, rstd); mean and rstd keep the other axes, the normalised ones
    become size 1."""
    out = _layer_norm_function(ctx, node, module)
    n = len(ctx.operand("normalized_shape"))
    stats = out[:len(out) - n] + (None,) * n
    return Multi([out, stats, stats])


def _native_group_norm_patch(rw, node):
    """The literal channel count ``C`` and ``group`` follow the slim input."""
    groups = rw.operand(node, "groups")
    old_c, new_c = rw.old_shape(node)[0][1], rw.new_shape(node)[0][1]
    rw.set_arg(node, _NATIVE_GROUP_NORM_C, "C", new_c)
    if groups > 1:
        rw.set_operand(node, "groups", new_c // (old_c // groups))


@register(*aten_ops("native_group_norm.default"), patch=_native_group_norm_patch, operands=NATIVE_GROUP_NORM,
          kind=NORM)
def native_group_norm(ctx, node, module):
    """Returns (output, mean [N, group], rstd [N, group]): whole groups are pruned (exact), one
    group is inexact, as ``F.group_norm``; the per-group statistics are not followed."""
    labels = list(ctx.labels(node.args[0]))
    out = _group_norm_labels(ctx, labels, ctx.shape(node)[0][1])
    _statistics_only_read_by_getitem(ctx, node, out)
    stats = (out[0], None)
    return Multi([out, stats, stats])
