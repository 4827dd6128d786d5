"""Images around whole-slide prediction: plain JPEG / PNG / TIFF files opened as slides, and the downsampled
image of the slide that ``predict_slide`` puts into its output so that the tiles are drawn over the H&E."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from st_predict._utils import InputError

#: files opened as plain images (decoded or read by tifffile) rather than by a whole-slide reader
PLAIN_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
#: the largest JPEG or PNG decoded into memory: 2 GiB of RGB pixels (about 715 Mpx, e.g. 26,000 x 27,000 px);
#: a HER2ST section (9,300 x 9,900 px) takes 0.26 GiB. TIFF files are read lazily and have no limit.
PLAIN_IMAGE_MAX_BYTES = 2 * 1024**3
CONVERT_HINT = (
    "convert it into a tiled pyramidal TIFF, e.g. with libvips: "
    "vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg --Q 90 (or bfconvert -pyramid-resolutions 5 "
    "-pyramid-scale 2 -tilex 512 -tiley 512 IN OUT.ome.tif), and pass --mpp"
)


def _image_pixels(path: Path) -> tuple[int, int]:
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # only the header is read here
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError(f"{type(err).__name__}: a truncated or corrupted file?") from err
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _scale_factors(height: int, width: int, min_side: int) -> list[int]:
    """Halvings until the smaller side would drop below ``min_side``."""
    n = max(0, int(math.floor(math.log2(max(1, min(height, width)) / min_side))))
    return [2] * n


def plain_image_element(path: str | os.PathLike):
    """A plain JPEG, PNG or (non-pyramidal) TIFF as a multiscale SpatialData image element.

    JPEG, PNG and TIFF files up to :data:`PLAIN_IMAGE_MAX_BYTES` are decoded into memory; a larger TIFF is read
    lazily by tifffile (slowly: each tile reads its strips); a larger JPEG or PNG is refused. It has one level, its own pixels: tissue detection averages them down by
    blocks, and tiles are read from them directly (lazily computed halvings made every tile read compute its
    blocks of the level again, 0.3 s a tile on a HER2ST section).
    """
    import dask.array as da
    from spatialdata.models import Image2DModel

    from st_predict.data import read_image

    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        width, height = _image_pixels(path)
        need = width * height * 3
        if need > PLAIN_IMAGE_MAX_BYTES:
            raise InputError(
                f"{path} is {width} x {height} px: decoding it would take {need / 1024**3:.1f} GiB, more than the "
                f"{PLAIN_IMAGE_MAX_BYTES / 1024**3:g} GiB st_predict decodes into memory; {CONVERT_HINT}."
            )
    img = read_image(path)  # (H, W, 3) uint8: numpy for JPEG/PNG, lazy dask for TIFF
    if not isinstance(img, np.ndarray) and int(np.prod(img.shape)) <= PLAIN_IMAGE_MAX_BYTES:
        # a TIFF of strips is read whole for each tile otherwise (100 s for a HER2ST section's tiles, 12 s decoded)
        img = np.asarray(img)
    data = da.asarray(img).transpose(2, 0, 1)
    data = data.rechunk((3, 1024, 1024))
    return Image2DModel.parse(data, dims=("c", "y", "x"), c_coords=["r", "g", "b"])


def overview_image(wsi, slide_mpp: float, image_mpp: float, min_side: int = 256):
    """A lazy multiscale image element of the slide at about ``image_mpp`` µm/px, placed over level 0.

    The finest pyramid level no coarser than ``image_mpp`` is read block by block (wsidata's
    ``to_datatree``), averaged down by the remaining integer factor, and halved until its smaller side
    would drop below ``min_side`` px. Its ``global`` transformation scales it onto the slide's level-0 pixels,
    the frame of the tile shapes, so spatialdata-plot draws the tiles over it. Nothing is read until the
    element is written or drawn.
    """
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, Scale
    from wsidata.reader import to_datatree

    props = wsi.reader.properties
    level_mpp = [slide_mpp * d for d in props.level_downsample]
    fine_enough = [i for i, m in enumerate(level_mpp) if m <= image_mpp * 1.01]
    level = max(fine_enough, key=lambda i: level_mpp[i]) if fine_enough else int(np.argmin(level_mpp))
    data = to_datatree(wsi.reader)[f"scale{level}"]["image"].data  # dask (3, H, W), read by blocks
    factor = max(1, int(image_mpp / level_mpp[level] + 1e-6))
    if factor > 1:
        h, w = (s // factor * factor for s in data.shape[1:])
        data = data[:, :h, :w].rechunk((3, 1024 // factor * factor or factor, 1024 // factor * factor or factor))
        data = da.coarsen(np.mean, data, {1: factor, 2: factor}).round().astype(np.uint8)
    down = float(props.level_downsample[level]) * factor
    transform = Identity() if down == 1 else Scale([down, down], axes=("y", "x"))
    return Image2DModel.parse(data.rechunk((3, 1024, 1024)), dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                              scale_factors=_scale_factors(*data.shape[1:], min_side),
                              transformations={"global": transform})
