"""Tiles on a slide's tissue and the table of their predictions: what every model's whole-slide prediction shares
(NH2ST's :func:`~st_predict.tl.predict_slide` and the pretrained predictors')."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

from st_predict._utils import InputError, interactive, progress_logger, resize_tile

from ._slide_checks import check_stained, tile_reading
from ._tissue import find_tissue, tissue_mpp_for


def wsi_stack():
    try:
        import lazyslide
        import wsidata
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "Whole-slide prediction needs wsidata and lazyslide: pip install 'st-predict[wsi]'."
        ) from err
    return wsidata, lazyslide


def check_slide_settings(tissue_method: str, min_tissue_fraction: float, pitch: float, mpp: float | None,
                         image_mpp: float | None) -> None:
    """The tiling settings every whole-slide prediction takes, checked (an error names the bad one)."""
    if tissue_method not in ("entropy", "otsu"):
        raise InputError(f"tissue_method must be 'entropy' or 'otsu', got {tissue_method!r}.")
    if not 0 <= min_tissue_fraction <= 1:
        raise InputError(f"min_tissue_fraction must be between 0 and 1, got {min_tissue_fraction!r}.")
    if not pitch > 0:
        raise InputError(f"pitch_um must be positive, got {pitch!r}.")
    if mpp is not None and not mpp > 0:
        raise InputError(f"mpp must be a positive number of micrometres per pixel, got {mpp!r}.")
    if image_mpp is not None and not image_mpp > 0:
        raise InputError(f"image_mpp must be a positive number of micrometres per pixel or None, got {image_mpp!r}.")


def tile_centres(tiles) -> np.ndarray:
    """``(n, 2)`` centres of tile shapes, in their (level-0 pixel) frame."""
    return np.column_stack([tiles.geometry.centroid.x.to_numpy(), tiles.geometry.centroid.y.to_numpy()])


def tissue_fraction(tiles, tissues) -> np.ndarray:
    """The fraction of each tile's area inside the tissue polygons (NaN without them)."""
    if tissues is None or len(tissues) == 0:
        return np.full(len(tiles), np.nan, dtype=np.float32)
    import shapely

    tissue = shapely.union_all(tissues.geometry.to_numpy())
    geoms = tiles.geometry.to_numpy()
    return (shapely.area(shapely.intersection(geoms, tissue)) / shapely.area(geoms)).astype(np.float32)


@dataclass
class LaidTiles:
    """Tiles laid on a slide's tissue by :func:`lay_tiles`: the shapes' key and the shapes, how they are read
    (``tile_mpp``, ``upsampling``), where the tissue was looked for, the tile pitch and, when asked, a digest of the
    tissue-detection image (the slide's content, for cache keys)."""

    tile_key: str
    tissue_key: str
    tiles: Any
    tile_px: int
    tile_mpp: float
    upsampling: float
    tissue_level: int
    tissue_mpp: float
    stride_um: float
    digest: str = ""


def lay_tiles(wsi, name: str, slide_mpp: float, tile_um: float, size: int, pitch: float, tissue_method: str,
              min_tissue_fraction: float, key_added: str, progress: bool | None, digest: bool = False) -> LaidTiles:
    """Find the tissue of ``wsi`` and lay tiles of ``tile_um`` micrometres every ``pitch`` micrometres on it, read at
    ``size`` px (or at the slide's own pixels on a coarser slide, warned once): ``f"{key_added}_tiles"`` and
    ``f"{key_added}_tissues"`` in ``wsi.shapes``."""
    _, zs = wsi_stack()
    # tiles are read straight at the network's resolution, or, on a slide coarser than that, at the slide's own and
    # upsampled (warned once)
    tile_px, tile_mpp, upsampling = tile_reading(tile_um, size, slide_mpp, name)
    stride = max(1, int(round(pitch / tile_mpp)))
    tile_key, tissue_key = f"{key_added}_tiles", f"{key_added}_tissues"
    # tissue detection at one physical resolution, on pixels averaged down from a finer level, so that the same H&E
    # gives the same tissue in any container (lazyslide's "auto" level also depends on free memory)
    tissue_mpp = tissue_mpp_for(tile_um)
    tissue_level, seen = find_tissue(wsi, slide_mpp, tissue_mpp, tissue_method, tissue_key)
    if tissue_key not in wsi.shapes or len(wsi.shapes[tissue_key]) == 0:
        raise InputError(f"No tissue found on the slide {name}.")
    check_stained(seen, name)
    if digest:
        from st_predict.dataloaders import image_digest

        digest = image_digest(seen)
    del seen
    zs.pp.tile_tissues(wsi, tile_px=tile_px, stride_px=stride, mpp=tile_mpp, tissue_key=tissue_key,
                       key_added=tile_key, background_fraction=1 - min_tissue_fraction)
    tiles = wsi.shapes[tile_key] if tile_key in wsi.shapes else ()  # lazyslide may add no element
    if len(tiles) == 0:
        raise InputError(f"No tissue found on the slide {name} (no tile of {tile_um:g} um on tissue).")
    if progress if progress is not None else interactive():
        progress_logger().info("%d tiles of %g um every %g um on %s", len(tiles), tile_um, pitch, name)
    return LaidTiles(tile_key, tissue_key, tiles, int(tile_px), float(tile_mpp), float(upsampling), int(tissue_level),
                     float(tissue_mpp), stride * tile_mpp, digest or "")


def write_tile_table(wsi, opened, tiles, tile_key: str, pred: np.ndarray, genes, key_added: str,
                     tile_um: float, uns: dict, layers: Mapping[str, np.ndarray] | None = None,
                     reliability: pd.DataFrame | None = None, image_mpp: float | None = None) -> None:
    """Put the tiles x genes predictions ``pred`` into ``wsi.tables[key_added]`` (annotating ``tile_key``): each
    tile's ids and tissue fraction, its centre in the input's frame (``obsm["spatial"]``), ``layers``, the genes'
    ``reliability`` in ``var``, ``uns["st_predict"] = uns`` and, for an AnnData input, its ``uns["spatial"]``; with
    ``image_mpp`` also the overview image (:func:`add_overview`)."""
    from anndata import AnnData
    from spatialdata.models import TableModel

    tissue_key = f"{key_added}_tissues"
    centres = tile_centres(tiles)
    obs = pd.DataFrame({"region": pd.Categorical([tile_key] * len(tiles)),
                        "tile_id": tiles["tile_id"].to_numpy(), "tissue_id": tiles["tissue_id"].to_numpy(),
                        "tissue_fraction": tissue_fraction(tiles, wsi.shapes[tissue_key] if tissue_key in wsi.shapes else None)},
                       index=[f"tile_{i}" for i in tiles["tile_id"]])
    table = AnnData(np.asarray(pred, np.float32), obs=obs, var=pd.DataFrame(index=[str(g) for g in genes]))
    for layer, values in (layers or {}).items():
        table.layers[layer] = np.asarray(values, np.float32)
    if reliability is not None:
        table.var = table.var.join(reliability[["reliability", "ci_low", "ci_high", "reliable"]])
    # tile centres in the slide's level-0 pixels (for an AnnData image: the AnnData's full-resolution
    # pixels, the frame of its obsm["spatial"], so scanpy/squidpy draw the tiles over its image)
    table.obsm["spatial"] = centres * opened.to_fullres
    table.uns["st_predict"] = dict(uns)
    if opened.spatial_uns:
        lib, entry = next(iter(opened.spatial_uns.items()))
        scalef = dict(entry.get("scalefactors", {}))
        scalef["spot_diameter_fullres"] = float(tile_um / wsi.properties.mpp * opened.to_fullres)
        table.uns["spatial"] = {lib: {**entry, "scalefactors": scalef}}
    wsi.tables[key_added] = TableModel.parse(table, region=tile_key, region_key="region", instance_key="tile_id")
    add_overview(wsi, wsi.properties.mpp, image_mpp, key_added)


def add_overview(wsi, slide_mpp: float, image_mpp: float | None, key_added: str) -> None:
    """The slide at ``image_mpp`` µm/px, lazily, as ``wsi.images[f"{key_added}_image"]`` (nothing for ``None``)."""
    if image_mpp is not None:
        from ._slide_image import overview_image

        wsi.images[f"{key_added}_image"] = overview_image(wsi, slide_mpp, float(image_mpp))


def tile_dataset(wsi, tile_key: str, size: int):
    """wsidata's dataset of the tiles ``tile_key`` at ``size`` px (tiles of a slide coarser than that are read at the
    slide's pixels and upsampled here)."""
    spec = wsi.tile_spec(tile_key)
    resize = None if spec is None or (spec.width, spec.height) == (size, size) else partial(resize_tile, size=size)
    return wsi.ds.tile_images(tile_key=tile_key, image_size=size, transform=resize)

