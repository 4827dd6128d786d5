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

    The query, key, value and output projections are separate :class:`~torch.nn.Linear` layers
    (the same maths as :class:`torch.nn.MultiheadAttention`, whose packed ``in_proj_weight`` would
    receive a full-size gradient even when only the value part is used). With a single context
    token the query and key projections are skipped, so they get no gradient and no optimiser work.

    Parameters
    ----------
    dim
        Feature size ``D``.
    n_heads
        Number of attention heads (must divide ``dim``).
    ff_mult
        Width of the feed-forward layer, as a multiple of ``dim``.
    dropout
        Dropout on the attention weights and in the feed-forward layer.
    """

    def __init__(self, dim: int, n_heads: int = 8, ff_mult: int = 2, dropout: float = 0.0):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide the latent size {dim}.")
        self.dim = dim
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_mult * dim, dim)
        )
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # as torch.nn.MultiheadAttention: Xavier-uniform input projections (here per projection),
        # zero input/output biases
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.out_proj.bias)

    def attend(
        self, query: torch.Tensor, context: torch.Tensor, return_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Multi-head attention of (already normalised) ``query`` over ``context``.

        Returns the attended values ``(B, Lq, D)`` (after the output projection) and, with
        ``return_weights``, the attention weights averaged over heads ``(B, Lq, Lk)``.
        """
        b, lq, lk = query.shape[0], query.shape[1], context.shape[1]
        p = self.dropout if self.training else 0.0
        if lk == 1 and not return_weights and p == 0.0:
            # softmax over a single key is exactly 1: skip the query/key projections (same result)
            return self.out_proj(self.v_proj(context)).expand(b, lq, self.dim), None
        h, d = self.n_heads, self.dim // self.n_heads
        q = self.q_proj(query).view(b, lq, h, d).transpose(1, 2)
        k = self.k_proj(context).view(b, lk, h, d).transpose(1, 2)
        v = self.v_proj(context).view(b, lk, h, d).transpose(1, 2)
        weights = None
        if return_weights:
            attn = torch.softmax(q @ k.transpose(-2, -1) / d**0.5, dim=-1)
            weights = attn.mean(dim=1)
            out = F.dropout(attn, p, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        out = out.transpose(1, 2).reshape(b, lq, self.dim)
        return self.out_proj(out), weights

    def forward(
        self, query: torch.Tensor, context: torch.Tensor, return_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Refine ``query`` by attending over ``context``."""
        attended, weights = self.attend(self.norm_q(query), self.norm_kv(context), return_weights)
        x = query + attended
        x = x + self.ff(self.norm_ff(x))
        return (x, weights) if return_weights else x
