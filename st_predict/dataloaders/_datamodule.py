"""Batches for NH2ST: targets + spatial neighbours, distinct spots encoded once (pure torch)."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from st_predict._utils import InputError, single_thread_worker
from st_predict.nn import random_dihedral, stain_jitter
from st_predict.train import AUGMENTATIONS


class NH2STCollate:
    """Turns a list of target spot indices into an NH2ST batch (see :mod:`st_predict.module`).

    Parameters
    ----------
    expression
        ``(n_spots, n_genes)`` expression on the data's scale (``None`` at inference).
    neighbors
        ``(n_spots, K)`` indices of each spot's spatial neighbours (``None``: query branch only).
    patches
        ``(n_spots, 3, S, S)`` uint8 patches, cropped once at the trunk's resolution (end-to-end
        training), **or**
    fmaps
        cached trunk feature maps of a frozen trunk: ``(n_spots, C, h, w)``, or
        ``(n_spots, 8, C, h, w)`` holding the maps of the 8 flips/90-degree rotations of each patch
        (:func:`~st_predict.train.compute_fmaps` with ``views=8``).
    neighbor_patches
        End-to-end training only. ``False``: only the target spots' patches are sent (``"patches"``
        plus ``"patch_rows"``); the other rows are filled from the training plan's neighbour cache,
        looked up by ``"node_index"``. ``True``: every row's patch is sent (the paper's
        full-gradient neighbour branch, and validation).
    augment
        ``"none"``; ``"dihedral"``: one random flip/90-degree rotation per patch (on a frozen cache: a
        random one of the cached views); ``"dihedral+stain"``: also random H&E stain and brightness
        jitter (:func:`~st_predict.nn.stain_jitter`, end-to-end only). ``True`` means
        ``"dihedral+stain"``, ``False`` ``"none"``.
    stain_strength
        Strength of the stain jitter.
    seed
        Seed of the augmentation's random generator (``None``: torch's global generator). In a
        DataLoader worker process the collate draws from a generator of its own, seeded from
        ``seed``, the worker's id and the seed torch gives that worker for this epoch's loader: the
        workers draw different augmentations, and the same seeds give the same ones again.
    """

    def __init__(
        self,
        expression: torch.Tensor | None,
        neighbors: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
        fmaps: torch.Tensor | None = None,
        neighbor_patches: bool = True,
        augment: str | bool = "none",
        stain_strength: float = 0.05,
        seed: int | None = None,
    ):
        if (fmaps is None) == (patches is None):
            raise InputError("Give exactly one of patches or fmaps.")
        augment = {True: "dihedral+stain", False: "none"}.get(augment, augment)
        if augment not in AUGMENTATIONS:
            raise InputError(f"augment must be one of {list(AUGMENTATIONS)} (or True/False), got {augment!r}.")
        self.expression = expression
        self.neighbors = neighbors
        self.patches = patches
        self.fmaps = fmaps
        self.neighbor_patches = neighbor_patches
        self.augment = augment
        self.stain_strength = stain_strength
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self._worker: tuple[int, int] | None = None  # (worker id, torch's worker seed) of self.generator

    def _rng(self) -> torch.Generator | None:
        """The generator to draw augmentations from: this process's, or in a DataLoader worker one
        seeded for that worker (a forked worker starts with a copy of the parent's generator, so
        without this every worker would draw the same augmentations)."""
        info = torch.utils.data.get_worker_info()
        if self.seed is None or info is None:
            return self.generator
        key = (info.id, info.seed)
        if self._worker != key:
            entropy = np.random.SeedSequence([self.seed, info.id, info.seed % 2**63]).generate_state(2, np.uint64)
            self.generator = torch.Generator().manual_seed(int(entropy[0] >> np.uint64(1)))
            self._worker = key
        return self.generator

    @property
    def n_views(self) -> int:
        """Cached views per spot (frozen trunk), 1 otherwise."""
        return self.fmaps.shape[1] if self.fmaps is not None and self.fmaps.ndim == 5 else 1

    def _augment_patches(self, x: torch.Tensor) -> torch.Tensor:
        if self.augment == "none":
            return x
        rng = self._rng()
        x = random_dihedral(x, rng)
        if self.augment == "dihedral+stain":
            x = stain_jitter(x, self.stain_strength, rng)
        return x

    def __call__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        targets = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        nodes = targets[:, None]
        if self.neighbors is not None:
            nodes = torch.cat([nodes, self.neighbors[targets]], dim=1)
        unique, node_map = torch.unique(nodes, return_inverse=True)
        batch = {"node_map": node_map, "index": targets, "node_index": unique}
        if self.fmaps is not None:
            if self.n_views > 1:
                view = torch.zeros(len(unique), dtype=torch.long)
                if self.augment != "none":
                    view = torch.randint(0, self.n_views, (len(unique),), generator=self._rng())
                batch["fmaps"] = self.fmaps[unique, view]
            else:
                batch["fmaps"] = self.fmaps[unique]
        elif self.neighbor_patches:
            batch["patches"] = self._augment_patches(self.patches[unique])
        else:
            rows = node_map[:, 0]
            batch["patches"] = self._augment_patches(self.patches[unique[rows]])
            batch["patch_rows"] = rows
        if self.expression is not None:
            batch["expression"] = self.expression[nodes]
        return batch


def even_batches(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Split ``indices`` (in order) into ``ceil(n / batch_size)`` batches whose sizes differ by at most
    one, so no batch is left with a single spot while another is full (a contrastive loss needs two)."""
    indices = np.asarray(indices)
    if len(indices) == 0:
        return []
    return list(np.array_split(indices, -(-len(indices) // batch_size)))


class SectionBatchSampler(Sampler[list[int]]):
    """Training batches drawn from one section at a time.

    Each epoch, every section's spots are shuffled and cut into full batches; the spots left over in
    each section are pooled, shuffled and cut into mixed batches (an incomplete last one is dropped);
    then the order of all batches is shuffled. A contrastive loss then finds its negatives among spots
    of the same section: with negatives from other sections, section-wide differences of stain and of
    expression (batch effects, which do not carry over to a new section) are enough to tell spots apart.

    Under DDP (``torch.distributed`` initialised) each process takes every ``world_size``-th batch of the
    same shuffled list.

    Parameters
    ----------
    indices
        Spot indices to draw from.
    groups
        Section of each of ``indices``.
    batch_size
        Spots per batch.
    seed
        Base seed; epoch ``e`` shuffles with ``seed + e``.
    """

    def __init__(self, indices: Sequence[int], groups: Sequence[str], batch_size: int, seed: int = 0):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.groups = np.asarray(groups).astype(str)
        if len(self.groups) != len(self.indices):
            raise InputError(f"{len(self.groups)} groups for {len(self.indices)} indices.")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0

    def _batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng(self.seed + epoch)
        batches, rest = [], []
        for g in np.unique(self.groups):
            ids = rng.permutation(self.indices[self.groups == g])
            n_full = len(ids) // self.batch_size * self.batch_size
            batches += [ids[i : i + self.batch_size].tolist() for i in range(0, n_full, self.batch_size)]
            rest += ids[n_full:].tolist()
        rest = rng.permutation(np.asarray(rest, dtype=np.int64))
        n_full = len(rest) // self.batch_size * self.batch_size
        batches += [rest[i : i + self.batch_size].tolist() for i in range(0, n_full, self.batch_size)]
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
            per_rank = len(batches) // world
            batches = batches[rank::world][:per_rank]
        return batches

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the next epoch as epoch ``epoch`` (Lightning calls this at every epoch start, so a
        resumed run draws the batches the interrupted one would have)."""
        self.epoch = int(epoch)

    def __iter__(self):
        batches = self._batches(self.epoch)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return len(self._batches(self.epoch))


class _IndexBatches(Sampler[list[int]]):
    """A batch sampler of spot indices as a batch sampler of dataset positions (the dataset is the list
    of training indices, so a spot index maps to its position)."""

    def __init__(self, section_sampler: SectionBatchSampler):
        self.section_sampler = section_sampler
        self.sampler = section_sampler  # where Lightning looks for set_epoch (batch_sampler.sampler)
        self.position = {int(i): p for p, i in enumerate(section_sampler.indices)}

    def __iter__(self):
        for batch in self.section_sampler:
            yield [self.position[i] for i in batch]

    def __len__(self) -> int:
        return len(self.section_sampler)


class _Unwrap:
    """Collate for a DataLoader whose items are whole batches of indices."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items):
        return self.collate(np.concatenate([np.atleast_1d(i) for i in items]))


class NH2STDataModule(pl.LightningDataModule):
    """Train/validation loaders over spot indices.

    Training batches are shuffled and the last incomplete one is dropped, so every contrastive batch
    has ``batch_size`` spots; with ``train_groups`` (the section of each training spot) they are drawn
    one section at a time (:class:`SectionBatchSampler`). Validation batches keep every spot and have
    near-equal sizes (:func:`even_batches`). Lightning adds a ``DistributedSampler`` under DDP to the
    plain loaders; the section sampler shards its batches itself.
    """

    def __init__(
        self,
        train_idx: np.ndarray,
        val_idx: np.ndarray | None,
        collate: NH2STCollate,
        val_collate: NH2STCollate | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        drop_last: bool = True,
        train_groups: Sequence[str] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.train_idx = np.asarray(train_idx)
        self.train_groups = None if train_groups is None else np.asarray(train_groups).astype(str)
        self.seed = seed
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
        if self.train_groups is not None:
            sampler = SectionBatchSampler(self.train_idx, self.train_groups, self.batch_size, self.seed)
            return DataLoader(self.train_idx.tolist(), batch_sampler=_IndexBatches(sampler),
                              collate_fn=self.collate, num_workers=self.num_workers,
                              worker_init_fn=single_thread_worker)
        return DataLoader(
            self.train_idx.tolist(), batch_size=self.batch_size, shuffle=True, drop_last=self.drop_last,
            collate_fn=self.collate, num_workers=self.num_workers, worker_init_fn=single_thread_worker,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.n_val == 0:
            return []
        return DataLoader(
            even_batches(self.val_idx, self.batch_size), batch_size=1, shuffle=False,
            collate_fn=_Unwrap(self.val_collate), num_workers=self.num_workers,
            worker_init_fn=single_thread_worker,
        )
