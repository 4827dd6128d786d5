"""Array-level patch cropping shared by the AnnData and SpatialData front ends (the patch reader).

Works on any ``(H, W, C)`` array that supports slicing: numpy (in memory), dask (lazy: only the
chunks under a patch are read), zarr. Pure numpy + torch, so GPU scripts can use it without AnnData.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from st_predict._utils import InputError, resize_patch


def crop_boxes(centers: np.ndarray, scale: float, patch_size: float) -> np.ndarray:
    """Integer crop boxes ``(n, 4) = [y0, x0, y1, x1]`` in image pixels.

    ``centers`` are ``(n, 2)`` ``(x, y)`` full-resolution pixel coordinates, ``scale`` converts them to
    image pixels (``tissue_<key>_scalef``) and ``patch_size`` is the patch side at full resolution.
    """
    side = max(int(round(patch_size * scale)), 1)
    cxy = np.asarray(centers, dtype=np.float64) * scale
    x0 = np.floor(cxy[:, 0] - side / 2.0 + 0.5).astype(np.int64)
    y0 = np.floor(cxy[:, 1] - side / 2.0 + 0.5).astype(np.int64)
    return np.stack([y0, x0, y0 + side, x0 + side], axis=1)


def boxes_outside(boxes: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Boolean mask of boxes not fully inside an image of ``shape`` ``(H, W, ...)``."""
    h, w = int(shape[0]), int(shape[1])
    return (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > h) | (boxes[:, 3] > w)


def _to_uint8_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.shape[-1] < 3:
        raise InputError(f"Expected an RGB image with >= 3 channels, got {arr.shape[-1]}.")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        # scanpy/squidpy read Visium PNGs as floats in [0, 1]
        scale = 255.0 if np.nanmax(arr) <= 1.0 + 1e-6 else 1.0
        return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    if arr.dtype == np.uint16:
        return (arr // 257).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


class PatchReader:
    """Reads square RGB patches centred on spots from one or more section images.

    Parameters
    ----------
    images
        ``library_id -> (H, W, C)`` array (numpy, dask, zarr...).
    scales
        ``library_id -> scale factor`` from full-resolution pixels to that image's pixels.
    centers
        ``(n_spots, 2)`` full-resolution ``(x, y)`` spot centres.
    libraries
        ``(n_spots,)`` library id of each spot.
    patch_size
        Patch side in full-resolution pixels (a scalar, or one value per library).
    out_size
        Side of the returned patches in pixels; crops of another size are resampled (antialiased
        bilinear).
    """

    def __init__(
        self,
        images: Mapping[str, object],
        scales: Mapping[str, float],
        centers: np.ndarray,
        libraries: Sequence[str],
        patch_size: float | Mapping[str, float],
        out_size: int,
    ):
        self.images = dict(images)
        self._decoded: tuple[str, np.ndarray] | None = None
        self.out_size = int(out_size)
        libraries = np.asarray(libraries).astype(str)
        self.libraries = libraries
        self.boxes = np.zeros((len(libraries), 4), dtype=np.int64)
        for lib in np.unique(libraries):
            sel = libraries == lib
            size = patch_size[lib] if isinstance(patch_size, Mapping) else patch_size
            self.boxes[sel] = crop_boxes(np.asarray(centers)[sel], float(scales[lib]), float(size))

    def __len__(self) -> int:
        return len(self.libraries)

    def outside(self) -> np.ndarray:
        """Mask of spots whose patch is not fully inside its image."""
        mask = np.zeros(len(self), dtype=bool)
        for lib, img in self.images.items():
            sel = self.libraries == lib
            mask[sel] = boxes_outside(self.boxes[sel], img.shape)
        return mask

    def _image(self, lib: str):
        """The image of ``lib`` to crop from: as given, or, for a lazy image stored as a single block (a JPEG
        or PNG read lazily, which cannot be decoded in parts), decoded once and kept until another
        section's is needed (or :meth:`release`)."""
        img = self.images[lib]
        if getattr(img, "npartitions", None) != 1:
            return img
        if self._decoded is None or self._decoded[0] != lib:
            self._decoded = None  # the previous section's pixels go before the next ones are decoded
            self._decoded = (lib, _materialise(img))
        return self._decoded[1]

    def release(self) -> None:
        """Drop the decoded pixels kept by :meth:`read` (a lazy single-block image)."""
        self._decoded = None

    def __getstate__(self):  # DataLoader workers get the lazy images, not decoded pixels
        return {**self.__dict__, "_decoded": None}

    def read(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """uint8 patches ``(len(indices), 3, out_size, out_size)``."""
        indices = np.asarray(indices, dtype=np.int64)
        out = torch.empty((len(indices), 3, self.out_size, self.out_size), dtype=torch.uint8)
        for i, idx in enumerate(indices):
            y0, x0, y1, x1 = self.boxes[idx]
            crop = _to_uint8_rgb(_materialise(self._image(self.libraries[idx])[y0:y1, x0:x1]))
            out[i] = resize_patch(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1), self.out_size)
        return out


def _materialise(region) -> np.ndarray:
    """A crop as numpy. Lazy (dask) crops are computed in the calling thread: dask's thread pool
    deadlocks in forked DataLoader workers once the parent has used it, and one small crop gains
    nothing from threads."""
    if hasattr(region, "compute"):
        return np.asarray(region.compute(scheduler="synchronous"))
    return np.asarray(region)
