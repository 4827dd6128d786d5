"""Opening what a whole-slide prediction reads: a slide file, a plain image, a SpatialData (or its store), a WSIData or
an AnnData with a Visium-style image, as a :class:`wsidata.WSIData` with the µm/px its source recorded."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from st_predict._utils import (
    InputError,
    InputTypeError,
    MissingFileError,
    MissingKeyError,
    available_cores,
    user_stacklevel,
)

from ._slide_checks import TIFF_SUFFIXES, check_tiff_complete
from ._slide_image import CONVERT_HINT, PLAIN_SUFFIXES, plain_image_element
from ._slide_tiles import wsi_stack

#: what the slide readers raise for a file they cannot read as a slide (OpenSlide's and tifffile's
#: errors derive from these; wsidata raises ValueError when no reader accepts the file)
_UNREADABLE = (OSError, ValueError, KeyError, IndexError)


@dataclass
class OpenedSlide:
    """A slide opened for prediction: the :class:`wsidata.WSIData`, a name for messages, the µm/px its
    source recorded (``None`` if none) and, for an AnnData image, how to map tile centres back to the
    AnnData's full-resolution pixels."""

    wsi: Any
    name: str
    mpp: float | None = None
    to_fullres: float = 1.0
    spatial_uns: dict = field(default_factory=dict)


def _is_zarr_store(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("zarr.json", ".zgroup", ".zattrs")
    )


def _from_spatialdata(sdata, image_key: str | None, name: str) -> OpenedSlide:
    wsidata, _ = wsi_stack()
    from spatialdata import SpatialData

    keys = list(sdata.images)
    if image_key is None:
        if len(keys) != 1:
            raise InputError(
                f"{name} has {len(keys)} image elements ({', '.join(keys) or 'none'}): pass image_element= to "
                "choose the H&E."
            )
        image_key = keys[0]
    if image_key not in sdata.images:
        raise MissingKeyError(f"{name} has no image element {image_key!r} (it has: {', '.join(keys) or 'none'}).")
    try:
        # a SpatialData of this one element: the user's object gets no tiles, tissues or tables
        wsi = wsidata.open_wsi(SpatialData(images={image_key: sdata.images[image_key]}), image_key=image_key)
    except ValueError as err:
        raise InputError(f"Image element {image_key!r} of {name} cannot be read as an H&E slide: {err}") from err
    return OpenedSlide(wsi, f"{name} image {image_key!r}")


def _from_anndata(adata, image_key: str | None, library_id: str | None) -> OpenedSlide:
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    from st_predict.pp import section_images, section_pixel_sizes

    spatial = adata.uns.get("spatial")
    if not isinstance(spatial, Mapping) or not spatial:
        raise MissingKeyError("The AnnData has no image: expected adata.uns['spatial'][library_id]['images'].")
    if library_id is None:
        if len(spatial) != 1:
            raise InputError(
                f"adata.uns['spatial'] has {len(spatial)} libraries ({', '.join(map(str, spatial))}): pass "
                "library_id= to choose the slide."
            )
        library_id = next(iter(spatial))
    libs = np.array([library_id])
    images, scales = section_images(adata, libs, image_key or "hires")
    img = np.asarray(images[library_id])
    if img.ndim != 3 or img.shape[2] < 3:
        raise InputError(f"The image of library {library_id!r} must be RGB (H, W, 3), got shape {img.shape}.")
    if img.dtype != np.uint8:
        raise InputError(f"The image of library {library_id!r} must be uint8 RGB, got {img.dtype}.")
    scale = scales[library_id]
    pixel_size = section_pixel_sizes(adata, libs)[library_id]
    element = Image2DModel.parse(img[..., :3].transpose(2, 0, 1), dims=("c", "y", "x"))
    opened = _from_spatialdata(SpatialData(images={"image": element}), "image", f"the AnnData's {library_id!r}")
    opened.mpp = None if pixel_size is None else pixel_size / scale  # µm per pixel of this image
    opened.to_fullres = 1.0 / scale
    opened.spatial_uns = {library_id: dict(spatial[library_id])}
    return opened


def open_slide(slide: Any, image_key: str | None = None, library_id: str | None = None,
               image_element: str | None = None) -> OpenedSlide:
    """Open ``slide`` for prediction: a slide file (SVS, NDPI, pyramidal TIFF, ...), a plain JPEG, PNG or
    TIFF (the µm/px must then be given as ``mpp``), a SpatialData
    ``.zarr`` store, a :class:`wsidata.WSIData`, a :class:`spatialdata.SpatialData` with an image
    element, or an AnnData with a Visium-style image in ``uns["spatial"]``."""
    from spatialdata import SpatialData as _SpatialData

    if image_key is not None and (isinstance(slide, _SpatialData) or isinstance(slide, str | os.PathLike)
                                  and _is_zarr_store(os.fspath(slide))):
        warnings.warn("image_key= for a SpatialData's image element is deprecated: use image_element= (image_key "
                      "names an AnnData's image, as in setup_anndata).", FutureWarning, stacklevel=user_stacklevel())
        image_element = image_key if image_element is None else image_element
    wsidata, _ = wsi_stack()
    from anndata import AnnData
    from spatialdata import SpatialData

    if isinstance(slide, wsidata.WSIData):
        source = slide.path or getattr(slide.reader, "file", None)
        return OpenedSlide(slide, str(source) if source else "the slide")
    if isinstance(slide, SpatialData):
        return _from_spatialdata(slide, image_element, "the SpatialData")
    if isinstance(slide, AnnData):
        return _from_anndata(slide, image_key, library_id)
    if isinstance(slide, str | os.PathLike):
        path = os.fspath(slide)
        if not os.path.exists(path):
            raise MissingFileError(f"Slide file {path!r} does not exist.")
        if _is_zarr_store(path):
            import spatialdata

            try:
                sdata = spatialdata.read_zarr(path)
            except _UNREADABLE as err:
                raise InputError(f"Could not read {path!r} as a SpatialData store: {err}") from err
            return _from_spatialdata(sdata, image_element, path)
        suffix = os.path.splitext(path)[1].lower()
        if suffix in TIFF_SUFFIXES:
            check_tiff_complete(path)
        if suffix not in (".jpg", ".jpeg", ".png"):
            try:
                # store=None: no zarr store is created or reused next to the slide
                return OpenedSlide(wsidata.open_wsi(path, store=None), path)
            except _UNREADABLE as err:
                if suffix not in PLAIN_SUFFIXES:
                    raise InputError(
                        f"Could not open {path!r} as a whole-slide image (no reader of wsidata accepts it: "
                        f"{type(err).__name__}); for an image in another format, {CONVERT_HINT}."
                    ) from err
        # a plain JPEG / PNG, or a TIFF no whole-slide reader takes (not tiled): its pixels, at the µm/px of mpp=
        from spatialdata import SpatialData

        try:
            element = plain_image_element(path)
        except InputError as err:
            why = err.__cause__ or err  # the reader's own words, without the path again
            raise InputError(f"Could not open {path!r} as a whole-slide or a plain image ({type(why).__name__}: {why}; "
                             "a truncated or corrupted file?)") from err
        opened = _from_spatialdata(SpatialData(images={"image": element}), "image", path)
        opened.name = path
        return opened
    raise InputTypeError(
        "slide must be a path, a wsidata.WSIData, a SpatialData or an AnnData with an image, got "
        f"{type(slide).__name__}."
    )


def open_at_mpp(slide: Any, mpp: float | None, image_key: str | None = None, library_id: str | None = None,
                image_element: str | None = None) -> tuple[OpenedSlide, float]:
    """:func:`open_slide`, its µm/px set (``mpp``, else what its source recorded) and returned; an error when there
    is none."""
    opened = open_slide(slide, image_key=image_key, library_id=library_id, image_element=image_element)
    wsi = opened.wsi
    if mpp is not None or opened.mpp is not None:
        wsi.set_mpp(float(mpp if mpp is not None else opened.mpp))
    slide_mpp = wsi.properties.mpp
    if slide_mpp is None or not np.isfinite(slide_mpp) or slide_mpp <= 0:
        raise InputError(
            f"The slide {opened.name} records no micrometres per pixel; pass mpp= (e.g. mpp=0.25 for a 40x scan)."
        )
    return opened, float(slide_mpp)


def default_num_workers() -> int:
    """DataLoader workers that read tiles while the network runs.

    None on a machine with 4 cores or fewer: on 2 cores a reading worker takes a core from the
    network's threads and whole-slide prediction got 20 % slower (``benchmarks/her2st_slide.py``).
    With more cores, half of them (at most 8) read, the rest run the network's threads.
    """
    n = available_cores()  # the cores this process may use, as for the thread limits
    return 0 if n <= 4 else min(8, n // 2)
