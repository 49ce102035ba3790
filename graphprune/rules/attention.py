"""Attention: nn.MultiheadAttention (and its slim form) and scaled dot-product attention.

Channel flow: q, k and v share their batch and head axes; q and k share their last
(per-head) axis; the output has v's last axis. ``nn.MultiheadAttention``'s in_proj rows
(or, with ``kdim``/``vdim``, the rows of its separate q, k and v projections, whose
columns read the query, key and value inputs) factor into (q|k|v, head, head dim) and
out_proj reads (head, head dim); ``bias_k``/``bias_v`` follow the k and v rows and the
token ``add_zero_attn`` appends stays zero. Values are
mixed along the per-head axis of q and k (a dot product: exact, a removed channel adds
zero) and the softmax runs over tokens, not channels. The one width read as a value is
the softmax scale ``1 / sqrt(head dim)``: the rewrite keeps the original scale.
"""

from __future__ import annotations

import math

import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from graphprune.modules import SlimMultiheadAttention, original_scale
from graphprune.rules.base import Multi, Operands, arg, aten_ops, register, unlabelled
from graphprune.rules.linear import tie_batch

_SEPARATE = ("q_proj_weight", "k_proj_weight", "v_proj_weight")


def _in_widths(module) -> tuple[int, int, int]:
    """Widths of the query, key and value inputs, from the projection weights."""
    if module.in_proj_weight is not None:
        return (module.in_proj_weight.shape[1],) * 3
    return tuple(getattr(module, attr).shape[1] for attr in _SEPARATE)


def _mha_patch(rw, node):
    """Give a pruned attention module its slim widths, in a SlimMultiheadAttention when
    ``nn.MultiheadAttention`` cannot express them."""
    info = rw.info(node)
    module = rw.module(node)
    if not info:
        return
    heads = int(rw.keep(info["heads"]).sum())
    head_dim = int(rw.keep(info["head_dim"]).sum())
    e_q, e_k, e_v = _in_widths(module)
    if isinstance(module, SlimMultiheadAttention):
        module.num_heads, module.head_dim = heads, head_dim
        module.in_dim, module.kdim, module.vdim = e_q, e_k, e_v
        module.out_dim = module.out_proj.weight.shape[0]
        module.out_proj.in_features, module.out_proj.out_features = heads * head_dim, module.out_dim
        return
    unchanged = (e_q == module.embed_dim and module.out_proj.weight.shape == (module.embed_dim, module.embed_dim)
                 and heads == module.num_heads and head_dim * heads == module.embed_dim)
    if unchanged:  # only the key / value inputs narrowed: nn.MultiheadAttention says so itself
        module.kdim, module.vdim = e_k, e_v
    else:
        rw.replace_module(node, SlimMultiheadAttention.from_sliced(
            module, heads, head_dim, info["scale"]))


def _mha_macs(shapes, node, module, rule) -> int:
    """Projections plus ``q k^T`` and ``attn v``, from the projection weights' shapes."""
    q = shapes.of(node.args[0])
    k = shapes.of(arg(node, 1, "key"))
    packed = shapes.param(f"{node.target}.in_proj_weight")
    if packed is not None:
        w_q = w_k = w_v = (packed[0] // 3, packed[1])
    else:
        w_q, w_k, w_v = (shapes.param(f"{node.target}.{attr}") for attr in _SEPARATE)
    w_out = shapes.param(f"{node.target}.out_proj.weight")
    if q is None or k is None or None in (w_q, w_k, w_v, w_out):
        return 0
    inner, e_out = w_q[0], w_out[0]
    first = 1 if module.batch_first else 0
    n_q, n_k, batch = q[first], k[first], q[1 - first]
    proj = batch * inner * (n_q * w_q[1] + n_k * (w_k[1] + w_v[1])) + batch * n_q * inner * e_out
    n_keys = n_k + (getattr(module, "bias_k", None) is not None) + bool(getattr(module, "add_zero_attn", False))
    return proj + 2 * batch * n_q * n_keys * inner


@register(nn.MultiheadAttention, SlimMultiheadAttention, patch=_mha_patch, macs=_mha_macs,
          operands=Operands(weight="in_proj_weight", bias="in_proj_bias"))
def multihead_attention(ctx, node, module):
    """in_proj rows (or the q, k and v projections' rows) factor into (q|k|v, head, head dim);
    out_proj reads (head, head dim). The query, key and value inputs are read by the columns
    of their projections (one packed ``in_proj_weight``, or ``q_proj_weight``,
    ``k_proj_weight`` and ``v_proj_weight`` of widths ``embed_dim``, ``kdim``, ``vdim``).
    ``bias_k`` / ``bias_v`` append a key and a value token: their channels go with the key
    and value projections' rows. ``add_zero_attn`` appends a zero token, which stays zero
    whatever is removed."""
    name = node.target
    inputs = [arg(node, i, n) for i, n in enumerate(("query", "key", "value"))]
    slim = isinstance(module, SlimMultiheadAttention)
    h, hd = module.num_heads, module.head_dim
    inner = h * hd
    e_out = module.out_dim if slim else module.embed_dim
    reason = f"input of {ctx.describe_node()} is not a channel axis"
    packed = module.in_proj_weight is not None
    if packed:
        cols = ctx.module_param(name, "in_proj_weight", 1, "in")
        for x in inputs:
            lab = ctx.labels(x)
            ctx.couple([cols, lab[-1] if lab else None], len(cols), reason)
        rows = ctx.module_param(name, "in_proj_weight", 0, "out")
    else:
        blocks = []
        for x, attr in zip(inputs, _SEPARATE):
            cols = ctx.module_param(name, attr, 1, "in")
            lab = ctx.labels(x)
            ctx.couple([cols, lab[-1] if lab else None], len(cols), reason)
            blocks.append(ctx.module_param(name, attr, 0, "out"))
        rows = np.concatenate(blocks)
    bias = ctx.module_param(name, "in_proj_bias", 0, "pass")
    if bias is not None:
        ctx.couple([rows, bias], 3 * inner, reason)
    for attr, block in (("bias_k", rows[inner:2 * inner]), ("bias_v", rows[2 * inner:])):
        extra = ctx.module_param(name, attr, 2, "pass")  # [1, 1, inner]: one more key / value token
        if extra is not None:
            ctx.couple([block, extra], inner, reason)
    which, heads, head_dim = ctx.factorize(rows.reshape(3, h, hd))
    ctx.pin(which, f"{ctx.describe_node()}: q, k and v blocks are kept")
    ctx.mark_heads(heads)
    flat = ctx.compose([heads, head_dim]).reshape(-1)
    ctx.couple([ctx.module_param(f"{name}.out_proj", "weight", 1, "in"), flat], inner, reason)
    out = ctx.module_param(f"{name}.out_proj", "weight", 0, "out")
    out_bias = ctx.module_param(f"{name}.out_proj", "bias", 0, "pass")
    if out_bias is not None:
        ctx.couple([out, out_bias], e_out, reason)
    scale = module.scale if slim else original_scale(module)
    ctx.node_info[node.name] = {"heads": heads, "head_dim": head_dim, "scale": scale}
    q_labels = ctx.labels(inputs[0])
    shapes = ctx.shape(node)
    attn_out = (tuple(q_labels[:-1]) if q_labels else (None,) * (len(shapes[0]) - 1)) + (out,)
    return Multi([attn_out, unlabelled(shapes[1])])


def _sdpa_patch(rw, node):
    """Keep the softmax scale of the original head dim when head dims are pruned."""
    if rw.operand(node, "scale") is None:
        q = node.args[0]
        rw.set_operand(node, "scale", 1.0 / math.sqrt(rw.old_shape(q)[-1]))


def _sdpa_macs(shapes, node, module, rule) -> int:
    """``q k^T`` and ``attn v``: ``prod(q[:-1]) * n_k * (d_qk + d_v)``."""
    q, v = shapes.of(node.args[0]), shapes.of(node.args[2])
    if q is None or v is None:
        return 0
    return math.prod(q[:-1]) * v[-2] * (q[-1] + v[-1])


@register(F.scaled_dot_product_attention, *aten_ops("scaled_dot_product_attention.default"),
          patch=_sdpa_patch, macs=_sdpa_macs, operands=Operands(scale=6))
def scaled_dot_product_attention(ctx, node, module):
    """softmax(q k^T) v: q and k share their last axis; q, k, v share batch/head axes."""
    q, k, v = node.args[:3]
    sq, sk, sv = ctx.shape(q), ctx.shape(k), ctx.shape(v)
    lq, lk, lv = ctx.labels(q), ctx.labels(k), ctx.labels(v)
    reason = f"attention axis mixed with a non-channel axis in {ctx.describe_node()}"
    ctx.couple([lq[-1], lk[-1]], sq[-1], reason)
    ctx.couple([lk[-2], lv[-2]], sk[-2], reason)  # keys and values pair up token by token
    ctx.pin(lk[-2], f"{ctx.describe_node()} takes a softmax over keys")
    out_shape = ctx.shape(node)
    batch = tie_batch(ctx, [(sq[:-2], lq[:-2]), (sk[:-2], lk[:-2]), (sv[:-2], lv[:-2])],
                      out_shape[:-2], reason)
    for lab in batch:
        ctx.mark_heads(lab)
    return tuple(batch) + (lq[-2], lv[-1])
