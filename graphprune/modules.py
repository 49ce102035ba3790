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
    scale. Parameters keep the names of ``nn.MultiheadAttention``.
    """

    _qkv_same_embed_dim = False  # torch's transformer layers take their fused fast path only without it

    def __init__(self, in_dim: int, num_heads: int, head_dim: int, out_dim: int, *,
                 scale: float, bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim, self.num_heads, self.head_dim, self.out_dim = in_dim, num_heads, head_dim, out_dim
        self.scale, self.batch_first, self.dropout = scale, batch_first, dropout
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, in_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, out_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)

    @classmethod
    def from_sliced(cls, mha: nn.MultiheadAttention, num_heads: int, head_dim: int,
                    scale: float) -> SlimMultiheadAttention:
        """Wrap the (already sliced) parameters of ``mha``."""
        w = mha.in_proj_weight
        new = cls(w.shape[1], num_heads, head_dim, mha.out_proj.weight.shape[0], scale=scale,
                  bias=mha.in_proj_bias is not None, batch_first=mha.batch_first,
                  dropout=mha.dropout)
        new.in_proj_weight = mha.in_proj_weight
        new.in_proj_bias = mha.in_proj_bias
        new.out_proj.weight = mha.out_proj.weight
        new.out_proj.bias = mha.out_proj.bias
        return new.train(mha.training)  # an eval model's attention keeps its dropout off

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        inner = self.num_heads * self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.split(inner)
        b_q, b_k, b_v = self.in_proj_bias.split(inner) if self.in_proj_bias is not None else (None,) * 3
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        batch, n_q, n_k = q.shape[0], q.shape[1], k.shape[1]
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
        return (f"in_dim={self.in_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"out_dim={self.out_dim}, scale={self.scale:.4g}, batch_first={self.batch_first}")


def original_scale(mha: nn.MultiheadAttention) -> float:
    return 1.0 / math.sqrt(mha.embed_dim // mha.num_heads)
