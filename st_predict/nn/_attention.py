"""Cross-attention block (NH2ST Eq. 1 and Eq. 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttentionBlock(nn.Module):
    """Pre-norm multi-head attention block with a residual connection and a feed-forward layer.

    ``forward(query, context)`` refines ``query`` (``(B, Lq, D)``) with guidance from ``context``
    (``(B, Lk, D)``): ``x = q + MHA(LN(q), LN(c), LN(c)); x = x + FF(LN(x))``. With ``Lk == 1`` the
    softmax runs over a single key and is identically 1, so the block reduces to a learned
    projection of the context added to the query: that is the paper's single-vector setting. Give
    it several context tokens (``attention_mode="tokens"`` in :class:`~st_predict.module.NH2STModule`)
    for attention that actually weighs something.

    Parameters
    ----------
    dim
        Feature size ``D``.
    n_heads
        Number of attention heads (must divide ``dim``).
    ff_mult
        Width of the feed-forward layer, as a multiple of ``dim``.
    dropout
        Dropout in attention and feed-forward.
    """

    def __init__(self, dim: int, n_heads: int = 8, ff_mult: int = 2, dropout: float = 0.0):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide the latent size {dim}.")
        self.dim = dim
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, n_heads, dropout=dropout, batch_first=True)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_mult * dim, dim)
        )

    def forward(
        self, query: torch.Tensor, context: torch.Tensor, return_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Refine ``query`` by attending over ``context``."""
        kv = self.norm_kv(context)
        if context.shape[1] == 1 and not return_weights and (self.attn.dropout == 0 or not self.training):
            # softmax over a single key is exactly 1: skip the query/key projections (same result)
            w_v = self.attn.in_proj_weight[2 * self.dim :]
            b_v = self.attn.in_proj_bias[2 * self.dim :]
            attended = self.attn.out_proj(F.linear(kv, w_v, b_v))
            weights = None
        else:
            attended, weights = self.attn(self.norm_q(query), kv, kv, need_weights=return_weights)
        x = query + attended
        x = x + self.ff(self.norm_ff(x))
        return (x, weights) if return_weights else x
