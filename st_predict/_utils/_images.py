"""Downsampled copies of (possibly lazy) images, for overviews and plots."""

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
