"""Checks before ``predict`` writes anything: the key it writes to, and whether the spots sit where their tissue is.

The commonest mistakes in spatial data put the spots in the wrong place without any error: x and y swapped,
coordinates in the pixels of a downscaled image (``hires``) while the image is at full resolution, or in
micrometres. Each shows in the data alone:

- the array grid (``obs["array_col"]`` / ``["array_row"]``, HER2ST's ``array_x`` / ``array_y``) runs along the
  other image axis;
- the spot pitch in micrometres (coordinates x the section's pixel size) is far from the training data's and from
  every platform's;
- the patches fall on glass (bright, unstained pixels) far more often than on a section's tissue.

On HER2ST C2 (0.737 um/px, all spots under tissue) the correct coordinates put 0 % of the patches on glass; swapped
ones 18 %, hires-pixel ones (x 0.2) 100 %, micrometre ones 70 % (C3: 0, 37, 100, 36 %).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from st_predict._utils import InputError, InputWarning, warn

#: centre-to-centre spot distances of the platforms st_predict reads (micrometres): Visium, the original ST array
#: (and HER2ST's), Visium HD's 2, 8 and 16 um bins
PLATFORM_PITCHES_UM = {"Visium": 100.0, "ST": 200.0, "Visium HD 2 um": 2.0, "Visium HD 8 um": 8.0,
                       "Visium HD 16 um": 16.0}
#: a pitch within this factor of the training pitch or of a platform's is plausible
PITCH_TOLERANCE = 1.3
#: a section with more of its patches on glass than this is refused (unless allow_off_tissue=True)
BACKGROUND_LIMIT = 0.25
#: a pixel is glass when its grey level is at least this and its colour channels differ by less than GLASS_SPREAD
GLASS_GREY, GLASS_SPREAD = 210, 30
#: a patch is on glass when at least this fraction of its pixels is
GLASS_PATCH_FRACTION = 0.75
#: patches read per section for the check
SAMPLE = 256
#: the array-grid column pairs (along x, along y) of Visium (spaceranger) and of HER2ST / ST
ARRAY_COLUMNS = (("array_col", "array_row"), ("array_x", "array_y"))


def check_key_added(adata, key_added: str, spatial_key: str, overwrite: bool) -> None:
    """Refuse an ``obsm`` key for predictions that holds the user's data: the spot coordinates always, and any
    other existing key that no earlier ``predict`` wrote (``uns["st_predict"]`` records those) unless
    ``overwrite``."""
    if not isinstance(key_added, str) or not key_added:
        raise InputError(f"key_added must be a non-empty string, got {key_added!r}.")
    keys = [key_added, f"{key_added}_lower", f"{key_added}_upper"]
    if spatial_key in keys:
        raise InputError(f"key_added={key_added!r} would replace the spot coordinates in adata.obsm[{spatial_key!r}]: "
                         "choose another key (the default is 'nh2st').")
    meta = adata.uns.get("st_predict")
    written_by_predict = isinstance(meta, Mapping) and key_added in meta
    taken = [k for k in keys if k in adata.obsm]
    if taken and not (written_by_predict or overwrite):
        raise InputError(f"adata.obsm[{taken[0]!r}] already holds data that st_predict did not write: pass "
                         "overwrite=True to replace it, or choose another key_added.")


def glass_fraction(patches) -> np.ndarray:
    """Per ``(N, 3, H, W)`` uint8 patch, whether it lies on glass (see :data:`GLASS_PATCH_FRACTION`)."""
    p = np.asarray(patches, dtype=np.int16)
    grey = p.mean(1)
    spread = p.max(1) - p.min(1)
    glass = ((grey >= GLASS_GREY) & (spread < GLASS_SPREAD)).mean((1, 2))
    return glass >= GLASS_PATCH_FRACTION


def _pitch_px(xy: np.ndarray) -> float | None:
    from scipy.spatial import cKDTree

    if len(xy) < 3:
        return None
    return float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))


def _near(value: float, refs: dict[str, float]) -> str | None:
    for name, ref in refs.items():
        if ref / PITCH_TOLERANCE <= value <= ref * PITCH_TOLERANCE:
            return name
    return None


def _swapped_axes(obs: pd.DataFrame, xy: np.ndarray) -> str | None:
    """The array columns whose grid runs along the other image axis, if the section has them."""
    for col_x, col_y in ARRAY_COLUMNS:
        if col_x in obs and col_y in obs and len(xy) >= 3:
            ax, ay = (pd.to_numeric(obs[c], errors="coerce").to_numpy(float) for c in (col_x, col_y))
            if not (np.isfinite(ax).all() and np.isfinite(ay).all()) or ax.std() == 0 or ay.std() == 0:
                return None
            if xy[:, 0].std() == 0 or xy[:, 1].std() == 0:
                return None
            straight = abs(np.corrcoef(ax, xy[:, 0])[0, 1]) + abs(np.corrcoef(ay, xy[:, 1])[0, 1])
            crossed = abs(np.corrcoef(ax, xy[:, 1])[0, 1]) + abs(np.corrcoef(ay, xy[:, 0])[0, 1])
            if crossed > 1.6 and straight < 0.8:
                return f"obs[{col_x!r}] (the array's x) follows the image's y"
            return None
    return None


def check_placement(model, adata, reader, coords: np.ndarray, libraries: np.ndarray, spatial_key: str,
                    allow_off_tissue: bool = False) -> None:
    """Raise an :class:`~st_predict.InputError` naming the likely cause where a section's spots are not on its
    tissue (swapped x/y, downscaled-image pixels, micrometres); warn where its patches hold one colour only.
    ``reader``: the patch reader of these spots, ``coords``: their full-resolution (x, y)."""
    from st_predict.pp import section_pixel_sizes

    sizes = section_pixel_sizes(adata, libraries)
    refs = dict(PLATFORM_PITCHES_UM)
    if model.spot_pitch_um_:
        refs = {"the training data": float(model.spot_pitch_um_), **refs}
    where = f"adata.obsm[{spatial_key!r}]"
    fix = "; if the spots are where you mean them, pass allow_off_tissue=True."
    rng = np.random.default_rng(0)
    for lib in pd.unique(libraries):
        sel = np.flatnonzero(libraries == lib)
        xy = coords[sel]
        swapped = _swapped_axes(adata.obs.iloc[sel], xy)
        if swapped and not allow_off_tissue:
            raise InputError(f"Section {lib!r}: x and y look swapped in {where}: {swapped} (x = column, y = row "
                             f"expected). Swap its columns{fix}")
        pixel, pitch = sizes.get(lib), _pitch_px(xy)
        if pixel and pitch and not allow_off_tissue:
            pitch_um = pitch * pixel
            if _near(pitch_um, refs) is None:
                ref_name, ref = next(iter(refs.items()))
                head = (f"Section {lib!r}: its spots are {pitch_um:.3g} um apart ({pitch:.3g} px of {pixel:.3g} um), "
                        f"far from {ref_name}'s {ref:.3g} um and from every platform's")
                as_um = _near(pitch, refs)
                if as_um is not None and abs(pixel - 1) > 0.1:
                    why = (f"{where} looks like micrometres ({pitch:.3g} units apart, as on {as_um}): divide it by "
                           f"the pixel size ({pixel:.3g} um/px) to get full-resolution pixels")
                elif pitch_um < ref:
                    why = (f"{where} looks like pixels of an image downscaled about {ref / pitch_um:.2g}x (e.g. "
                           "'hires'): divide it by that image's scale factor (tissue_hires_scalef) to get "
                           "full-resolution pixels")
                else:
                    why = (f"{where} looks like pixels of an image upscaled about {pitch_um / ref:.2g}x, or the pixel "
                           "size in uns['spatial'][...]['metadata']['pixel_size_um'] is wrong")
                raise InputError(f"{head}: {why}{fix}")
        pick = np.sort(rng.choice(sel, size=min(SAMPLE, len(sel)), replace=False))
        patches = reader.read(pick).numpy()
        if float(patches.reshape(len(pick), 3, -1).std(-1).max()) < 2.0:
            warn(f"Section {lib!r}: its patches hold no tissue (the image is one colour under every spot): the "
                 "predictions are the model's response to a blank patch.", InputWarning)
            continue
        glass = float(glass_fraction(patches).mean())
        if glass > BACKGROUND_LIMIT and not allow_off_tissue:  # (a swap the array grid shows was raised above)
            raise InputError(f"Section {lib!r}: {glass:.0%} of its patches fall on glass (bright, unstained "
                             f"pixels), more than {BACKGROUND_LIMIT:.0%}: the spots in {where} are not on the tissue "
                             "of its image. Check that x is the column and y the row, and that the coordinates are "
                             "full-resolution pixels of this image (not of a downscaled copy, nor micrometres). Keep "
                             f"only spots under tissue (e.g. obs['in_tissue'] == 1){fix}")
