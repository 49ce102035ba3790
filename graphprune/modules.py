"""Modules the rewrite substitutes where a torch layer cannot express its slim form."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SlimMultiheadAttention"]


class SlimMultiheadAttention(nn.Module):
    """Multi-head attention whose input, inner (heads x head dim) and output widths differ.

    ``nn.MultiheadAttention`` ties all three to ``embed_dim`` and derives its softmax
    scale from the head dim, so a pruned one cannot be expressed with it. This module
    computes the same function as the original with the pruned widths and the original
    scale. Parameters keep the names of ``nn.MultiheadAttention``: one packed
    ``in_proj_weight``, or, when ``kdim`` / ``vdim`` are given (keys and values read
    inputs of their own widths), ``q_proj_weight``, ``k_proj_weight`` and
    ``v_proj_weight``; ``bias_k`` / ``bias_v`` (``add_bias_kv``) and ``add_zero_attn``
    append a key/value token as torch does.

    >>> attn = SlimMultiheadAttention(16, 2, 6, 16, scale=8 ** -0.5, kdim=5, vdim=7, batch_first=True)
    >>> out, _ = attn(torch.randn(2, 3, 16), torch.randn(2, 4, 5), torch.randn(2, 4, 7))
    >>> tuple(out.shape), tuple(attn.k_proj_weight.shape)
    ((2, 3, 16), (12, 5))
    """

    _qkv_same_embed_dim = False  # torch's transformer layers take their fused fast path only without it

    def __init__(self, in_dim: int, num_heads: int, head_dim: int, out_dim: int, *,
                 scale: float, bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, kdim: int | None = None, vdim: int | None = None,
                 add_bias_kv: bool = False, add_zero_attn: bool = False) -> None:
        super().__init__()
        self.in_dim, self.num_heads, self.head_dim, self.out_dim = in_dim, num_heads, head_dim, out_dim
        self.scale, self.batch_first, self.dropout = scale, batch_first, dropout
        self.add_zero_attn = add_zero_attn
        inner = num_heads * head_dim
        if kdim is None and vdim is None:
            self.kdim = self.vdim = in_dim
            self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, in_dim))
            nn.init.xavier_uniform_(self.in_proj_weight)
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.kdim, self.vdim = kdim or in_dim, vdim or in_dim
            self.register_parameter("in_proj_weight", None)
            for attr, width in (("q_proj_weight", in_dim), ("k_proj_weight", self.kdim),
                                ("v_proj_weight", self.vdim)):
                setattr(self, attr, nn.Parameter(nn.init.xavier_uniform_(torch.empty(inner, width))))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        if add_bias_kv:
            self.bias_k = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, 1, inner)))
            self.bias_v = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, 1, inner)))
        else:
            self.bias_k = self.bias_v = None
        self.out_proj = nn.Linear(inner, out_dim, bias=bias)

    @classmethod
    def from_sliced(cls, mha: nn.MultiheadAttention, num_heads: int, head_dim: int,
                    scale: float) -> SlimMultiheadAttention:
        """Wrap the (already sliced) parameters of ``mha``."""
        packed = mha.in_proj_weight is not None
        w_q = mha.in_proj_weight if packed else mha.q_proj_weight
        new = cls(w_q.shape[1], num_heads, head_dim, mha.out_proj.weight.shape[0], scale=scale,
                  bias=mha.in_proj_bias is not None, batch_first=mha.batch_first,
                  dropout=mha.dropout, kdim=None if packed else mha.k_proj_weight.shape[1],
                  vdim=None if packed else mha.v_proj_weight.shape[1],
                  add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn)
        names = ["in_proj_weight"] if packed else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        for name in [*names, "in_proj_bias", "bias_k", "bias_v"]:
            setattr(new, name, getattr(mha, name))
        new.out_proj.weight = mha.out_proj.weight
        new.out_proj.bias = mha.out_proj.bias
        return new.train(mha.training)  # an eval model's attention keeps its dropout off

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        inner = self.num_heads * self.head_dim
        if self.in_proj_weight is not None:
            w_q, w_k, w_v = self.in_proj_weight.split(inner)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.split(inner) if self.in_proj_bias is not None else (None,) * 3
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        batch, n_q = q.shape[0], q.shape[1]
        extra = [] if self.bias_k is None else [(self.bias_k, self.bias_v)]
        if self.add_zero_attn:
            extra.append((k.new_zeros(1, 1, inner), v.new_zeros(1, 1, inner)))
        for bk, bv in extra:  # one more key/value token; masks let it through
            k = torch.cat([k, bk.expand(batch, 1, inner)], 1)
            v = torch.cat([v, bv.expand(batch, 1, inner)], 1)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        n_k = k.shape[1]
        q, k, v = (t.reshape(batch, -1, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 3 else attn_mask.unsqueeze(0)
            mask = mask.view(-1, self.num_heads, n_q, n_k) if mask.shape[0] != 1 else mask.unsqueeze(1)
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        elif is_causal:
            causal = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        if key_padding_mask is not None:
            pad = key_padding_mask.view(batch, 1, 1, n_k)
            scores = scores.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool else scores + pad
        attn = scores.softmax(-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, self.dropout)
        out = (attn @ v).transpose(1, 2).reshape(batch, n_q, inner)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.mean(1) if average_attn_weights else attn
        return out, weights

    def extra_repr(self) -> str:
        widths = "" if self.in_proj_weight is not None else f", kdim={self.kdim}, vdim={self.vdim}"
        flags = (", add_bias_kv=True" if self.bias_k is not None else "") + \
            (", add_zero_attn=True" if self.add_zero_attn else "")
        return (f"in_dim={self.in_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"out_dim={self.out_dim}{widths}{flags}, scale={self.scale:.4g}, batch_first={self.batch_first}")


def original_scale(mha: nn.MultiheadAttention) -> float:
    return 1.0 / math.sqrt(mha.embed_dim // mha.num_heads)
