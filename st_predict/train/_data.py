"""Batches for NH2ST: targets + spatial neighbours, distinct spots encoded once (pure torch)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from st_predict._imaging import random_dihedral


class NH2STCollate:
    """Turns a list of target spot indices into an NH2ST batch (see :mod:`st_predict.module`).

    Parameters
    ----------
    expression
        ``(n_spots, n_genes)`` normalised expression (``None`` at inference).
    neighbors
        ``(n_spots, K)`` indices of each spot's spatial neighbours (``None``: query branch only).
    fmaps
        ``(n_spots, C, h, w)`` cached trunk feature maps (frozen trunk), or
    read_patches
        a function ``indices -> (m, 3, S, S) uint8`` patches (end-to-end training, inference).
    augment
        Random flips / 90-degree rotations of each patch (or, for cached maps, of the feature map,
        an approximation of augmenting the image).
    """

    def __init__(
        self,
        expression: torch.Tensor | None,
        neighbors: torch.Tensor | None = None,
        fmaps: torch.Tensor | None = None,
        read_patches: Callable[[np.ndarray], torch.Tensor] | None = None,
        augment: bool = False,
        seed: int | None = None,
    ):
        if (fmaps is None) == (read_patches is None):
            raise ValueError("Give exactly one of fmaps or read_patches.")
        self.expression = expression
        self.neighbors = neighbors
        self.fmaps = fmaps
        self.read_patches = read_patches
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __call__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        targets = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        nodes = targets[:, None]
        if self.neighbors is not None:
            nodes = torch.cat([nodes, self.neighbors[targets]], dim=1)
        unique, node_map = torch.unique(nodes, return_inverse=True)
        batch = {"node_map": node_map, "index": targets}
        if self.fmaps is not None:
            x = self.fmaps[unique]
            key = "fmaps"
        else:
            x = self.read_patches(unique.numpy())
            key = "patches"
        if self.augment:
            x = random_dihedral(x, self.generator)
        batch[key] = x
        if self.expression is not None:
            batch["expression"] = self.expression[nodes]
        return batch


class NH2STDataModule(pl.LightningDataModule):
    """Train/validation loaders over spot indices (shuffled, last incomplete batch dropped so every
    contrastive batch has ``batch_size`` spots). Lightning adds a ``DistributedSampler`` under DDP."""

    def __init__(
        self,
        train_idx: np.ndarray,
        val_idx: np.ndarray | None,
        collate: NH2STCollate,
        val_collate: NH2STCollate | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        drop_last: bool = True,
    ):
        super().__init__()
        self.train_idx = np.asarray(train_idx)
        self.val_idx = np.asarray(val_idx) if val_idx is not None else np.array([], dtype=np.int64)
        self.test_idx = np.array([], dtype=np.int64)
        self.collate = collate
        self.val_collate = val_collate or collate
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.n_train = len(self.train_idx)
        self.n_val = len(self.val_idx)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_idx.tolist(), batch_size=self.batch_size, shuffle=True, drop_last=self.drop_last,
            collate_fn=self.collate, num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.n_val == 0:
            return []
        return DataLoader(
            self.val_idx.tolist(), batch_size=self.batch_size, shuffle=False,
            drop_last=self.n_val >= 2 * self.batch_size, collate_fn=self.val_collate,
            num_workers=self.num_workers,
        )
