"""Tissue found at one physical resolution, whatever the container: the same pixels give the same tissue as a JPEG,
a PNG, a stripped TIFF or a pyramidal TIFF whose levels were made by 2 x 2 means or by striding.

lazyslide's ``find_tissues`` works in the pixels of the level it is given (its entropy disk, closing kernel and
minimum areas are in pixels), and a pyramid's level at a given downsample holds other pixels depending on how the
writer made it: a strided level keeps the sensor noise of full resolution, which the entropy detector takes for
texture. So the image it is run on is made here, at :data:`TISSUE_MPP`: the coarsest level at least
:data:`AVERAGING` times finer is read by blocks and averaged down, and the polygons are scaled back to level 0.
"""

from __future__ import annotations

import numpy as np

#: micrometres per pixel at which tissue is detected: lazyslide's own choice where it knows the slide's µm/px (finer
#: for tiles under 64 um, which span >= 16 detection px: the detector's outline reaches ~4 px past the tissue)
TISSUE_MPP = 4.0
#: the level read is at least this many times finer than :data:`TISSUE_MPP` (where the slide has one), so that every
#: detection pixel is a mean of >= AVERAGING**2 pixels of it, whether the pyramid's levels are means or strided
AVERAGING = 4


def tissue_mpp_for(tile_um: float) -> float:
    """The detection resolution for tiles of ``tile_um``: :data:`TISSUE_MPP`, or finer, so a tile spans 16 px."""
    return min(TISSUE_MPP, float(tile_um) / 16)


def detection_image(wsi, slide_mpp: float, target_mpp: float) -> tuple[np.ndarray, int, tuple[float, float]]:
    """The slide at about ``target_mpp`` µm/px as an ``(H, W, 3)`` uint8 array, the pyramid level it was read from,
    and the level-0 pixels per detection pixel ``(x, y)``. Nothing is upsampled: a slide coarser than
    ``target_mpp`` is used at its finest level."""
    import cv2
    import dask.array as da
    from wsidata.reader import to_datatree

    props = wsi.reader.properties
    level_mpp = [slide_mpp * d for d in props.level_downsample]
    finest = int(np.argmin(level_mpp))
    fine = [i for i, m in enumerate(level_mpp) if m <= target_mpp / AVERAGING * 1.001]
    level = max(fine, key=lambda i: level_mpp[i]) if fine else finest
    data = to_datatree(wsi.reader)[f"scale{level}"]["image"].data  # dask (3, H, W), read by blocks
    factor = max(1, int(target_mpp / level_mpp[level] + 1e-6))
    h, w = data.shape[1] // factor * factor, data.shape[2] // factor * factor  # whole blocks of factor x factor
    if factor > 1:
        block = max(factor, 1024 // factor * factor)
        data = da.coarsen(np.mean, data[:, :h, :w].rechunk((3, block, block)), {1: factor, 2: factor})
    img = np.ascontiguousarray(np.asarray(data.compute()).transpose(1, 2, 0).round().clip(0, 255).astype(np.uint8))
    # the remaining fraction of the factor (e.g. 5.9 -> 8 um/px), by area averaging
    rest = target_mpp / (level_mpp[level] * factor)
    if rest > 1.01:
        size = (max(1, round(img.shape[1] / rest)), max(1, round(img.shape[0] / rest)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    down = float(props.level_downsample[level])
    return img, level, (w * down / img.shape[1], h * down / img.shape[0])


def find_tissue(wsi, slide_mpp: float, target_mpp: float, method: str, key_added: str) -> tuple[int, np.ndarray]:
    """Run lazyslide's ``find_tissues`` on :func:`detection_image` and add its polygons, in level-0 pixels, to
    ``wsi.shapes[key_added]`` (nothing is added where no tissue is found). Returns the level read and the
    detection image (for the stain check)."""
    import lazyslide as zs
    import shapely.affinity
    import wsidata
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from wsidata.io import add_tissues

    img, level, (sx, sy) = detection_image(wsi, slide_mpp, target_mpp)
    small = wsidata.open_wsi(SpatialData(images={"he": Image2DModel.parse(img.transpose(2, 0, 1),
                                                                           dims=("c", "y", "x"))}), image_key="he")
    zs.pp.find_tissues(small, level=0, method=method, key_added="tissues")
    if "tissues" in small.shapes and len(small.shapes["tissues"]):
        polys = [shapely.affinity.scale(g, xfact=sx, yfact=sy, origin=(0, 0))
                 for g in small.shapes["tissues"].geometry]
        add_tissues(wsi, key=key_added, tissues=polys)
    return level, img
