"""Reader for 10x Visium HD Space Ranger output (through spatialdata-io), one bin size at a time."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from st_predict._utils import SECTION_KEY, InputError, InputTypeError, MissingFileError, MissingKeyError

from ._images import read_fullres_image
from ._visium import _check_fullres_size, _read_sections

PathLike = str | os.PathLike

#: Space Ranger's columns of ``tissue_positions.parquet``, in its order (spatialdata-io requires it)
_POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
_SCALEFACTOR_KEYS = ("spot_diameter_fullres", "bin_size_um", "microns_per_pixel", "tissue_hires_scalef",
                     "tissue_lowres_scalef")
_BIN_DIR = re.compile(r"square_(\d{3})um")


def _import_spatialdata_io():
    try:
        import spatialdata_io
    except ImportError as err:
        raise ImportError(
            f"read_visium_hd needs spatialdata-io ({err}): pip install 'st-predict[hd]'."
        ) from err
    return spatialdata_io


def _hd_root(path: PathLike) -> Path:
    """The folder holding ``binned_outputs/`` (``path`` or ``path/outs``)."""
    root = Path(path)
    if not root.is_dir():
        raise MissingFileError(f"Space Ranger output folder {root} does not exist.")
    if not (root / "binned_outputs").is_dir() and (root / "outs" / "binned_outputs").is_dir():
        root = root / "outs"
    if not (root / "binned_outputs").is_dir():
        hint = ""
        if (root / "spatial" / "tissue_positions.csv").is_file() or (root / "outs" / "spatial").is_dir():
            hint = " It looks like Visium (55 um spots) output: read it with st_predict.data.read_visium."
        raise MissingFileError(
            f"{root} is not a Visium HD Space Ranger output ('outs') folder: {root / 'binned_outputs'} does not "
            f"exist.{hint}"
        )
    return root


def _bin_sizes(root: Path) -> dict[int, Path]:
    """``{bin size (um): its folder}`` under ``binned_outputs/``."""
    found = {}
    for d in sorted((root / "binned_outputs").iterdir()):
        m = _BIN_DIR.fullmatch(d.name)
        if m and d.is_dir():
            found[int(m.group(1))] = d
    return found


def _feature_slice(root: Path, library_id: str | None) -> str:
    """The file-name prefix of ``feature_slice.h5`` (``""`` or ``"<dataset>_"``, as 10x's downloads name it)."""
    if (root / "feature_slice.h5").is_file():
        return ""
    found = sorted(p.name[: -len("feature_slice.h5")] for p in root.glob("*_feature_slice.h5") if p.is_file())
    if library_id is not None and f"{library_id}_" in found:
        return f"{library_id}_"
    if len(found) == 1:
        return found[0]
    if not found:
        raise MissingFileError(
            f"{root} is not a complete Visium HD output folder; missing: {root / 'feature_slice.h5'} (or "
            "<dataset>_feature_slice.h5)."
        )
    raise InputError(
        f"{root} holds several feature slice files ({', '.join(f + 'feature_slice.h5' for f in found)}): pass "
        "library_id= naming the dataset (the prefix before _feature_slice.h5)."
    )


def _check_bin_folder(root: Path, folder: Path, size: int, counts_file: str) -> dict:
    """Raise naming every file of the bin folder spatialdata-io needs that is missing; its scale factors."""
    spatial = folder / "spatial"
    missing = [folder / counts_file] if not (folder / counts_file).is_file() else []
    for name in ("tissue_positions.parquet", "scalefactors_json.json"):
        if not (spatial / name).is_file():
            missing.append(spatial / name)
    for name in ("tissue_hires_image.png", "tissue_lowres_image.png"):
        if not (spatial / name).is_file() and not (root / "spatial" / name).is_file():
            missing.append(spatial / name)
    if missing:
        raise MissingFileError(
            f"{folder} is not a complete Visium HD bin folder; missing: " + ", ".join(map(str, missing)) + "."
        )
    sf_file = spatial / "scalefactors_json.json"
    try:
        scalefactors = json.loads(sf_file.read_text())
    except ValueError as err:
        raise InputError(f"{sf_file} is not valid JSON: {err}.") from err
    absent = [k for k in _SCALEFACTOR_KEYS if k not in scalefactors]
    if absent:
        raise MissingKeyError(f"{sf_file} has no {', '.join(map(repr, absent))} (Space Ranger >= 3 writes them).")
    side, mpp = float(scalefactors["spot_diameter_fullres"]), float(scalefactors["microns_per_pixel"])
    if float(scalefactors["bin_size_um"]) != size or not np.isclose(size / side, mpp):
        raise InputError(
            f"{sf_file} does not describe {size} um bins: bin_size_um={scalefactors['bin_size_um']}, "
            f"spot_diameter_fullres={side:g} px and microns_per_pixel={mpp:g} (expected bin_size_um={size} and "
            "bin_size_um / spot_diameter_fullres = microns_per_pixel)."
        )
    import pyarrow.parquet as pq

    positions = spatial / "tissue_positions.parquet"
    columns = list(pq.read_schema(positions).names)
    if columns[: len(_POSITION_COLUMNS)] != _POSITION_COLUMNS or len(columns) != len(_POSITION_COLUMNS):
        raise InputError(f"{positions} has columns {columns}; Space Ranger writes {_POSITION_COLUMNS} (in this order).")
    return scalefactors


def _h5_attrs(counts: Path) -> dict:
    import h5py

    with h5py.File(counts, "r") as f:
        attrs = {k: f.attrs[k] for k in ("library_ids", "chemistry_description", "software_version") if k in f.attrs}
    out = {}
    for k, v in attrs.items():
        v = np.atleast_1d(v)
        if len(v):
            out[k] = v[0].decode("utf-8") if isinstance(v[0], bytes) else str(v[0])
    return out


def _image(sdata, name: str) -> np.ndarray:
    """An image element of ``sdata`` as ``(H, W, C)`` uint8 (RGBA: its RGB), as squidpy stores hires / lowres."""
    arr = np.asarray(sdata.images[name].transpose("y", "x", "c").data)
    return np.ascontiguousarray(arr[..., :3] if arr.shape[-1] == 4 else arr)


def _read_one(
    path: PathLike,
    bin_size_um,
    library_id: str | None,
    fullres_image_file: PathLike | None,
    in_tissue_only: bool,
    filtered_counts_file: bool,
    gex_only: bool,
) -> ad.AnnData:
    root = _hd_root(path)
    if isinstance(bin_size_um, bool) or not isinstance(bin_size_um, int | float | np.integer | np.floating):
        raise InputTypeError(f"bin_size_um must be a number of micrometres (2, 8 or 16), got {bin_size_um!r}.")
    available = _bin_sizes(root)
    if not available:
        raise MissingFileError(f"{root / 'binned_outputs'} holds no square_<size>um folder.")
    size = int(bin_size_um) if float(bin_size_um).is_integer() else None
    if size not in available:
        raise InputError(
            f"bin_size_um={bin_size_um!r}: {root / 'binned_outputs'} has bins of "
            f"{', '.join(f'{s} um' for s in available)} only (bin_size_um={', '.join(map(str, available))})."
        )
    folder = available[size]
    counts_file = "filtered_feature_bc_matrix.h5" if filtered_counts_file else "raw_feature_bc_matrix.h5"
    scalefactors = _check_bin_folder(root, folder, size, counts_file)
    prefix = _feature_slice(root, library_id)
    attrs = _h5_attrs(folder / counts_file)
    lib = str(library_id) if library_id is not None else (
        attrs.get("library_ids") or prefix.rstrip("_") or (root.parent if root.name == "outs" else root).name
    )
    image_file = Path(fullres_image_file) if fullres_image_file is not None else None
    if image_file is not None and not image_file.is_file():
        raise MissingFileError(f"Full-resolution image {image_file} (library {lib!r}) does not exist.")
    hires_file = folder / "spatial" / "tissue_hires_image.png"
    if not hires_file.is_file():
        hires_file = root / "spatial" / "tissue_hires_image.png"

    sdio = _import_spatialdata_io()
    dataset_id = prefix.rstrip("_") or lib
    with warnings.catch_warnings():
        # 10x matrices name genes by symbol, which repeat (e.g. paralogues): spatialdata-io makes them unique
        warnings.filterwarnings("ignore", message="Variable names are not unique", category=UserWarning)
        try:
            # the full-resolution image is read here, lazily by tiles; spatialdata-io would decode a .btf whole
            # (imageio) or look for one itself, so it is handed the small hires PNG in its place
            sdata = sdio.visium_hd(
                root, dataset_id=dataset_id, filtered_counts_file=filtered_counts_file, load_segmentations_only=False,
                bin_size=size, fullres_image_file=hires_file, gex_only=gex_only, var_names_make_unique=True,
                image_models_kwargs={"scale_factors": []},
            )
        except KeyError as err:  # barcodes of the counts without a row in the positions
            raise InputError(
                f"Library {lib!r}: barcodes of {folder / counts_file} have no row in "
                f"{folder / 'spatial' / 'tissue_positions.parquet'}: {err}"
            ) from err
    table = sdata.tables[folder.name]

    X = sparse.csr_matrix(table.X)
    if X.nnz and np.array_equal(X.data, np.round(X.data)):
        X = X.astype(np.int32)
    obs = pd.DataFrame(
        {k: np.asarray(table.obs[k]).astype(np.int64) for k in ("in_tissue", "array_row", "array_col")},
        index=pd.Index(table.obs_names.astype(str)),
    )
    adata = ad.AnnData(X=X, obs=obs, var=table.var.copy())
    adata.obsm["spatial"] = np.asarray(table.obsm["spatial"], dtype=np.float64)  # (pxl_col, pxl_row) = (x, y)
    if in_tissue_only:
        keep = adata.obs["in_tissue"].to_numpy() == 1
        if not keep.any():
            raise InputError(
                f"Library {lib!r}: no bin of {folder / counts_file} is in tissue (in_tissue == 1 in "
                f"{folder / 'spatial' / 'tissue_positions.parquet'}); in_tissue_only=False keeps them all."
            )
        if not keep.all():
            adata = adata[keep].copy()

    images = {"hires": _image(sdata, f"{dataset_id}_hires_image"), "lowres": _image(sdata, f"{dataset_id}_lowres_image")}
    scalefactors = dict(scalefactors)
    side = float(scalefactors["spot_diameter_fullres"])
    metadata = {k: v for k, v in attrs.items() if k != "library_ids"}
    metadata["bin_size_um"] = size
    metadata["spot_shape"] = "square"  # a bin's footprint (st_predict._utils.spot_shape): the square of spot_diameter_fullres
    metadata["pixel_size_um"] = float(scalefactors.get("microns_per_pixel") or size / side)
    if image_file is not None:
        image = read_fullres_image(image_file, lazy=True)
        _check_fullres_size(image, image_file, scalefactors, images["hires"], lib)
        images["fullres"] = image
        scalefactors["tissue_fullres_scalef"] = 1.0
        metadata["source_image_path"] = str(image_file.absolute())
    adata.uns["spatial"] = {lib: {"images": images, "scalefactors": scalefactors, "metadata": metadata}}
    adata.obs[SECTION_KEY] = pd.Categorical([lib] * adata.n_obs, categories=[lib])
    return adata


def read_visium_hd(
    path: PathLike | Mapping[str, PathLike],
    bin_size_um: int = 16,
    library_id: str | None = None,
    fullres_image_file: PathLike | Mapping[str, PathLike] | None = None,
    in_tissue_only: bool = True,
    filtered_counts_file: bool = True,
    gex_only: bool = True,
) -> ad.AnnData:
    """Read 10x Visium HD sections (Space Ranger >= 3 output) at one bin size, one row per square bin.

    The 10x files are parsed by :func:`spatialdata_io.visium_hd` (``pip install 'st-predict[hd]'``):
    ``feature_slice.h5`` and, in ``binned_outputs/square_<size>um/``, the counts h5,
    ``spatial/tissue_positions.parquet``, ``spatial/scalefactors_json.json`` and the hires / lowres PNGs.
    The result follows :func:`read_visium`'s conventions, so :meth:`~st_predict.NH2ST.setup_anndata`
    takes it as it is (a bin plays a spot; crop with ``image_key="hires"``, or ``"fullres"``). The
    full-resolution H&E image (the one Space Ranger was run with, e.g. ``<dataset>_tissue_image.btf``) is
    added as ``uns["spatial"][library_id]["images"]["fullres"]`` with ``tissue_fullres_scalef = 1.0``,
    lazily (TIFF / BigTIFF by tiles; other formats decoded when their pixels are needed); its size is
    checked against ``tissue_hires_scalef`` and the hires image.

    Parameters
    ----------
    path
        Space Ranger's ``outs`` folder (or the sample folder holding ``outs``). A ``{library_id: path}``
        mapping reads several sections into one AnnData (see :func:`concat_sections`).
    bin_size_um
        Side of the bins in micrometres: one of the ``binned_outputs/square_<size>um`` folders (Space
        Ranger writes 2, 8 and 16). A size that is not there raises, naming those that are.
    library_id
        Section name (default: the h5's ``library_ids`` attribute, else the ``<dataset>_feature_slice.h5``
        prefix, else the sample folder's name). Not with a mapping ``path``.
    fullres_image_file
        The full-resolution H&E image (BigTIFF ``.btf``, TIFF, JPEG, PNG); with a mapping ``path``, a
        mapping with the same keys. ``None``: only the hires / lowres images (it is not searched for).
    in_tissue_only
        Keep only the bins under tissue (``in_tissue == 1``).
    filtered_counts_file
        ``True``: ``filtered_feature_bc_matrix.h5`` (the bins under tissue); ``False``:
        ``raw_feature_bc_matrix.h5`` (every bin; with ``in_tissue_only=False`` the bins off tissue too).
    gex_only
        Only the ``Gene Expression`` features.

    Returns
    -------
    AnnData
        Raw counts in ``X`` (sparse CSR, int32; gene symbols as ``var_names``, made unique; Ensembl ids
        in ``var["gene_ids"]``), ``obs["section"]`` (categorical), ``obs`` columns ``in_tissue``,
        ``array_row`` and ``array_col``, ``obsm["spatial"]`` (bin centres in full-resolution pixels,
        x = column, y = row) and ``uns["spatial"][library_id]`` with ``images`` (``hires``, ``lowres``,
        ``fullres``), ``scalefactors`` (Space Ranger's for this bin size: ``spot_diameter_fullres`` is the
        bin's side in full-resolution pixels, ``bin_size_um``, ``microns_per_pixel``, the hires / lowres
        scale factors; plus ``tissue_fullres_scalef``) and ``metadata`` (``bin_size_um`` and
        ``pixel_size_um``, Space Ranger's ``microns_per_pixel``).

    Examples
    --------
    >>> adata = st_predict.data.read_visium_hd("sample/outs", bin_size_um=16,
    ...                                        fullres_image_file="sample/tissue_image.btf")  # doctest: +SKIP
    >>> st_predict.NH2ST.setup_anndata(adata, image_key="fullres", library_key="section")  # doctest: +SKIP
    """
    args = (in_tissue_only, filtered_counts_file, gex_only)
    return _read_sections(path, library_id, fullres_image_file,
                         lambda p, lib, image: _read_one(p, bin_size_um, lib, image, *args))
