"""Trunk feature maps for many patches, batched, with a progress bar (pure torch)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


@torch.inference_mode()
def compute_fmaps(
    module,
    read_patches: Callable[[np.ndarray], torch.Tensor],
    n_spots: int,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "Embedding patches",
) -> torch.Tensor:
    """Run the module's trunk over every spot's patch; returns ``(n_spots, 512, h, w)`` float32 on CPU."""
    device = torch.device(device) if device is not None else module.device
    was_training = module.training
    module.eval()
    out = None
    starts = range(0, n_spots, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", total=len(starts))
    try:
        for start in starts:
            idx = np.arange(start, min(start + batch_size, n_spots))
            fm = module.trunk_features(read_patches(idx).to(device)).float().cpu()
            if out is None:
                out = torch.empty((n_spots, *fm.shape[1:]), dtype=torch.float32)
            out[idx] = fm
    finally:
        module.train(was_training)
    return out
