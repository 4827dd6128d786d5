"""Downsampled copies of (possibly lazy) images, for overviews and plots, and patches resampled to the network's
input."""

from __future__ import annotations

import numpy as np


def downsample(img, max_side: int) -> tuple[np.ndarray, float]:
    """Every ``step``-th pixel of ``img`` (numpy or lazy), ``step`` the smallest that brings the longer
    side to at most ``max_side``; returns the in-memory copy and its scale (``1 / step``)."""
    h, w = img.shape[:2]
    step = max(1, int(np.ceil(max(h, w) / max_side)))
    small = np.asarray(img[::step, ::step])
    if small.dtype != np.uint8 and small.max() > 1.0:
        small = small.astype(np.uint8)
    return small, 1.0 / step


def resize_patch(patch, size: int):
    """A ``(3, H, W)`` uint8 torch patch resampled to ``(3, size, size)`` (bilinear, antialiased when shrinking):
    the one resampling of spot patches, slide tiles and LazySlide tiles, so that the same pixels give the same
    input whichever path read them."""
    import torch.nn.functional as F

    if patch.shape[-2:] == (size, size):
        return patch
    import torch

    return F.interpolate(patch[None].float(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)


def resize_tile(tile, size: int):
    """An ``(H, W, 3)`` uint8 tile (numpy, as wsidata's tile dataset reads it) resampled to ``(size, size, 3)``
    with :func:`resize_patch`."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(np.asarray(tile)[..., :3])).permute(2, 0, 1)
    return resize_patch(t, size).permute(1, 2, 0).numpy()


def interval_overlap(start, side: float, origin: float, cell: float, n: int):
    """``(len(start), n)``: the fraction of each interval ``[start, start + side)`` covered by each of ``n`` cells
    ``[origin + k cell, origin + (k + 1) cell)`` (a square's overlap with a grid, one axis at a time)."""
    import numpy as np

    start = np.asarray(start, np.float64)
    edges = origin + cell * np.arange(n + 1)
    lo = np.maximum(start[:, None], edges[None, :-1])
    hi = np.minimum(start[:, None] + side, edges[None, 1:])
    return np.clip(hi - lo, 0, None) / side


def spot_shape(entry) -> str:
    """``"square"`` or ``"disc"``: the shape of a section's spots from its ``uns["spatial"][section]`` entry.
    ``metadata["spot_shape"]`` when set; otherwise square where the section is binned (``bin_size_um`` in its
    metadata or scalefactors, as Space Ranger writes for Visium HD), a disc of ``spot_diameter_fullres``
    elsewhere."""
    entry = entry if isinstance(entry, dict) else {}
    metadata, scalefactors = entry.get("metadata") or {}, entry.get("scalefactors") or {}
    shape = metadata.get("spot_shape")
    if shape is None:
        return "square" if "bin_size_um" in metadata or "bin_size_um" in scalefactors else "disc"
    if shape not in ("disc", "square"):
        from ._errors import InputError

        raise InputError(f"metadata['spot_shape'] must be 'disc' or 'square', got {shape!r}.")
    return str(shape)


def footprint_fraction(centres, sides, spots, radii, square=False, n: int = 8):
    """``(m,)``: the fraction of each square (centre ``centres[i]``, side ``sides[i]``) inside the footprint at
    ``spots[i]``: a disc of radius ``radii[i]``, or where ``square`` (a bool or ``(m,)`` bools) the axis-aligned
    square of half-side ``radii[i]``; by ``n x n`` points per square. The one rule by which bins are weighed
    against spots, discs and tiles."""
    centres, spots = np.asarray(centres, np.float64), np.asarray(spots, np.float64)
    sides, radii = np.broadcast_to(np.asarray(sides, np.float64), len(centres)), \
        np.broadcast_to(np.asarray(radii, np.float64), len(centres))
    t = (np.arange(n) + 0.5) / n - 0.5
    dx = centres[:, 0, None, None] + sides[:, None, None] * t[None, None, :] - spots[:, 0, None, None]
    dy = centres[:, 1, None, None] + sides[:, None, None] * t[None, :, None] - spots[:, 1, None, None]
    r = radii[:, None, None]
    disc = dx**2 + dy**2 <= r**2
    box = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    sq = np.broadcast_to(np.asarray(square, bool), len(centres))[:, None, None]
    return np.where(sq, box, disc).mean((1, 2))
