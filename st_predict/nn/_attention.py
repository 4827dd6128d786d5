"""Cross-attention block (NH2ST Eq. 1 and Eq. 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from st_predict._utils import InputError


class CrossAttentionBlock(nn.Module):
    r"""Multi-head attention of a query over a context, then a feed-forward layer (pre-norm).

    ``forward(query, context)`` refines ``query`` (``(B, Lq, D)``) with guidance from ``context``
    (``(B, Lk, D)``). Two forms:

    ``residual=False`` (default; the paper's Eq. 1)
        ``a = MHA(LN(q), LN(c), LN(c)); z = a + FF(LN(a))``. The output is built from the context's
        values only; the query enters only through the attention weights. With one context token the
        weights are identically 1 and ``z`` is a function of the context alone. In NH2ST this is what
        keeps the contrastive terms honest: ``z^p = phi(h^p, h^g)`` carries gene information and
        ``z^g = phi(h^g, h^p)`` pathology information, so InfoNCE between them can only be solved by
        predicting one modality from the other, i.e. from the image.
    ``residual=True`` (the authors' code; a labelled option for comparison)
        ``x = q + MHA(LN(q), LN(c), LN(c)); z = x + FF(LN(x))``. Each output then carries its own
        query's features, so ``z^p`` and ``z^g`` both contain ``h^p`` and ``h^g`` and InfoNCE between
        them is solved without looking at the image (a model fed one constant colour drives it to ~0).

    The query, key, value and output projections are separate :class:`~torch.nn.Linear` layers (the
    maths of :class:`torch.nn.MultiheadAttention`). ``single_key=True`` builds the block for one
    context token: the softmax over one key is 1, so the query and key projections (and the query's
    LayerNorm) cannot influence the output and are not created at all (no unused parameters, e.g.
    under DDP).

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
    residual
        Add the query to the attended context (the authors' code), see above.
    single_key
        The context always has one token (``Lk == 1``); see above.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int = 8,
        ff_mult: int = 2,
        dropout: float = 0.0,
        residual: bool = False,
        single_key: bool = False,
    ):
        super().__init__()
        if dim % n_heads:
            raise InputError(f"n_heads={n_heads} must divide the latent size {dim}.")
        self.dim = dim
        self.n_heads = n_heads
        self.dropout = dropout
        self.residual = residual
        self.single_key = single_key
        if single_key:
            self.norm_q = self.q_proj = self.k_proj = None
        else:
            self.norm_q = nn.LayerNorm(dim)
            self.q_proj = nn.Linear(dim, dim)
            self.k_proj = nn.Linear(dim, dim)
        self.norm_kv = nn.LayerNorm(dim)
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
            if lin is not None:
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
        h, d = self.n_heads, self.dim // self.n_heads
        if lk == 1 and (self.single_key or not return_weights):
            # softmax over a single key is exactly 1: the output is the projected value (same result
            # as the full computation; attention dropout drops a head's whole value)
            v = self.v_proj(context).view(b, 1, h, d).expand(b, lq, h, d)
            if p > 0:
                v = v * F.dropout(v.new_ones(b, lq, h, 1), p, True)
            weights = context.new_ones(b, lq, 1) if return_weights else None
            return self.out_proj(v.reshape(b, lq, self.dim)), weights
        if self.single_key:
            raise InputError(f"This attention block was built for one context token (single_key), got {lk}.")
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
        q = query if self.norm_q is None else self.norm_q(query)
        attended, weights = self.attend(q, self.norm_kv(context), return_weights)
        x = query + attended if self.residual else attended
        x = x + self.ff(self.norm_ff(x))
        return (x, weights) if return_weights else x
