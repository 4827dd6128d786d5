"""Reader for 10x Visium Space Ranger output (through squidpy), with the full-resolution H&E image."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from st_predict._utils import SECTION_KEY, InputError, InputTypeError, MissingFileError, MissingKeyError

from ._images import read_fullres_image
from ._sections import concat_sections

logger = logging.getLogger(__name__)

#: Diameter (µm) of the theoretical spot that Space Ranger's ``spot_diameter_fullres`` spans.
VISIUM_SPOT_DIAMETER_UM = 65.0

PathLike = str | os.PathLike


def _library_id_from_h5(counts: Path, root: Path) -> str:
    """The h5's ``library_ids`` attribute (Space Ranger writes it), else the sample folder's name."""
    if counts.suffix == ".h5":
        import h5py

        with h5py.File(counts, "r") as f:
            ids = f.attrs.get("library_ids")
        if ids is not None and len(np.atleast_1d(ids)):
            lid = np.atleast_1d(ids)[0]
            return lid.decode("utf-8") if isinstance(lid, bytes) else str(lid)
    return (root.parent if root.name == "outs" else root).name


def _check_outs(root: Path, counts_file: str) -> Path:
    """The folder holding the counts and ``spatial/`` (``root`` or ``root/outs``), with every file checked."""
    if not root.is_dir():
        raise MissingFileError(f"Space Ranger output folder {root} does not exist.")
    if not (root / counts_file).exists() and (root / "outs" / counts_file).exists():
        root = root / "outs"
    spatial = root / "spatial"
    missing = [root / counts_file] if not (root / counts_file).exists() else []
    for name in ("scalefactors_json.json", "tissue_hires_image.png", "tissue_lowres_image.png"):
        if not (spatial / name).is_file():
            missing.append(spatial / name)
    if not (spatial / "tissue_positions.csv").is_file() and not (spatial / "tissue_positions_list.csv").is_file():
        hint = ""
        if (spatial / "tissue_positions.parquet").is_file():
            hint = " (only tissue_positions.parquet is there: Visium HD output is not supported)"
        missing.append(f"{spatial / 'tissue_positions.csv'} or tissue_positions_list.csv{hint}")
    if missing:
        raise MissingFileError(
            f"{root} is not a complete Space Ranger output ('outs') folder; missing: "
            + ", ".join(map(str, missing))
            + "."
        )
    return root


def _check_fullres_size(image, image_file: Path, scalefactors: Mapping, hires: np.ndarray | None, lib: str) -> None:
    """Raise if ``tissue_hires_scalef`` x full-resolution size is not the hires image's size."""
    scalef = scalefactors.get("tissue_hires_scalef")
    if hires is None or scalef is None:
        return
    h, w = int(image.shape[0]), int(image.shape[1])
    hh, hw = int(hires.shape[0]), int(hires.shape[1])
    exp_h, exp_w = h * float(scalef), w * float(scalef)
    # Space Ranger rounds the hires image's size; allow a pixel (and 1%) of slack
    if abs(exp_h - hh) > 1 + 0.01 * hh or abs(exp_w - hw) > 1 + 0.01 * hw:
        raise InputError(
            f"Library {lib!r}: the full-resolution image {image_file} is {w}x{h} px (width x height), but "
            f"spatial/tissue_hires_image.png is {hw}x{hh} px with tissue_hires_scalef={scalef:g}, which implies "
            f"a full-resolution image of about {hw / scalef:.0f}x{hh / scalef:.0f} px. Pass the image Space "
            "Ranger was run with (its --image / --darkimage / --colorizedimage)."
        )


def _read_one(
    path: PathLike, library_id: str | None, fullres_image_file: PathLike | None, counts_file: str, kwargs: dict
) -> ad.AnnData:
    from st_predict._utils import import_squidpy

    sq = import_squidpy()

    root = _check_outs(Path(path), counts_file)
    lib = str(library_id) if library_id is not None else _library_id_from_h5(root / counts_file, root)
    image_file = Path(fullres_image_file) if fullres_image_file is not None else None
    if image_file is not None and not image_file.is_file():
        raise MissingFileError(f"Full-resolution image {image_file} (library {lib!r}) does not exist.")
    with warnings.catch_warnings():
        # 10x matrices name genes by symbol, which repeat (e.g. paralogues): made unique below
        warnings.filterwarnings("ignore", message="Variable names are not unique", category=UserWarning)
        adata = sq.read.visium(
            root, counts_file=counts_file, library_id=lib, load_images=True, source_image_path=image_file, **kwargs
        )
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    # squidpy merges the positions into obs by barcode (left join): barcodes without a row have NaN
    coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    bad = ~np.isfinite(coords).all(1)
    if bad.any():
        raise InputError(
            f"Library {lib!r}: {int(bad.sum())} barcodes of {root / counts_file} have no row in "
            f"{root / 'spatial'}/tissue_positions*.csv, e.g. {list(adata.obs_names[bad][:3])}."
        )
    adata.obsm["spatial"] = coords
    entry = adata.uns["spatial"][lib]
    scalefactors = entry["scalefactors"]
    spot = scalefactors.get("spot_diameter_fullres")
    if spot:
        entry["metadata"]["pixel_size_um"] = VISIUM_SPOT_DIAMETER_UM / float(spot)
    if image_file is not None:
        image = read_fullres_image(image_file)
        _check_fullres_size(image, image_file, scalefactors, entry["images"].get("hires"), lib)
        entry["images"]["fullres"] = image
        scalefactors["tissue_fullres_scalef"] = 1.0
    adata.obs[SECTION_KEY] = pd.Categorical([lib] * adata.n_obs, categories=[lib])
    return adata


def _read_sections(path, library_id, fullres_image_file, read_one) -> ad.AnnData:
    """One section (``path`` a folder) or several (``path`` a ``{library_id: folder}`` mapping, with
    ``fullres_image_file`` a mapping with the same keys), each read by ``read_one(folder, library_id, image)``
    and joined by :func:`concat_sections`: the Space Ranger readers' shared front."""
    if isinstance(path, Mapping):
        if library_id is not None:
            raise InputError("library_id= cannot be combined with a {library_id: path} mapping.")
        if fullres_image_file is not None and not isinstance(fullres_image_file, Mapping):
            raise InputTypeError(
                "With a {library_id: path} mapping, fullres_image_file must be a mapping with the same keys."
            )
        images = dict(fullres_image_file or {})
        unknown = sorted(set(map(str, images)) - set(map(str, path)))
        if unknown:
            raise MissingKeyError(f"fullres_image_file names libraries that path does not: {unknown}.")
        return concat_sections([read_one(p, str(lib), images.get(lib)) for lib, p in path.items()])
    if isinstance(fullres_image_file, Mapping):
        raise InputTypeError("fullres_image_file must be one file when path is one folder.")
    return read_one(path, library_id, fullres_image_file)


def read_visium(
    path: PathLike | Mapping[str, PathLike],
    library_id: str | None = None,
    fullres_image_file: PathLike | Mapping[str, PathLike] | None = None,
    counts_file: str = "filtered_feature_bc_matrix.h5",
    **kwargs,
) -> ad.AnnData:
    """Read 10x Visium sections (Space Ranger output) with their full-resolution H&E image.

    The 10x files are parsed by :func:`squidpy.read.visium`: the counts h5,
    ``spatial/tissue_positions.csv`` (or ``tissue_positions_list.csv``), ``spatial/scalefactors_json.json``
    and the hires / lowres PNGs. The full-resolution H&E image (the one Space Ranger was run with) is
    added as ``uns["spatial"][library_id]["images"]["fullres"]`` with ``tissue_fullres_scalef = 1.0``:
    TIFFs are read lazily (a dask array; patches read only the tiles under them), other formats are
    decoded into memory. Its size is checked against ``tissue_hires_scalef`` and the hires image.

    Parameters
    ----------
    path
        Space Ranger's ``outs`` folder (or the sample folder holding ``outs``). A ``{library_id: path}``
        mapping reads several sections into one AnnData (see :func:`concat_sections`).
    library_id
        Section name (default: the h5's ``library_ids`` attribute, else the sample folder's name). Not
        with a mapping ``path``.
    fullres_image_file
        The full-resolution H&E image (TIFF, JPEG, PNG); with a mapping ``path``, a mapping with the same
        keys. ``None``: only the hires/lowres images (crop with ``image_key="hires"``).
    counts_file
        The counts h5 inside ``outs`` (``raw_feature_bc_matrix.h5``: every spot, also off tissue).
    **kwargs
        Passed to :func:`scanpy.read_10x_h5` through squidpy (e.g. ``gex_only``, ``genome``).

    Returns
    -------
    AnnData
        Raw counts in ``X`` (gene symbols as ``var_names``, made unique; Ensembl ids in
        ``var["gene_ids"]``), ``obs["section"]`` (categorical), ``obs`` columns ``in_tissue``,
        ``array_row`` and ``array_col``, ``obsm["spatial"]`` (full-resolution pixels, x = column,
        y = row) and ``uns["spatial"][library_id]`` with ``images`` (``hires``, ``lowres``,
        ``fullres``), ``scalefactors`` (Space Ranger's, plus ``tissue_fullres_scalef``) and
        ``metadata`` (with ``pixel_size_um`` estimated as 65 µm / ``spot_diameter_fullres``).

    Examples
    --------
    >>> adata = st_predict.data.read_visium("sample/outs", fullres_image_file="sample/he.tif")  # doctest: +SKIP
    >>> st_predict.NH2ST.setup_anndata(adata, image_key="fullres", library_key="section")  # doctest: +SKIP
    """
    return _read_sections(path, library_id, fullres_image_file,
                         lambda p, lib, image: _read_one(p, lib, image, counts_file, kwargs))
