"""The patch of a spot as a physical size: resolved once at setup, used by every reader of patches."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from anndata import AnnData

from st_predict._utils import PATCH_SIZE_PX, InputError, user_stacklevel

from ._patches import PIXEL_SIZE_KEY, section_pixel_sizes


@dataclass(frozen=True)
class PatchGeometry:
    """The side of every spot's patch, resolved once when the training data is set up.

    When the pixel size of the training sections is known, the patch is a physical size
    (:attr:`size_um`), whether it was given in micrometres (``patch_size_um``) or in pixels
    (``patch_size``: converted with the median pixel size of those sections). Every section whose
    pixel size is known is then cropped at that many micrometres (:meth:`pixels`): a section scanned
    at another resolution gets the same tissue area, resampled to the network's input size. Where
    the pixel size is unknown, the patch is :attr:`size_px` full-resolution pixels, the side of the
    training patches at the training data's resolution.

    Attributes
    ----------
    size_um
        Patch side in micrometres; ``None`` when no training section had a pixel size.
    size_px
        Patch side in full-resolution pixels of data like the training data: what a section with no
        pixel size is cropped with.
    """

    size_um: float | None
    size_px: float

    def __post_init__(self):
        if not (np.isfinite(self.size_px) and self.size_px > 0):
            raise InputError(f"patch_size must be a positive number of pixels, got {self.size_px!r}.")
        if self.size_um is not None and not (np.isfinite(self.size_um) and self.size_um > 0):
            raise InputError(f"patch_size_um must be a positive number of micrometres, got {self.size_um!r}.")

    @classmethod
    def from_pixel_sizes(
        cls,
        pixel_sizes: Mapping[str, float | None],
        patch_size: float | None = PATCH_SIZE_PX,
        patch_size_um: float | None = None,
    ) -> PatchGeometry:
        """The geometry of patches of ``patch_size`` pixels or ``patch_size_um`` micrometres on
        sections with these pixel sizes (µm per full-resolution pixel, ``None`` where unknown).
        ``patch_size_um`` needs every pixel size; ``patch_size`` becomes micrometres with the median
        of the known ones."""
        known = [float(v) for v in pixel_sizes.values() if v is not None]
        if patch_size_um is not None:
            if not (np.isfinite(patch_size_um) and patch_size_um > 0):
                raise InputError(f"patch_size_um must be a positive number of micrometres, got {patch_size_um!r}.")
            unknown = [str(lib) for lib, v in pixel_sizes.items() if v is None]
            if unknown:
                raise InputError(
                    f"patch_size_um={patch_size_um:g} needs each section's pixel size, but sections {unknown[:5]} "
                    f"have no adata.uns['spatial'][section]['metadata'][{PIXEL_SIZE_KEY!r}] (micrometres per "
                    "full-resolution pixel). Set it, or give patch_size in pixels instead."
                )
            return cls(float(patch_size_um), float(patch_size_um) / float(np.median(known)))
        if patch_size is None or not (np.isfinite(patch_size) and patch_size > 0):
            raise InputError(f"patch_size must be a positive number of pixels, got {patch_size!r}.")
        size_um = float(patch_size) * float(np.median(known)) if known else None
        return cls(size_um, float(patch_size))

    @classmethod
    def resolve(
        cls,
        adata: AnnData,
        libraries: np.ndarray,
        patch_size: float | None = PATCH_SIZE_PX,
        patch_size_um: float | None = None,
    ) -> PatchGeometry:
        """:meth:`from_pixel_sizes` with the pixel sizes of ``adata``'s sections
        (``adata.uns["spatial"][library]["metadata"]["pixel_size_um"]``)."""
        return cls.from_pixel_sizes(section_pixel_sizes(adata, libraries), patch_size, patch_size_um)

    def pixels(self, pixel_sizes: Mapping[str, float | None], data: str = "adata") -> dict[str, float]:
        """Patch side in full-resolution pixels for each section: :attr:`size_um` over its pixel size,
        or :attr:`size_px` where either is unknown. Warns (once per call) when the patch has a
        physical size but a section's pixel size is unknown, naming the key to set; ``data`` names
        the data in that message."""
        out, unknown = {}, []
        for lib, mpp in pixel_sizes.items():
            if self.size_um is not None and mpp is not None:
                out[str(lib)] = self.size_um / float(mpp)
            else:
                out[str(lib)] = self.size_px
                if self.size_um is not None:
                    unknown.append(str(lib))
        if unknown:
            warnings.warn(
                f"The model's patches are {self.size_um:g} um, but section(s) {unknown[:5]} of {data} have no "
                f"pixel size: they are cropped at {self.size_px:g} px, the training patch at the training data's "
                f"resolution, which is right only if they were scanned at that resolution. Set "
                f"{data}.uns['spatial'][section]['metadata'][{PIXEL_SIZE_KEY!r}] (micrometres per full-resolution "
                "pixel) to crop the same tissue area.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        return out

    def pixels_for(self, adata: AnnData, libraries: np.ndarray, data: str = "adata") -> dict[str, float]:
        """:meth:`pixels` for the sections of ``adata``."""
        return self.pixels(section_pixel_sizes(adata, libraries), data)

    def setup_kwargs(self, pixel_sizes: Mapping[str, float | None] | None = None) -> dict[str, float]:
        """The :meth:`~st_predict.NH2ST.setup_anndata` argument that gives this geometry on the same data:
        ``patch_size_um`` when the size is physical (and, given the data's ``pixel_sizes``, every section has
        one: ``patch_size_um`` needs them all), else ``patch_size``."""
        known = pixel_sizes is None or all(v is not None for v in pixel_sizes.values())
        return {"patch_size_um": self.size_um} if self.size_um is not None and known else {"patch_size": self.size_px}

    def __str__(self) -> str:
        if self.size_um is None:
            return f"{self.size_px:g} px (no pixel size known)"
        return f"{self.size_um:.4g} um ({self.size_px:.4g} px on the training data)"


def spot_pitch_um(coords: np.ndarray, libraries: np.ndarray, pixel_sizes: Mapping[str, float | None]) -> float | None:
    """Median distance in micrometres from each spot to its nearest neighbour in the same section
    (``None`` when a pixel size is unknown or no section has two spots)."""
    from scipy.spatial import cKDTree

    if any(v is None for v in pixel_sizes.values()):
        return None
    libraries = np.asarray(libraries)
    dists = []
    for lib, mpp in pixel_sizes.items():
        xy = coords[libraries == lib]
        if len(xy) > 1:
            d, _ = cKDTree(xy).query(xy, k=2)
            dists.append(d[:, 1] * mpp)
    return float(np.median(np.concatenate(dists))) if dists else None
