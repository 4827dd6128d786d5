"""EGN-style baseline (Yang et al., WACV 2023): a ViT on the spot's patch bridged to the expression of its
nearest training spots (exemplars). Follows the CPU rule of :mod:`~st_predict.benchmark._peer_common`."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from st_predict._utils import InputError
from st_predict.nn import prepare_patches

from ._methods import Fold, _fold_patches, _scaling
from ._peer_common import (
    IMAGE_SIZE,
    LR,
    WEIGHT_DECAY,
    Attention,
    TargetScale,
    check_positive,
    dihedral,
    feed_forward,
    spot_batches,
    train_steps,
)


class _Projector(nn.Module):
    """Their Projector: the spot's feature and the exemplars' (feature, expression) to ``dim``, ``player``
    pre-norm feed-forward layers over the joint tokens, the exemplars' expression projected linearly."""

    def __init__(self, mdim: int, dim: int, player: int, n_genes: int, dropout: float):
        super().__init__()
        self.proq, self.proe = nn.Linear(mdim, dim), nn.Linear(mdim + n_genes, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(player))
        self.ffs = nn.ModuleList(feed_forward(dim, dim, dropout) for _ in range(player))
        self.to_v = nn.Linear(n_genes, dim)

    def forward(self, q, oq, oq_v):
        exp = self.proe(torch.cat((oq, oq_v), -1))
        x = torch.cat((self.proq(q), exp), 1)
        for norm, ff in zip(self.norms, self.ffs, strict=True):
            x = ff(norm(x)) + x
        q, oq = x.split([q.shape[1], exp.shape[1]], 1)
        return q, oq, self.to_v(oq_v)


class _Update(nn.Module):
    """Their Update: gates of the exemplar values from (query - key, key); the query moves by the mean
    gated value, each key by its own."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.query = nn.Sequential(nn.Linear(2 * dim, inner), nn.SiLU(), nn.Linear(inner, 2 * dim))
        self.value = nn.Linear(dim, dim)

    def forward(self, q, k, v):
        value = self.value(v)
        query, key = self.query(torch.cat((q - k, k), 2)).chunk(2, 2)
        return (query.sigmoid() * value).mean(1, keepdim=True) + q, key.sigmoid() * value + k


class _EB(nn.Module):
    """Their exemplar bridging block, on a ``side x side`` token grid (theirs hard-codes 7 x 7): the updated
    exemplar query gates every head's value map cell by cell; the gated maps update the image tokens and,
    averaged over the grid, the query."""

    def __init__(self, dim: int, heads: int, dim_head: int, side: int):
        super().__init__()
        self.heads, self.dim_head, self.cells = heads, dim_head, side * side
        inner = heads * dim_head
        self.update = _Update(dim, 4, dim_head)
        self.to_x = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner))
        self.to_k = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, self.cells * heads))
        self.to_v = nn.Linear(inner, dim, bias=False)
        self.to_n = nn.Linear(inner, dim, bias=False)

    def forward(self, x, q, oq, oq_v):
        b = x.shape[0]
        new_q, new_k = self.update(q, oq, oq_v)
        key = self.to_k(new_q).view(b, self.heads, 1, self.cells)  # (b, heads, 1, cells)
        value = (
            self.to_x(x).view(b, self.cells, self.heads, self.dim_head).permute(0, 2, 3, 1) * key.sigmoid()
        )
        x = self.to_v(value.permute(0, 3, 1, 2).reshape(b, self.cells, -1)) + x
        q = self.to_n(value.mean(-1).reshape(b, 1, -1)) + q
        return x, q, new_k


class _CSRA(nn.Module):
    """Their class-specific residual attention pooling over the tokens (T 0.1, lambda 0.5)."""

    def __init__(self, dim: int, temperature: float = 0.1, lam: float = 0.5):
        super().__init__()
        self.head, self.temperature, self.lam = nn.Linear(dim, dim), temperature, lam

    def forward(self, x):
        score = self.head(x)
        return score.mean(1) + self.lam * (score * torch.softmax(score * self.temperature, dim=1)).sum(1)


class _EGNNet(nn.Module):
    def __init__(
        self,
        n_genes: int,
        mdim: int,
        image_size: int,
        patch: int,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        bhead: int,
        bdim: int,
        bfre: int,
        player: int,
        dropout: float,
        emb_dropout: float,
    ):
        super().__init__()
        self.patch, side = patch, image_size // patch
        self.to_patch_embedding = nn.Linear(3 * patch * patch, dim)
        self.pos_embedding = nn.Parameter(torch.randn(1, side * side + 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.encoder = _Projector(mdim, dim, player, n_genes, dropout)
        self.norm_attn = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.attn = nn.ModuleList(Attention(dim, heads, dim_head, dropout) for _ in range(depth))
        self.eb = nn.ModuleList(
            _EB(dim, bhead, bdim, side) if (i + 1) % bfre == 0 else nn.Identity() for i in range(depth)
        )
        self.norm_ff = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.ff = nn.ModuleList(feed_forward(dim, mlp_dim, dropout) for _ in range(depth))
        self.pool = _CSRA(dim)
        self.mlp_head = nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, n_genes))

    def forward(self, img, ei, ej, yj):
        b, c, hgt, wid = img.shape
        p = self.patch
        x = (
            img.contiguous()
            .view(b, c, hgt // p, p, wid // p, p)
            .permute(0, 2, 4, 3, 5, 1)
            .reshape(b, -1, p * p * c)
        )
        x = self.to_patch_embedding(x)
        pos = self.pos_embedding[:, : x.shape[1]]
        x = self.dropout(x + pos)
        q, oq, oq_v = self.encoder(ei, ej, yj)
        for norm_a, attn, eb, norm_f, ff in zip(
            self.norm_attn, self.attn, self.eb, self.norm_ff, self.ff, strict=True
        ):
            x = attn(norm_a(x + pos)) + x  # theirs adds the position embedding again before every attention
            if isinstance(eb, _EB):
                x, q, oq = eb(x, q, oq, oq_v)
            x = ff(norm_f(x)) + x
        return self.mlp_head(torch.cat((self.pool(x), q[:, 0]), 1))


def pcc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 -`` the mean over genes of the PCC over the batch (theirs: a NaN correlation counts as -1)."""
    xm, ym = pred - pred.mean(0), target - target.mean(0)
    r = (xm * ym).sum(0) / (xm.norm(dim=0) * ym.norm(dim=0) + 1e-8)
    return 1 - torch.nan_to_num(r, nan=-1.0).mean()


def exemplars(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    query_groups: np.ndarray | None = None,
    key_groups: np.ndarray | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Indices ``(n_queries, k)`` of each query's ``k`` nearest keys (L2), nearest first; with groups, only
    keys of other groups (their build_exemplar: a training spot's exemplars come from other sections)."""
    out = []
    for s in range(0, len(queries), chunk):
        d = torch.cdist(queries[s : s + chunk], keys)
        if query_groups is not None:
            same = torch.as_tensor(query_groups[s : s + chunk, None] == key_groups[None, :])
            d = d.masked_fill(same, float("inf"))
        out.append(d.topk(k, dim=1, largest=False).indices)
    return torch.cat(out)


class EGNStyle:
    """EGN-style (Yang et al., WACV 2023; written after reading the version in ``NEXGEM/TRIPLEX``,
    ``src/model/EGN``, ``build_exemplar.py`` and its ``EGNDataset``).

    Each spot's 9 exemplars are the training spots nearest to it in the (standardised) frozen feature
    space: for a training spot, the nearest training spots of the OTHER training sections; for a test
    spot, the nearest of all training spots. A ViT on the spot's patch (16 px patches, so 4 x 4 tokens
    at 64 px; learned position embedding, also added before every attention, as theirs) is bridged every
    ``bfre``-th block to the exemplars: their Projector (the spot's frozen feature ``ei``, the exemplars'
    features ``ej`` and standardised expression ``yj``; 2 feed-forward layers, a linear projection of the
    expression), their Update and EB blocks (``bhead`` heads of ``bdim``; the 7 x 7 grid of theirs made
    the 4 x 4 token grid). CSRA pooling of the tokens; the head (LayerNorm, linear) reads [pooled tokens,
    exemplar query]. Loss, theirs: MSE + 0.5 (1 - mean per-gene PCC over the batch).

    ``sees_context`` is ``False``: its exemplars are training spots found from its own patch's features;
    it never looks at the test section's other spots.

    Kept from theirs: 9 exemplars by L2 distance, exemplars of a training spot from other sections only,
    the architecture (pre-norm attention, heads of 64; EB every 2nd block, 8 heads of 64 as in the
    example of their ``EGN.py``; Projector with 2 layers, their default, and a linear projection; CSRA;
    the head on [pooled, query]), dropout 0, the loss.

    Changed by the CPU rule: 64 px patches with 16 px patch embedding (theirs 224 px / 32: 7 x 7
    tokens); dim 512, 4 blocks, 8 heads, MLP 1024 (TRIPLEX's EGN defaults: dim 1024, 16 blocks, 16
    heads, MLP 2048, EB 16 heads of 128; the example in their ``EGN.py``: 8 blocks, 16 heads, MLP 4096,
    EB 8 heads of 64, 1 Projector layer); the features are the
    runner's frozen trunk's, standardised with the training spots' statistics, for the exemplar search
    and as ``ei`` / ``ej`` (theirs raw UNI features); exemplar expression and targets standardised, no
    clamp of the output at 0 (theirs clamps); AdamW with a one-cycle schedule peaking at 1e-3, 20 epochs
    at batch 32 (theirs AdamW at 1e-4 with ReduceLROnPlateau, batch 128, up to 1000 epochs with early
    stopping on the held-out fold's PCC); one random flip / 90-degree rotation per patch (theirs random
    flips and a random 90-degree rotation), ImageNet normalisation as theirs.
    """

    sees_context = False

    def __init__(
        self,
        image_size: int = IMAGE_SIZE,
        patch_size: int = 16,
        dim: int = 512,
        depth: int = 4,
        heads: int = 8,
        dim_head: int = 64,
        mlp_dim: int = 1024,
        bhead: int = 8,
        bdim: int = 64,
        bfre: int = 2,
        player: int = 2,
        n_exemplars: int = 9,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        corr_weight: float = 0.5,
        epochs: int = 20,
        batch_size: int = 32,
        lr: float = LR,
        weight_decay: float = WEIGHT_DECAY,
        seed: int = 0,
    ):
        check_positive(
            image_size=image_size,
            patch_size=patch_size,
            dim=dim,
            depth=depth,
            heads=heads,
            dim_head=dim_head,
            mlp_dim=mlp_dim,
            bhead=bhead,
            bdim=bdim,
            bfre=bfre,
            n_exemplars=n_exemplars,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
        )
        if image_size % patch_size:
            raise InputError(
                f"EGNStyle: image_size ({image_size}) must be a multiple of patch_size ({patch_size})."
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.dim = dim
        self.depth = depth
        self.heads = heads
        self.dim_head, self.mlp_dim, self.bhead, self.bdim, self.bfre = dim_head, mlp_dim, bhead, bdim, bfre
        self.player, self.k, self.dropout, self.emb_dropout = player, n_exemplars, dropout, emb_dropout
        self.corr_weight, self.epochs, self.batch_size = corr_weight, epochs, batch_size
        self.lr, self.weight_decay, self.seed = lr, weight_decay, seed

    def _feats(self, feats: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((np.asarray(feats) - self.mu_) / self.sd_, dtype=torch.float32)

    def fit(self, fold: Fold) -> None:
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        scale = self.scale_ = TargetScale(fold.y_train)
        steps = spot_batches(len(scale.z), self.batch_size, self.epochs, gen)
        self.mu_, self.sd_ = _scaling(np.asarray(fold.feats_train))
        feats = self.bank_ = self._feats(fold.feats_train)
        groups = np.asarray(fold.groups).astype(str)
        others = min(int((groups != g).sum()) for g in np.unique(groups))
        if others < self.k:
            raise InputError(
                f"EGNStyle needs {self.k} exemplars from other training sections for every training "
                f"spot; a section has only {others} spots outside it (one training section?)."
            )
        ex = exemplars(feats, feats, self.k, groups, groups)
        patches = _fold_patches(fold, fold.train, fold.extra["setup"], self.image_size)
        net = self.net_ = _EGNNet(
            scale.z.shape[1],
            feats.shape[1],
            self.image_size,
            self.patch_size,
            self.dim,
            self.depth,
            self.heads,
            self.dim_head,
            self.mlp_dim,
            self.bhead,
            self.bdim,
            self.bfre,
            self.player,
            self.dropout,
            self.emb_dropout,
        )

        def loss_fn(idx: torch.Tensor) -> torch.Tensor:
            out = net(
                prepare_patches(dihedral(patches[idx], gen)),
                feats[idx, None],
                feats[ex[idx]],
                scale.z[ex[idx]],
            )
            y = scale.z[idx]
            return F.mse_loss(out, y) + self.corr_weight * pcc_loss(out, y)

        train_steps(net, steps, loss_fn, self.lr, self.weight_decay)

    @torch.inference_mode()
    def predict(self, fold: Fold) -> np.ndarray:
        feats = self._feats(fold.feats_test)
        ex = exemplars(feats, self.bank_, self.k)
        patches = _fold_patches(fold, fold.test, fold.extra["setup"], self.image_size)
        net, z = self.net_.eval(), self.scale_.z
        out = [
            net(
                prepare_patches(patches[s : s + 128]),
                feats[s : s + 128, None],
                self.bank_[ex[s : s + 128]],
                z[ex[s : s + 128]],
            )
            for s in range(0, len(patches), 128)
        ]
        return self.scale_.inverse(torch.cat(out))
