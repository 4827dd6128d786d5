"""TRIPLEX-style baseline (Chung et al., CVPR 2024): target, neighbourhood and whole-section encoders fused by
cross-attention. Follows the CPU rule of :mod:`~st_predict.benchmark._peer_common`."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from st_predict._utils import InputError
from st_predict.nn import build_resnet18_trunk, prepare_patches

from ._methods import Fold, _fold_patches, _scaling
from ._peer_common import (
    IMAGE_SIZE,
    LR,
    WEIGHT_DECAY,
    CrossBlock,
    RegionReader,
    Stack,
    TargetScale,
    check_dims,
    check_positive,
    dihedral,
    fold_spots,
    frozen_trunk,
    grid_positions,
    sections_of,
    spot_batches,
    train_steps,
)

#: the neighbourhood: a GRID x GRID grid of patch-sized sub-patches centred on the spot
GRID = 5


class _APEGEncoder(nn.Module):
    """TRIPLEX's global encoder: one block, APEG (a depthwise conv over the section's spot grid whose
    output replaces the tokens, as theirs), ``depth - 1`` blocks, LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, dropout: float, kernel_size: int = 3):
        super().__init__()
        self.layer1 = Stack(dim, 1, heads, dim // heads, mlp_dim, dropout)
        self.peg = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.layer2 = Stack(dim, depth - 1, heads, dim // heads, mlp_dim, dropout)
        self.norm = nn.LayerNorm(dim)

    def apeg(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``x`` ``(1, N, C)`` tokens at grid positions ``pos`` ``(N, 2)`` (column, row): scattered onto
        the grid (the mean where spots share a cell), convolved, read back at the same cells."""
        n, c = x.shape[1:]
        w, h = int(pos[:, 0].max()) + 1, int(pos[:, 1].max()) + 1
        cell = pos[:, 1] * w + pos[:, 0]
        dense = x.new_zeros(c, h * w).index_add(1, cell, x[0].T)
        count = x.new_zeros(h * w).index_add(0, cell, x.new_ones(n)).clamp(min=1.0)
        out = self.peg((dense / count).view(1, c, h, w)).view(c, h * w)
        return out[:, cell].T[None]

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layer2(self.apeg(self.layer1(x), pos)))


class _TriplexNet(nn.Module):
    def __init__(self, n_genes: int, feat_dim: int, emb: int, depths, heads, ratios, dropouts):
        super().__init__()
        (d_fus, d_glob, d_nbr), (h_fus, h_glob, h_nbr) = depths, heads
        (r_fus, r_glob, r_nbr), (p_fus, p_glob, p_nbr) = ratios, dropouts
        self.target_encoder = build_resnet18_trunk()
        self.target_linear = nn.Linear(512, emb)
        self.neighbor_in = nn.Linear(feat_dim, emb) if feat_dim != emb else nn.Identity()
        self.neighbor = Stack(emb, d_nbr, h_nbr, emb // h_nbr, int(emb * r_nbr), p_nbr, grid=GRID)
        self.neighbor_norm = nn.LayerNorm(emb)
        self.global_in = nn.Linear(feat_dim, emb) if feat_dim != emb else nn.Identity()
        self.global_encoder = _APEGEncoder(emb, d_glob, h_glob, int(emb * r_glob), p_glob)
        self.fusion = nn.ModuleList(CrossBlock(emb, h_fus, int(emb * r_fus), p_fus) for _ in range(d_fus))
        self.fusion_norm = nn.LayerNorm(emb)
        self.fc, self.fc_target, self.fc_neighbor, self.fc_global = (
            nn.Linear(emb, n_genes) for _ in range(4)
        )

    def encode_global(self, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.global_encoder(self.global_in(feats)[None], pos)[0]

    def _cross(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.fusion:  # the same layers for the target and the neighbour tokens, as theirs
            q = block(q, kv, mask)
        return q

    def forward(self, x, nbr, mask, g):
        fm = self.target_encoder(x)
        target = self.target_linear(fm.flatten(2).transpose(1, 2))  # (B, h*w, emb)
        neighbor = self.neighbor_norm(self.neighbor(self.neighbor_in(nbr), mask))
        fused = self._cross(g[:, None], target) + self._cross(g[:, None], neighbor, mask)
        return self.fusion_norm(fused[:, 0]), target, neighbor


class TRIPLEXStyle:
    """TRIPLEX-style (Chung et al., CVPR 2024; written after reading ``NEXGEM/TRIPLEX``,
    ``src/model/TRIPLEX``).

    Three views of a spot, fused: the **target** (a trained ResNet18 trunk on the spot's patch; its
    feature map's cells as tokens, ``Linear(512, emb_dim)``), the **neighbourhood** (the frozen trunk's
    features of the 5 x 5 grid of patch-sized sub-patches centred on the spot: the region cropped at
    5 x ``image_size`` px, its map average-pooled to 5 x 5 = 25 tokens; a sub-patch not fully inside the
    image is padded white and masked, their mask; a transformer with a learned relative-position
    attention bias over the grid, then LayerNorm) and the **whole section** (the frozen features of every
    spot of the spot's section through a transformer with APEG, a depthwise 3 x 3 conv over the spot grid
    after the first block, then LayerNorm). Fusion: cross-attention with the spot's global token as the
    query over the target tokens and, with the same layers, over the (masked) neighbour tokens, the two
    summed, LayerNorm, a linear layer to the genes. Loss, theirs: MSE(fusion) + for each of the target,
    neighbour and global heads (a linear layer on the mean of its tokens) ``(1 - alpha) MSE(head, y) +
    alpha MSE(fusion, head)``, ``alpha = 0.3``. Each training step runs the global encoder over every
    section in the batch (their ``retrieve_global_emb``); prediction runs it once over the test section.

    Kept from theirs: the three encoders, the HER2ST (``config/ST/andersson``) sizes (emb 512; fusion
    depth 1, 4 heads, MLP ratio 4, dropout 0.2; global depth 3, 16 heads, ratio 4, dropout 0.1;
    neighbour depth 3, 16 heads, ratio 1, dropout 0.3; head width emb/heads), the relative-position
    bias, the neighbour mask, APEG without a residual, pre-norm blocks, the loss and alpha, ImageNet
    normalisation of the target patch, and neighbour tokens computed once, without augmentation.

    Changed by the CPU rule: the target patch is 64 px (theirs 224 px) so its map is 2 x 2 = 4 tokens
    (theirs 7 x 7), and the trunk starts from random weights (theirs fine-tunes Ciga et al.'s
    self-supervised ResNet18); the neighbour and global features come from the runner's frozen trunk
    (theirs UNI, or the Ciga ResNet18 run on each 224 px sub-patch separately; here one pass over the
    whole region), standardised with the training spots' statistics; standardised targets and no clamp
    of the outputs at 0 (theirs clamps every head); AdamW with a one-cycle schedule peaking at 1e-3, 20
    epochs at batch 32 (theirs AdamW at 1e-4 with ReduceLROnPlateau, batch 128, up to 1000 epochs with
    early stopping, patience 20, on the held-out fold's PCC); augmentation one random flip / 90-degree
    rotation per patch (theirs random horizontal and vertical flips and a random 90-degree rotation).
    With an ``emb_dim`` other than 512, a linear layer maps the frozen 512-d features to it (none at the
    default, as theirs).
    """

    sees_context = True

    def __init__(
        self,
        image_size: int = IMAGE_SIZE,
        emb_dim: int = 512,
        depth_fusion: int = 1,
        depth_global: int = 3,
        depth_neighbor: int = 3,
        heads_fusion: int = 4,
        heads_global: int = 16,
        heads_neighbor: int = 16,
        mlp_ratio_fusion: float = 4.0,
        mlp_ratio_global: float = 4.0,
        mlp_ratio_neighbor: float = 1.0,
        dropout_fusion: float = 0.2,
        dropout_global: float = 0.1,
        dropout_neighbor: float = 0.3,
        alpha: float = 0.3,
        epochs: int = 20,
        batch_size: int = 32,
        lr: float = LR,
        weight_decay: float = WEIGHT_DECAY,
        seed: int = 0,
    ):
        check_positive(image_size=image_size, emb_dim=emb_dim, epochs=epochs, batch_size=batch_size, lr=lr)
        for heads, what in (
            (heads_fusion, "fusion"),
            (heads_global, "global"),
            (heads_neighbor, "neighbour"),
        ):
            check_dims(emb_dim, heads, f"TRIPLEXStyle {what} encoder")
        if depth_global < 2:
            raise InputError(
                f"TRIPLEXStyle: APEG sits after the global encoder's first block: depth_global must "
                f"be at least 2, got {depth_global}."
            )
        self.image_size, self.emb_dim, self.alpha = image_size, emb_dim, alpha
        self.depths = (depth_fusion, depth_global, depth_neighbor)
        self.heads = (heads_fusion, heads_global, heads_neighbor)
        self.ratios = (mlp_ratio_fusion, mlp_ratio_global, mlp_ratio_neighbor)
        self.dropouts = (dropout_fusion, dropout_global, dropout_neighbor)
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed

    @torch.no_grad()
    def _region_tokens(self, fold: Fold, adata, trunk: nn.Module, chunk: int = 16):
        """Frozen-trunk tokens ``(n, 25, 512)`` of each spot's neighbourhood, and the masks ``(n, 25)``."""
        reader = RegionReader(fold, adata, self.image_size, GRID)
        tokens, masks = [], []
        for s in range(0, adata.n_obs, chunk):
            regions, mask = reader.read(np.arange(s, min(s + chunk, adata.n_obs)))
            fm = F.adaptive_avg_pool2d(trunk(prepare_patches(regions)).float(), GRID)
            tokens.append(fm.flatten(2).transpose(1, 2).contiguous())
            masks.append(mask)
        return torch.cat(tokens), torch.cat(masks)

    def _inputs(self, fold: Fold, adata, feats: np.ndarray):
        coords, libs = fold_spots(fold, adata)
        pos = torch.as_tensor(grid_positions(coords, libs))
        tokens, mask = self._region_tokens(fold, adata, frozen_trunk(fold))
        patches = _fold_patches(fold, adata, fold.extra["setup"], self.image_size)
        return patches, tokens, mask, torch.as_tensor(np.asarray(feats), dtype=torch.float32), pos, libs

    def _scaled(self, tokens, feats):
        return (tokens - self.tok_mu_) / self.tok_sd_, (feats - self.feat_mu_) / self.feat_sd_

    def fit(self, fold: Fold) -> None:
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        scale = self.scale_ = TargetScale(fold.y_train)
        steps = spot_batches(len(scale.z), self.batch_size, self.epochs, gen)
        patches, tokens, mask, feats, pos, libs = self._inputs(fold, fold.train, fold.feats_train)
        mu, sd = _scaling(tokens[mask].numpy())
        self.tok_mu_, self.tok_sd_ = torch.as_tensor(mu), torch.as_tensor(sd)
        mu, sd = _scaling(feats.numpy())
        self.feat_mu_, self.feat_sd_ = torch.as_tensor(mu), torch.as_tensor(sd)
        tokens, feats = self._scaled(tokens, feats)
        rows = sections_of(libs)
        section = np.zeros(len(libs), dtype=np.int64)
        local = np.zeros(len(libs), dtype=np.int64)
        for s, r in enumerate(rows):
            section[r], local[r] = s, np.arange(len(r))
        net = self.net_ = _TriplexNet(
            scale.z.shape[1],
            feats.shape[1],
            self.emb_dim,
            self.depths,
            self.heads,
            self.ratios,
            self.dropouts,
        )
        net.target_encoder.to(memory_format=torch.channels_last)
        a = self.alpha

        def loss_fn(idx: torch.Tensor) -> torch.Tensor:
            idx_np = idx.numpy()
            g = torch.empty((len(idx), self.emb_dim))
            for s in np.unique(section[idx_np]):  # the global encoder over each section of the batch
                sel = np.flatnonzero(section[idx_np] == s)
                gs = net.encode_global(feats[rows[s]], pos[rows[s]])
                g = g.index_copy(0, torch.as_tensor(sel), gs[torch.as_tensor(local[idx_np[sel]])])
            fused, target, neighbor = net(
                prepare_patches(dihedral(patches[idx], gen)), tokens[idx], mask[idx], g
            )
            y = scale.z[idx]
            out = net.fc(fused)
            loss = F.mse_loss(out, y)
            for head in (net.fc_target(target.mean(1)), net.fc_neighbor(neighbor.mean(1)), net.fc_global(g)):
                loss = loss + (1 - a) * F.mse_loss(head, y) + a * F.mse_loss(out, head)
            return loss

        train_steps(net, steps, loss_fn, self.lr, self.weight_decay)

    @torch.inference_mode()
    def predict(self, fold: Fold) -> np.ndarray:
        patches, tokens, mask, feats, pos, libs = self._inputs(fold, fold.test, fold.feats_test)
        tokens, feats = self._scaled(tokens, feats)
        net = self.net_.eval()
        g = torch.empty((len(patches), self.emb_dim))
        for r in sections_of(libs):  # the global encoder once over all spots of each test section
            g[torch.as_tensor(r)] = net.encode_global(feats[r], pos[r])
        out = []
        for s in range(0, len(patches), 128):
            sl = slice(s, s + 128)
            fused, _, _ = net(prepare_patches(patches[sl]), tokens[sl], mask[sl], g[sl])
            out.append(net.fc(fused))
        return self.scale_.inverse(torch.cat(out))
