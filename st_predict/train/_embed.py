"""Trunk feature maps for many patches, batched, with a progress bar (pure torch)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from st_predict._utils import InputError, index_batches, run_batches
from st_predict.nn import dihedral_views


def compute_fmaps(
    module,
    read_patches: Callable[[np.ndarray], torch.Tensor] | torch.Tensor,
    n_spots: int | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "Embedding patches",
    views: int = 1,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the module's trunk (in eval mode) over every spot's patch.

    Parameters
    ----------
    module
        An :class:`~st_predict.module.NH2STModule` (its ``trunk_features`` is used).
    read_patches
        A function ``indices -> (m, 3, S, S)`` uint8 patches, or the patches themselves.
    n_spots
        Number of spots (default: all the given patches).
    batch_size
        Patches per trunk call.
    device
        Where to run (default: the module's device).
    progress
        Show a progress bar.
    desc
        Its label.
    views
        1: the patches as they are, ``(n_spots, 512, h, w)``. 8: also their flips/90-degree
        rotations, ``(n_spots, 8, 512, h, w)`` (identity first), the augmentation of a frozen cache.
    reduce
        Applied to each batch's maps before they are kept (e.g. their spatial mean), so that only the
        reduced maps of all spots are ever held in memory.

    Returns float32 maps on the CPU.
    """
    if views not in (1, 8):
        raise InputError(f"views must be 1 or 8, got {views}.")
    if isinstance(read_patches, torch.Tensor):
        patches = read_patches
        read_patches = lambda idx: patches[torch.as_tensor(idx)]  # noqa: E731
        n_spots = len(patches) if n_spots is None else n_spots
    if n_spots is None:
        raise InputError("n_spots is needed when read_patches is a function.")
    device = torch.device(device) if device is not None else module.device

    def embed(idx: np.ndarray) -> torch.Tensor:
        x = read_patches(idx).to(device)
        batch_views = dihedral_views(x) if views == 8 else [x]
        fm = torch.stack([module.trunk_features(v).float().cpu() for v in batch_views], dim=1)
        return reduce(fm) if reduce is not None else fm

    # not inference mode: the result may be updated in place (the neighbour cache)
    out = run_batches(embed, index_batches(n_spots, batch_size), n_spots, module, progress, desc, inference=False)
    if out is None:
        raise InputError("No spots to embed.")
    return out[:, 0] if views == 1 else out
