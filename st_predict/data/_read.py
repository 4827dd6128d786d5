"""Reading whatever a user points at: an .h5ad, a SpatialData store, or a HER2ST, Space Ranger or
HEST-1k folder, into an AnnData ready for :meth:`~st_predict.NH2ST.setup_anndata`."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from anndata import AnnData

from st_predict._utils import SECTION_KEY, InputError, MissingFileError


class InputData(NamedTuple):
    """What :func:`read_input` found: the AnnData, its obs column of sections (``None``: one
    section) and the image it names (``None``: none in particular)."""

    adata: AnnData
    library_key: str | None
    image_key: str | None


def read_h5ad(path: str | Path, **kwargs) -> AnnData:
    """``anndata.read_h5ad`` with an :class:`~st_predict.InputError` for a file that is not a readable
    .h5ad (truncated or corrupted), naming the file."""
    import anndata as ad

    try:
        return ad.read_h5ad(path, **kwargs)
    except (OSError, KeyError, ValueError, TypeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{path} is not a readable .h5ad file (truncated or corrupted?): {first}") from err


def read_input(
    path: str | Path,
    library_key: str = SECTION_KEY,
    image_element: str | None = None,
    table: str = "table",
    fullres_image: str | None = None,
    sample: list[str] | None = None,
    lazy_images: bool = False,
) -> InputData:
    """Read ``path``, recognised by its layout: an ``.h5ad`` file (Visium-style ``uns['spatial']``
    images, ``obsm['spatial']`` in full-resolution pixels), a SpatialData ``.zarr`` store
    (``image_element``, ``table``), a folder in the HER2ST layout (``counts/``, ``spots/``,
    ``images/``), a Space Ranger output folder (``spatial/``; ``fullres_image``) or a HEST-1k folder
    (``st/``, ``wsis/``; ``sample``). ``library_key`` is the obs column of sections of an .h5ad.
    ``lazy_images``: a HER2ST folder's JPEGs are decoded only when their patches are cropped
    (``read_her2st(load_images="lazy")``; SpatialData and TIFF images are always lazy)."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"input {str(path)!r} does not exist")
    if p.is_file() and p.suffix == ".h5ad":
        adata = read_h5ad(p)
        if library_key in adata.obs:
            return InputData(adata, library_key, None)
        libs = list(adata.uns.get("spatial", {}))
        if len(libs) > 1:
            raise InputError(
                f"{path}: adata.obs has no section column {library_key!r} but uns['spatial'] has {len(libs)} "
                f"libraries ({libs[:5]}); pass the column's name (--library-key)"
            )
        return InputData(adata, None, None)
    if p.is_dir() and (p.suffix == ".zarr" or (p / "zarr.json").exists() or (p / ".zgroup").exists()):
        import spatialdata

        from ._spatialdata import from_spatialdata

        sdata = spatialdata.read_zarr(p)
        return InputData(from_spatialdata(sdata, image_key=image_element, table_key=table), "region", "hires")
    if p.is_dir() and all((p / d).is_dir() for d in ("counts", "spots", "images")):
        from ._her2st import read_her2st

        return InputData(read_her2st(p, load_images="lazy" if lazy_images else True), SECTION_KEY, None)
    if p.is_dir() and ((p / "spatial").is_dir() or (p / "outs" / "spatial").is_dir()):
        from ._visium import read_visium

        image = "fullres" if fullres_image else "hires"
        return InputData(read_visium(p, fullres_image_file=fullres_image), SECTION_KEY, image)
    if p.is_dir() and (p / "st").is_dir():
        from ._hest import read_hest

        ids = sample[0] if sample and len(sample) == 1 else sample
        return InputData(read_hest(p, sample_id=ids), SECTION_KEY, "fullres")
    raise InputError(
        f"cannot read {str(path)!r}: expected an .h5ad file, a SpatialData .zarr store, a HER2ST-layout folder "
        "(counts/, spots/, images/), a Space Ranger output folder (spatial/) or a HEST-1k folder (st/, wsis/)"
    )


def largest_image(images: dict, keys=None) -> str:
    """The key (among ``keys``, default all) of the image with the longest side."""
    return max(keys or images, key=lambda k: max(np.shape(images[k])[:2]))


def choose_image_key(adata: AnnData, wanted: str | None = None, found: str | None = None) -> str:
    """The image to crop from: ``wanted``, else ``found`` (a reader's), else the largest image of the
    first library in ``adata.uns['spatial']``."""
    if wanted:
        return wanted
    if found:
        return found
    spatial = adata.uns.get("spatial", {})
    if not spatial:
        raise InputError("the data has no uns['spatial'] images")
    entry = next(iter(spatial.values()))
    images = entry.get("images", {})
    if not images:
        raise InputError(f"uns['spatial'][{next(iter(spatial))!r}] has no images")
    return largest_image(images)  # the highest-resolution image, e.g. 'fullres' or 'hires'


def downsample_images(adata: AnnData, max_side: int = 2000) -> None:
    """Replace every image of ``adata.uns['spatial']`` by a downsampled in-memory copy (``hires``, at
    most ``max_side`` pixels, with its ``tissue_hires_scalef``: Space Ranger's name for its <= 2000 px
    image, and the key squidpy's and scanpy's plots look for by default), so the AnnData can be written to
    .h5ad and stays small: from the largest in-memory image of each library, else the largest lazy
    one (read once). Changes ``adata.uns['spatial']`` in place (of an AnnData about to be written)."""
    from st_predict._utils import downsample

    spatial = adata.uns.get("spatial", {})
    new = {}
    for lib, entry in spatial.items():
        images, sf = entry.get("images", {}), dict(entry.get("scalefactors", {}))
        if images:
            key = largest_image(images, [k for k in images if isinstance(images[k], np.ndarray)])
            small, factor = downsample(images[key], max_side)
            new_sf = {k: v for k, v in sf.items() if not k.startswith("tissue_")}
            new_sf["tissue_hires_scalef"] = float(sf.get(f"tissue_{key}_scalef", 1.0)) * factor
            new[lib] = {"images": {"hires": small}, "scalefactors": new_sf,
                        **{k: v for k, v in entry.items() if k not in ("images", "scalefactors")}}
        else:
            new[lib] = entry
    adata.uns["spatial"] = new
