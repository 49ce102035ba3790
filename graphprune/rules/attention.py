"""nn.MultiheadAttention: heads or per-head dims, consistently in q, k, v and out_proj."""

from __future__ import annotations

import torch.nn as nn

from graphprune.graph import unlabelled
from graphprune.modules import SlimMultiheadAttention, original_scale
from graphprune.rules.base import Multi, arg, register


def _mha_patch(rw, node):
    """Replace a pruned MultiheadAttention by an equivalent SlimMultiheadAttention."""
    info = rw.info(node)
    module = rw.module(node)
    if not info or isinstance(module, SlimMultiheadAttention):
        return
    heads = int(rw.keep(info["heads"]).sum())
    head_dim = int(rw.keep(info["head_dim"]).sum())
    unchanged = (module.in_proj_weight.shape[1] == module.embed_dim
                 and module.out_proj.weight.shape == (module.embed_dim, module.embed_dim)
                 and heads == module.num_heads and head_dim * heads == module.embed_dim)
    if not unchanged:
        rw.replace_module(node, SlimMultiheadAttention.from_sliced(
            module, heads, head_dim, info["scale"]))


@register(nn.MultiheadAttention, patch=_mha_patch)
def multihead_attention(ctx, node, module):
    """in_proj rows factor into (q|k|v, head, head dim); out_proj reads (head, head dim)."""
    name = node.target
    inputs = [arg(node, i, n) for i, n in enumerate(("query", "key", "value"))]
    supported = (module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn)
    if not supported:
        reason = f"{ctx.describe_node()} uses kdim/vdim, bias_kv or add_zero_attn"
        for x in inputs:
            ctx.pin_all(ctx.labels(x), reason)
        return unlabelled(ctx.shape(node))
    e, h = module.embed_dim, module.num_heads
    reason = f"input of {ctx.describe_node()} is not a channel axis"
    cols = ctx.module_param(name, "in_proj_weight", 1, "in")
    for x in inputs:
        lab = ctx.labels(x)
        ctx.couple([cols, lab[-1] if lab else None], e, reason)
    rows = ctx.module_param(name, "in_proj_weight", 0, "out")
    bias = ctx.module_param(name, "in_proj_bias", 0, "pass")
    if bias is not None:
        ctx.couple([rows, bias], 3 * e, reason)
    which, heads, head_dim = ctx.factorize(rows.reshape(3, h, e // h))
    ctx.pin(which, f"{ctx.describe_node()}: q, k and v blocks are kept")
    ctx.mark_heads(heads)
    inner = ctx.compose([heads, head_dim]).reshape(-1)
    ctx.couple([ctx.module_param(f"{name}.out_proj", "weight", 1, "in"), inner], e, reason)
    out = ctx.module_param(f"{name}.out_proj", "weight", 0, "out")
    out_bias = ctx.module_param(f"{name}.out_proj", "bias", 0, "pass")
    if out_bias is not None:
        ctx.couple([out, out_bias], e, reason)
    ctx.node_info[node.name] = {"heads": heads, "head_dim": head_dim, "scale": original_scale(module)}
    q_labels = ctx.labels(inputs[0])
    shapes = ctx.shape(node)
    attn_out = (tuple(q_labels[:-1]) if q_labels else (None,) * (len(shapes[0]) - 1)) + (out,)
    return Multi([attn_out, unlabelled(shapes[1])])
