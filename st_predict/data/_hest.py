"""Reader for HEST-1k samples: ``st/<id>.h5ad`` + pyramidal ``wsis/<id>.tif`` + ``metadata/<id>.json``."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from st_predict._utils import SECTION_KEY, InputError, MissingFileError, MissingKeyError

from ._images import read_fullres_image
from ._sections import concat_sections

logger = logging.getLogger(__name__)

_LAYOUT = "st/<id>.h5ad, wsis/<id>.tif, metadata/<id>.json"


def _spot_centres(adata: ad.AnnData, h5ad: Path) -> np.ndarray:
    if "spatial" in adata.obsm:
        coords = adata.obsm["spatial"]
        coords = np.asarray(coords.to_numpy() if isinstance(coords, pd.DataFrame) else coords, dtype=np.float64)
        if coords.ndim != 2 or coords.shape[1] < 2:
            raise InputError(f"{h5ad}: obsm['spatial'] must be (n_spots, 2), got shape {coords.shape}.")
        coords = coords[:, :2]
    elif {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(adata.obs):
        coords = adata.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    else:
        raise MissingKeyError(f"{h5ad} has no obsm['spatial'] (nor obs 'pxl_col_in_fullres'/'pxl_row_in_fullres').")
    bad = ~np.isfinite(coords).all(1)
    if bad.any():
        raise InputError(
            f"{h5ad}: {int(bad.sum())} spots have NaN/inf coordinates, e.g. {list(adata.obs_names[bad][:3])}."
        )
    return np.ascontiguousarray(coords)


def _read_sample(h5ad: Path, sample_id: str, wsi: Path, metadata: Path) -> ad.AnnData:
    missing = [str(p) for p in (h5ad, wsi, metadata) if not p.is_file()]
    if missing:
        raise MissingFileError(f"HEST sample {sample_id!r}: missing {', '.join(missing)} (layout: {_LAYOUT}).")
    meta = json.loads(metadata.read_text())
    if not isinstance(meta, dict):
        raise InputError(f"{metadata} must hold a JSON object, got {type(meta).__name__}.")
    adata = ad.read_h5ad(h5ad)
    coords = _spot_centres(adata, h5ad)
    image = read_fullres_image(wsi)
    h, w = int(image.shape[0]), int(image.shape[1])
    meta_w, meta_h = meta.get("fullres_px_width"), meta.get("fullres_px_height")
    if meta_w is not None and meta_h is not None and (int(meta_w), int(meta_h)) != (w, h):
        raise InputError(
            f"HEST sample {sample_id!r}: level 0 of {wsi} is {w}x{h} px (width x height) but {metadata} says "
            f"fullres_px_width x fullres_px_height = {meta_w}x{meta_h}."
        )
    outside = (coords[:, 0] < 0) | (coords[:, 0] >= w) | (coords[:, 1] < 0) | (coords[:, 1] >= h)
    if outside.mean() > 0.5:
        raise InputError(
            f"HEST sample {sample_id!r}: {int(outside.sum())} of {len(coords)} spot centres of {h5ad} lie outside "
            f"the {w}x{h} px image {wsi} (obsm['spatial'] must be level-0 pixels, x = column, y = row)."
        )
    if outside.any():
        logger.warning(
            "HEST sample %s: %d spot centres lie outside the %dx%d px image.", sample_id, int(outside.sum()), w, h
        )

    old = adata.uns.get("spatial", {})
    old = next(iter(old.values())) if isinstance(old, dict) and len(old) == 1 else {}  # HEST names it "ST"
    images = dict(old.get("images", {}))
    scalefactors = dict(old.get("scalefactors", {}))
    images["fullres"] = image
    scalefactors["tissue_fullres_scalef"] = 1.0
    pixel_size = None
    for key in ("pixel_size_um_estimated", "pixel_size_um_embedded"):  # HEST works with the estimated one
        value = meta.get(key)
        if isinstance(value, int | float) and np.isfinite(value) and value > 0:
            pixel_size = float(value)
            break
    if "spot_diameter_fullres" not in scalefactors and pixel_size and meta.get("spot_diameter"):
        scalefactors["spot_diameter_fullres"] = float(meta["spot_diameter"]) / pixel_size
    info = dict(old.get("metadata", {}))
    info.update({k: v for k, v in meta.items() if isinstance(v, str | bool | int | float)})  # JSON scalars, no nulls
    info.update({"source_image_path": str(wsi), "hest_id": sample_id})
    if pixel_size is not None:
        info["pixel_size_um"] = pixel_size

    adata.obsm["spatial"] = coords
    if SECTION_KEY in adata.obs:
        logger.info("HEST sample %s: obs[%r] is overwritten with the sample id.", sample_id, SECTION_KEY)
    adata.obs[SECTION_KEY] = pd.Categorical([sample_id] * adata.n_obs, categories=[sample_id])
    adata.uns["spatial"] = {sample_id: {"images": images, "scalefactors": scalefactors, "metadata": info}}
    return adata


def read_hest(
    root_or_h5ad: str | os.PathLike,
    sample_id: str | Sequence[str] | None = None,
    wsi_file: str | os.PathLike | None = None,
    metadata_file: str | os.PathLike | None = None,
) -> ad.AnnData:
    """Read HEST-1k samples (expression, spot centres and the whole-slide H&E image, lazily).

    A HEST-1k download holds, per sample ``<id>``: ``st/<id>.h5ad`` (counts, ``obsm["spatial"]`` in
    level-0 pixels of the WSI), ``wsis/<id>.tif`` (pyramidal TIFF; level 0 is full resolution) and
    ``metadata/<id>.json`` (``pixel_size_um_estimated``, ``spot_diameter``, ``inter_spot_dist``...).
    The WSI is **never loaded whole**: level 0 is a dask array over the TIFF's tiles, read only where a
    patch is cropped.

    Parameters
    ----------
    root_or_h5ad
        The HEST folder (holding ``st/``, ``wsis/``, ``metadata/``), or one sample's ``.h5ad`` (its id is
        the file name; the WSI and metadata are looked up in ``../wsis`` and ``../metadata``).
    sample_id
        Sample id, or a list of ids (read into one AnnData, see :func:`concat_sections`). ``None``: the
        only sample of the folder.
    wsi_file, metadata_file
        Other locations of the WSI / metadata JSON (one sample only).

    Returns
    -------
    AnnData
        The h5ad's expression (HEST stores raw counts), ``obs["section"]`` = sample id,
        ``obsm["spatial"]`` (level-0 pixels, x = column, y = row) and ``uns["spatial"][<id>]`` with
        ``images`` (``fullres``: lazy ``(H, W, 3)`` uint8 dask array; HEST's ``downscaled_fullres``
        thumbnail), ``scalefactors`` (``tissue_fullres_scalef = 1.0``,
        ``tissue_downscaled_fullres_scalef``, ``spot_diameter_fullres``) and ``metadata`` (the JSON's
        scalar fields, ``pixel_size_um`` in µm/px and ``source_image_path``).

    Examples
    --------
    >>> adata = st_predict.data.read_hest("hest_data", sample_id=["TENX95", "TENX99"])  # doctest: +SKIP
    >>> st_predict.NH2ST.setup_anndata(adata, image_key="fullres", library_key="section")  # doctest: +SKIP
    """
    path = Path(root_or_h5ad)
    if path.is_file():
        if path.suffix != ".h5ad":
            raise InputError(f"{path} is neither a HEST folder nor an .h5ad file.")
        if sample_id is not None and (not isinstance(sample_id, str) or sample_id != path.stem):
            raise InputError(
                f"sample_id={sample_id!r} does not match the h5ad file {path.name}; pass the HEST folder instead."
            )
        root = path.parent.parent if path.parent.name == "st" else path.parent
        sid = path.stem
        return _read_sample(
            path, sid, Path(wsi_file) if wsi_file else root / "wsis" / f"{sid}.tif",
            Path(metadata_file) if metadata_file else root / "metadata" / f"{sid}.json",
        )
    if not path.is_dir():
        raise MissingFileError(f"HEST folder or h5ad file {path} does not exist.")
    if not (path / "st").is_dir():
        raise MissingFileError(f"{path} has no 'st' folder; is it a HEST-1k folder ({_LAYOUT})?")
    available = sorted(p.stem for p in (path / "st").glob("*.h5ad"))
    if sample_id is None:
        if len(available) != 1:
            raise InputError(
                f"{path / 'st'} holds {len(available)} samples {available[:20]}; pass sample_id= (one id or a list)."
            )
        sample_id = available[0]
    ids = [sample_id] if isinstance(sample_id, str) else [str(s) for s in sample_id]
    missing = [s for s in ids if s not in available]
    if missing or not ids:
        more = f" ... ({len(available)} in all)" if len(available) > 20 else ""
        raise MissingFileError(
            f"HEST samples {missing or ids} not found in {path / 'st'} (have {available[:20]}{more})."
        )
    if len(ids) > 1 and (wsi_file is not None or metadata_file is not None):
        raise InputError("wsi_file= / metadata_file= name one sample's files; read several samples without them.")
    adatas = [
        _read_sample(
            path / "st" / f"{s}.h5ad", s, Path(wsi_file) if wsi_file else path / "wsis" / f"{s}.tif",
            Path(metadata_file) if metadata_file else path / "metadata" / f"{s}.json",
        )
        for s in ids
    ]
    return adatas[0] if len(adatas) == 1 else concat_sections(adatas)
