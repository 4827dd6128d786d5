"""Spot patches from Visium-style ``adata.uns["spatial"]`` images, with checks that name what is wrong."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from anndata import AnnData

from st_predict._utils import InputError, MissingKeyError
from st_predict.dataloaders import PatchReader


def spot_libraries(adata: AnnData, library_key: str | None) -> np.ndarray:
    """Library id of every spot: ``adata.obs[library_key]``, or the single library in
    ``adata.uns["spatial"]`` when ``library_key`` is ``None``."""
    if library_key is not None:
        if library_key not in adata.obs:
            raise MissingKeyError(f"library_key={library_key!r} is not a column of adata.obs.")
        libs = adata.obs[library_key]
        if libs.isna().any():
            raise InputError(f"adata.obs[{library_key!r}] has {int(libs.isna().sum())} missing values.")
        return libs.astype(str).to_numpy()
    spatial = adata.uns.get("spatial")
    if not isinstance(spatial, Mapping) or len(spatial) == 0:
        raise MissingKeyError(
            "adata.uns['spatial'] is missing: images must be stored Visium-style in "
            "adata.uns['spatial'][library_id]['images'][image_key]."
        )
    if len(spatial) > 1:
        raise InputError(
            f"adata.uns['spatial'] has {len(spatial)} libraries ({', '.join(map(str, spatial))}); pass "
            "library_key= naming the obs column that says which section each spot belongs to."
        )
    return np.full(adata.n_obs, str(next(iter(spatial))), dtype=object)


def spot_coordinates(adata: AnnData, spatial_key: str = "spatial") -> np.ndarray:
    """``adata.obsm[spatial_key]`` as a finite ``(n_obs, 2)`` float array (x, y in full-resolution px)."""
    if spatial_key not in adata.obsm:
        raise MissingKeyError(
            f"adata.obsm[{spatial_key!r}] is missing: spot centres in full-resolution pixels "
            "(x = column, y = row) are needed."
        )
    coords = adata.obsm[spatial_key]
    coords = coords.to_numpy() if isinstance(coords, pd.DataFrame) else np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise InputError(f"adata.obsm[{spatial_key!r}] must be (n_obs, 2), got shape {coords.shape}.")
    coords = coords[:, :2].astype(np.float64)
    bad = ~np.isfinite(coords).all(1)
    if bad.any():
        raise InputError(
            f"adata.obsm[{spatial_key!r}] has {int(bad.sum())} spots with NaN/inf coordinates, "
            f"e.g. {list(adata.obs_names[bad][:3])}."
        )
    return coords


def section_images(
    adata: AnnData, libraries: np.ndarray, image_key: str = "hires"
) -> tuple[dict[str, object], dict[str, float]]:
    """Image array and scale factor of every library, checked."""
    spatial = adata.uns.get("spatial")
    if not isinstance(spatial, Mapping):
        raise MissingKeyError(
            "adata.uns['spatial'] is missing: images must be stored Visium-style in "
            f"adata.uns['spatial'][library_id]['images'][{image_key!r}]."
        )
    images, scales = {}, {}
    for lib in pd.unique(libraries):
        if lib not in spatial:
            raise MissingKeyError(
                f"Section {lib!r} has no entry in adata.uns['spatial'] (it has: {', '.join(map(str, spatial))})."
            )
        entry = spatial[lib]
        img = entry.get("images", {}).get(image_key) if isinstance(entry, Mapping) else None
        if img is None:
            have = list(entry.get("images", {})) if isinstance(entry, Mapping) else []
            raise MissingKeyError(
                f"Section {lib!r} has no image adata.uns['spatial'][{lib!r}]['images'][{image_key!r}] "
                f"(images present: {have})."
            )
        if len(getattr(img, "shape", ())) not in (2, 3):
            raise InputError(f"Image of section {lib!r} must be (H, W) or (H, W, C), got shape {img.shape}.")
        sf_key = f"tissue_{image_key}_scalef"
        scale = entry.get("scalefactors", {}).get(sf_key)
        if scale is None:
            raise MissingKeyError(
                f"Section {lib!r} lacks adata.uns['spatial'][{lib!r}]['scalefactors'][{sf_key!r}] "
                "(1.0 for a full-resolution image)."
            )
        if not np.isfinite(scale) or scale <= 0:
            raise InputError(f"Scale factor {sf_key!r} of section {lib!r} must be > 0, got {scale}.")
        images[lib], scales[lib] = img, float(scale)
    return images, scales


def make_patch_reader(
    adata: AnnData,
    spatial_key: str = "spatial",
    image_key: str = "hires",
    library_key: str | None = None,
    patch_size: float | Mapping[str, float] = 224,
    out_size: int = 224,
) -> PatchReader:
    """A :class:`~st_predict.dataloaders.PatchReader` over ``adata``'s spots.

    Patches are ``patch_size`` full-resolution pixels wide (a number, or one per section, see
    :func:`patch_size_pixels`), centred on ``adata.obsm[spatial_key]``,
    cut from ``adata.uns["spatial"][library]["images"][image_key]`` and resampled to ``out_size``.
    Raises if any patch falls outside its image (naming the section, the count and example spots).
    Only the pixels under each patch are read, so a lazy (dask) image stays on disk.
    """
    if adata.n_obs == 0:
        raise InputError("The AnnData has no spots (n_obs == 0).")
    coords = spot_coordinates(adata, spatial_key)
    libraries = spot_libraries(adata, library_key)
    images, scales = section_images(adata, libraries, image_key)
    sizes = patch_size.values() if isinstance(patch_size, Mapping) else [patch_size]
    if any(not s > 0 for s in sizes):
        raise InputError(f"patch_size must be > 0, got {patch_size}.")
    reader = PatchReader(images, scales, coords, libraries, patch_size, out_size)
    outside = reader.outside()
    if outside.any():
        parts = []
        for lib in pd.unique(libraries[outside]):
            sel = outside & (libraries == lib)
            h, w = images[lib].shape[:2]
            parts.append(
                f"section {lib!r}: {int(sel.sum())} spots (e.g. {list(adata.obs_names[sel][:3])}) in a "
                f"{h}x{w} px image"
            )
        sides = {patch_size[lib] if isinstance(patch_size, Mapping) else patch_size for lib in pd.unique(libraries[outside])}
        shown = f"{sides.pop():g} px" if len(sides) == 1 else "full-size"
        raise InputError(
            f"{int(outside.sum())} spots have a {shown} patch that falls outside their image: "
            + "; ".join(parts)
            + f". Check adata.obsm[{spatial_key!r}] (full-resolution pixels, x = column) and the scale factor, "
            "or drop those spots."
        )
    return reader


#: ``adata.uns["spatial"][library]["metadata"][PIXEL_SIZE_KEY]``: micrometres per full-resolution pixel
#: (written by st_predict's readers when the platform or the file says it).
PIXEL_SIZE_KEY = "pixel_size_um"


def section_pixel_sizes(adata: AnnData, libraries: np.ndarray) -> dict[str, float | None]:
    """Micrometres per full-resolution pixel of every section, from
    ``adata.uns["spatial"][library]["metadata"]["pixel_size_um"]`` (``None`` where unknown)."""
    spatial = adata.uns.get("spatial")
    out: dict[str, float | None] = {}
    for lib in pd.unique(np.asarray(libraries)):
        entry = spatial.get(lib) if isinstance(spatial, Mapping) else None
        meta = entry.get("metadata") if isinstance(entry, Mapping) else None
        value = meta.get(PIXEL_SIZE_KEY) if isinstance(meta, Mapping) else None
        try:
            value = float(value) if value is not None else None
        except (TypeError, ValueError):
            value = None
        out[str(lib)] = value if value is not None and np.isfinite(value) and value > 0 else None
    return out
