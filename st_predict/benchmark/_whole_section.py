"""HisToGene- and His2ST-style baselines: a whole section per step, every spot a token. Both follow the CPU
rule of :mod:`~st_predict.benchmark._peer_common`."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from st_predict._utils import InputError
from st_predict.nn import prepare_patches

from ._methods import Fold, _fold_patches
from ._peer_common import (
    GRID_SIZE,
    IMAGE_SIZE,
    LR,
    WEIGHT_DECAY,
    Stack,
    TargetScale,
    check_positive,
    dihedral,
    fold_spots,
    grid_positions,
    raw_counts,
    section_pitch,
    section_steps,
    sections_of,
    train_steps,
)


class _SectionMethod:
    """One section per optimiser step (rule 3: 100 epochs); prediction: each test section in one forward."""

    sees_context = True

    def __init__(self, image_size: int, epochs: int, lr: float, weight_decay: float, seed: int):
        check_positive(image_size=image_size, epochs=epochs, lr=lr)
        self.image_size = image_size
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed

    def _sections(self, fold: Fold, adata, train: bool) -> list[dict]:
        coords, libs = fold_spots(fold, adata)
        pos = torch.as_tensor(grid_positions(coords, libs))
        patches = _fold_patches(fold, adata, fold.extra["setup"], self.image_size)
        out = []
        for rows in sections_of(libs):
            r = torch.as_tensor(rows)
            out.append({"rows": rows, "x": patches[r], "pos": pos[r]})
        return self._extra(fold, adata, coords, libs, out, train)

    def _extra(self, fold, adata, coords, libs, sections, train):
        return sections

    def _init(self, net: nn.Module, sections: list[dict]) -> None:
        pass

    def fit(self, fold: Fold) -> None:
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        self.scale_ = TargetScale(fold.y_train)
        sections = self._sections(fold, fold.train, train=True)
        for sec in sections:
            sec["y"] = self.scale_.z[torch.as_tensor(sec["rows"])]
        net = self.net_ = self._network(self.scale_.z.shape[1])
        self._init(net, sections)
        steps = section_steps(len(sections), self.epochs, gen)
        train_steps(net, steps, lambda i: self._loss(net, sections[i], gen), self.lr, self.weight_decay)

    @torch.inference_mode()
    def predict(self, fold: Fold) -> np.ndarray:
        net = self.net_.eval()
        out = torch.empty((fold.test.n_obs, self.scale_.z.shape[1]))
        for sec in self._sections(fold, fold.test, train=False):
            out[torch.as_tensor(sec["rows"])] = self._forward(net, sec, prepare_patches(sec["x"]))[0]
        return self.scale_.inverse(out)


class _HisToGeneNet(nn.Module):
    def __init__(
        self,
        n_genes: int,
        image_size: int,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        dropout: float,
        emb_dropout: float,
    ):
        super().__init__()
        self.patch_embedding = nn.Linear(3 * image_size * image_size, dim)
        self.x_embed, self.y_embed = nn.Embedding(GRID_SIZE, dim), nn.Embedding(GRID_SIZE, dim)
        self.dropout = nn.Dropout(emb_dropout)
        self.vit = Stack(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.gene_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, n_genes))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.patch_embedding(x.flatten(1)) + self.x_embed(pos[:, 0]) + self.y_embed(pos[:, 1])
        return self.gene_head(self.vit(self.dropout(h)[None])[0])


class HisToGeneStyle(_SectionMethod):
    """HisToGene-style (Pang et al. 2021; written after reading the version in ``NEXGEM/TRIPLEX``,
    ``src/model/his_to_gene``): every spot of a section is a token, its flattened patch through a linear
    layer plus learned x and y embeddings of its grid position; a ViT over the section; a LayerNorm and
    linear gene head; MSE. Trained one section per step; predicts a whole test section in one forward.

    Kept from theirs: the linear patch embedding of the raw pixels (the paper's; TRIPLEX's copy embeds
    UNI features instead), the position embeddings (``nn.Embedding(64, dim)``), the ViT (pre-norm,
    16 heads of 64, MLP 2 x dim, dropout 0.1, embedding dropout 0.1), the gene head, the MSE loss, a
    section per step.

    Changed by the CPU rule: 64 px patches (theirs 112 px), dim 512 (theirs 1024), 4 blocks (TRIPLEX's
    HisToGene config has 4, the paper 8); patches normalised with ImageNet statistics; standardised
    targets; AdamW with a one-cycle schedule peaking at 1e-3, 100 epochs (the paper: Adam at 1e-5, 100
    epochs; TRIPLEX's runs: AdamW at 1e-4 with early stopping on the held-out fold); one random flip /
    90-degree rotation per patch.
    """

    def __init__(
        self,
        image_size: int = IMAGE_SIZE,
        dim: int = 512,
        depth: int = 4,
        heads: int = 16,
        dim_head: int = 64,
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
        emb_dropout: float = 0.1,
        epochs: int = 100,
        lr: float = LR,
        weight_decay: float = WEIGHT_DECAY,
        seed: int = 0,
    ):
        super().__init__(image_size, epochs, lr, weight_decay, seed)
        check_positive(dim=dim, depth=depth, heads=heads, dim_head=dim_head, mlp_ratio=mlp_ratio)
        self.dim = dim
        self.depth = depth
        self.heads = heads
        self.dim_head = dim_head
        self.mlp_ratio = mlp_ratio
        self.dropout, self.emb_dropout = dropout, emb_dropout

    def _network(self, n_genes: int) -> nn.Module:
        return _HisToGeneNet(
            n_genes,
            self.image_size,
            self.dim,
            self.depth,
            self.heads,
            self.dim_head,
            int(self.dim * self.mlp_ratio),
            self.dropout,
            self.emb_dropout,
        )

    def _forward(self, net, sec, x):
        return (net(x, sec["pos"]),)

    def _loss(self, net, sec, gen):
        return F.mse_loss(self._forward(net, sec, prepare_patches(dihedral(sec["x"], gen)))[0], sec["y"])


class _ConvMixerBlock(nn.Module):
    """Their convmixer block: (depthwise conv, BN, GELU) twice with a residual, then pointwise conv,
    GELU, BN."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        dw = lambda: nn.Conv2d(channels, channels, kernel_size, groups=channels, padding="same")  # noqa: E731
        self.dw = nn.Sequential(
            dw(), nn.BatchNorm2d(channels), nn.GELU(), dw(), nn.BatchNorm2d(channels), nn.GELU()
        )
        self.pw = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.GELU(), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x) + x)


class _GraphSAGE(nn.Module):
    """Their ``gs_block`` with ``gcn=True``, ``policy='mean'``: the mean over the neighbours (a
    row-normalised adjacency), a weight, ReLU, L2 normalisation."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.relu((adj @ x) @ self.weight.T), p=2, dim=1)


class _His2STNet(nn.Module):
    def __init__(
        self,
        n_genes: int,
        image_size: int,
        patch: int,
        channels: int,
        kernel_size: int,
        depths,
        heads: int,
        dim_head: int,
        dropout: float,
    ):
        super().__init__()
        side = image_size // patch
        dim = side * side * (channels // 8)
        d_mix, d_attn, d_graph = depths
        self.patch_embedding = nn.Conv2d(3, channels, patch, patch)
        self.dropout = nn.Dropout(dropout)
        self.mixer = nn.Sequential(*(_ConvMixerBlock(channels, kernel_size) for _ in range(d_mix)))
        self.down = nn.Sequential(nn.Conv2d(channels, channels // 8, 1), nn.Flatten())
        self.x_embed, self.y_embed = nn.Embedding(GRID_SIZE, dim), nn.Embedding(GRID_SIZE, dim)
        self.transformer = Stack(dim, d_attn, heads, dim_head, dim, dropout)
        self.graph = nn.ModuleList(_GraphSAGE(dim) for _ in range(d_graph))
        self.jknet = nn.LSTM(dim, dim, 2)
        self.gene_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, n_genes))
        self.mean, self.disp, self.pi = (nn.Linear(dim, n_genes) for _ in range(3))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, adj: torch.Tensor):
        f = self.down(self.mixer(self.dropout(self.patch_embedding(x))))
        g = self.transformer((f + self.x_embed(pos[:, 0]) + self.y_embed(pos[:, 1]))[None])[0]
        jk = []
        for layer in self.graph:
            g = layer(g, adj)
            jk.append(g)
        h = self.jknet(torch.stack(jk))[0].mean(0)  # jumping knowledge: an LSTM over the blocks' outputs
        mean = torch.clamp(torch.exp(self.mean(h)), 1e-5, 1e6)
        disp = torch.clamp(F.softplus(self.disp(h)), 1e-4, 1e4)
        return self.gene_head(h), (mean, disp, torch.sigmoid(self.pi(h)))


def zinb_loss(
    x: torch.Tensor, mean: torch.Tensor, disp: torch.Tensor, pi: torch.Tensor, size_factor: torch.Tensor
) -> torch.Tensor:
    """Their zero-inflated negative binomial negative log-likelihood (mean over spots and genes) of
    counts ``x`` with the mean scaled by each spot's size factor."""
    eps = 1e-10
    mean = mean * size_factor[:, None]
    t1 = torch.lgamma(disp + eps) + torch.lgamma(x + 1.0) - torch.lgamma(x + disp + eps)
    t2 = (disp + x) * torch.log(1.0 + mean / (disp + eps)) + x * (
        torch.log(disp + eps) - torch.log(mean + eps)
    )
    nb_case = t1 + t2 - torch.log(1.0 - pi + eps)
    zero_nb = torch.pow(disp / (disp + mean + eps), disp)
    zero_case = -torch.log(pi + (1.0 - pi) * zero_nb + eps)
    return torch.where(x <= 1e-8, zero_case, nb_case).mean()


def section_adjacency(
    coords: np.ndarray, libs: np.ndarray, rows: np.ndarray, knn: np.ndarray, pitch: float, radius: float = 1.5
) -> torch.Tensor:
    """Row-normalised directed adjacency of one section's spots: row i has i's K nearest spots within
    ``radius`` pitches (their calcADJ with 'Grid' pruning); a spot with none keeps itself (theirs
    would divide by zero)."""
    local = {int(r): k for k, r in enumerate(rows)}
    adj = torch.zeros((len(rows), len(rows)))
    for k, i in enumerate(rows):
        for j in knn[i]:
            if np.linalg.norm(coords[j] - coords[i]) <= radius * pitch:
                adj[k, local[int(j)]] = 1.0
    lonely = adj.sum(1) == 0
    adj[lonely, lonely] = 1.0
    return adj / adj.sum(1, keepdim=True)


class His2STStyle(_SectionMethod):
    """His2ST-style (Zeng et al. 2022; written after reading ``biomed-AI/Hist2ST``): each spot's patch through
    a convolutional patch embedding and ConvMixer blocks, flattened to a token; learned x and y
    embeddings of its grid position added; a transformer over the section's spots; GraphSAGE-mean blocks
    on the spot graph (each spot's 4 nearest spots of its section within 1.5 pitches, directed, as their
    calcADJ with 'Grid' pruning); jumping knowledge (a 2-layer LSTM over the graph blocks' outputs, mean
    over blocks); a gene head (LayerNorm, linear) with MSE plus their ZINB heads and loss on the raw
    counts of the fold's genes, size factor = a spot's total counts of those genes over their median in
    its section, weight 0.25. One section per step; a whole test section in one forward.

    Kept from theirs: the architecture (patch-embedding conv with kernel = stride, 2 ConvMixer blocks of
    kernel 5, 1 x 1 conv to channels / 8, flatten; pre-norm transformer, 16 heads of 64, MLP width = dim,
    dropout 0.2, also on the patch embedding; 4 GraphSAGE blocks with their ``gcn=True`` mean
    aggregation; the LSTM jumping knowledge), the ZINB activations (mean ``clamp(exp, 1e-5, 1e6)``,
    dispersion ``clamp(softplus, 1e-4, 1e4)``, dropout probability sigmoid), the loss weight 0.25, the
    graph (K = 4, 'Grid' pruning), no augmentation (theirs has none outside self-distillation).

    Changed by the CPU rule: 64 px patches with a 4 px patch embedding (theirs 112 px / 7) so the map is
    16 x 16, 16 channels (theirs 32) so that dim = 16 * 16 * 16 / 8 = 512 (theirs 1024), 4 transformer
    blocks (theirs 8); patches normalised with ImageNet statistics (theirs raw 0-255 values);
    standardised targets for the gene head (theirs log-normalised expression); AdamW with a one-cycle
    schedule peaking at 1e-3, 100 epochs (theirs Adam at 1e-5 with StepLR, 350 epochs, the held-out
    section as Lightning's validation set every 2 epochs, the last epoch kept). Their self-distillation
    ("bake": 5 augmented copies of each section, weighted by a learned coefficient, lambda 0.5) is LEFT
    OUT: it runs the network 6 times per step, multiplying the compute by 6.

    Changed otherwise: the ZINB mean head's bias starts at the log of each gene's mean
    size-factor-scaled training count (theirs at 0, i.e. 1 count: ~400 steps at lr 1e-3 cannot move a
    bias by log(counts), and the ZINB term then swamps the MSE); a spot with no neighbour within 1.5
    pitches aggregates itself (theirs divides by zero).
    """

    def __init__(
        self,
        image_size: int = IMAGE_SIZE,
        patch_size: int = 4,
        channels: int = 16,
        kernel_size: int = 5,
        depth_mixer: int = 2,
        depth_transformer: int = 4,
        depth_graph: int = 4,
        heads: int = 16,
        dim_head: int = 64,
        dropout: float = 0.2,
        n_neighbors: int = 4,
        zinb: float = 0.25,
        epochs: int = 100,
        lr: float = LR,
        weight_decay: float = WEIGHT_DECAY,
        seed: int = 0,
    ):
        super().__init__(image_size, epochs, lr, weight_decay, seed)
        check_positive(
            patch_size=patch_size,
            channels=channels,
            heads=heads,
            dim_head=dim_head,
            n_neighbors=n_neighbors,
            depth_graph=depth_graph,
        )
        if image_size % patch_size or channels % 8:
            raise InputError(
                f"His2STStyle: image_size ({image_size}) must be a multiple of patch_size ({patch_size}) "
                f"and channels ({channels}) a multiple of 8."
            )
        self.patch_size, self.channels, self.kernel_size = patch_size, channels, kernel_size
        self.depths = (depth_mixer, depth_transformer, depth_graph)
        self.heads = heads
        self.dim_head = dim_head
        self.dropout = dropout
        self.n_neighbors = n_neighbors
        self.zinb = zinb

    def _network(self, n_genes: int) -> nn.Module:
        return _His2STNet(
            n_genes,
            self.image_size,
            self.patch_size,
            self.channels,
            self.kernel_size,
            self.depths,
            self.heads,
            self.dim_head,
            self.dropout,
        )

    def _extra(self, fold, adata, coords, libs, sections, train):
        from st_predict.pp import spatial_knn

        knn = spatial_knn(coords, libs, self.n_neighbors)
        pitch = section_pitch(coords, libs)
        counts = raw_counts(adata, fold.genes) if train else None
        for sec in sections:
            rows = sec["rows"]
            sec["adj"] = section_adjacency(coords, libs, rows, knn, pitch[str(libs[rows[0]])])
            if counts is not None:
                c = counts[torch.as_tensor(rows)]
                total = c.sum(1)
                med = total.median()
                sec["counts"], sec["sf"] = c, total / (med if med > 0 else 1.0)
        return sections

    @torch.no_grad()
    def _init(self, net: nn.Module, sections: list[dict]) -> None:
        # the ZINB mean head starts at each gene's mean size-factor-scaled count of the training spots:
        # from exp(0) = 1 count, ~460 AdamW steps at 1e-3 move its bias by < 0.5, far short of log(counts)
        scaled = torch.cat([sec["counts"] / sec["sf"].clamp(min=1e-6)[:, None] for sec in sections])
        net.mean.bias.copy_(torch.log(scaled.mean(0).clamp(min=1e-5)))

    def _forward(self, net, sec, x):
        return net(x, sec["pos"], sec["adj"])

    def _loss(self, net, sec, gen):
        pred, (mean, disp, pi) = self._forward(net, sec, prepare_patches(sec["x"]))
        loss = F.mse_loss(pred, sec["y"])
        if self.zinb > 0:
            loss = loss + self.zinb * zinb_loss(sec["counts"], mean, disp, pi, sec["sf"])
        return loss
