"""Checks on a slide before it is tiled: a TIFF cut short, a slide with no stained pixel, and a slide scanned coarser
than the model's tiles."""

from __future__ import annotations

import os

import numpy as np

from st_predict._utils import InputError, InputWarning, warn

#: grey levels (of 255) by which a pixel's colour channels must differ to count as stained: H&E's pinks and purples
#: differ by tens, glass with a scanner's sensor noise by a few
STAIN_SPREAD = 12
#: fraction of a slide's pixels that must be stained for it to hold tissue (a small biopsy on a large slide is ~1 %)
MIN_STAINED_FRACTION = 1e-3


def check_stained(image: np.ndarray, name: str) -> None:
    """Refuse a slide with (almost) no stained pixel, where a tissue detector found "tissue" in the noise of bare
    glass or of a black background."""
    rgb = np.asarray(image)[..., :3]
    spread = rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1).astype(np.int16)
    stained = float((spread >= STAIN_SPREAD).mean()) if spread.size else 0.0
    if stained < MIN_STAINED_FRACTION:
        raise InputError(f"No tissue found on the slide {name}: {stained:.2%} of its pixels are stained (colour "
                         f"channels {STAIN_SPREAD} or more grey levels apart), fewer than {MIN_STAINED_FRACTION:.1%}; "
                         "bare glass or background with sensor noise?")


#: slide formats that are TIFF files inside (a truncated copy is caught before a slide reader opens it)
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff")


def check_tiff_complete(path: str) -> None:
    """Refuse a TIFF-based slide whose image data runs past the end of the file (a truncated copy or download),
    naming tifffile's own complaint: slide readers open such a file from its header and then report missing
    metadata, or fail on the first tile."""
    import logging
    import struct

    import tifffile

    size = os.path.getsize(path)
    said: list[str] = []

    class _Keep(logging.Handler):  # tifffile reports a bad page offset on its logger, then reads on
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    log = logging.getLogger("tifffile")
    handler = _Keep(logging.WARNING)
    log.addHandler(handler)
    try:
        with tifffile.TiffFile(path) as tif:
            # the end of each page's last byte of image data (one array operation per page, not a loop per tile)
            ends = [int((np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)).max())
                    for page in tif.pages if len(page.databytecounts)]
    except (tifffile.TiffFileError, OSError, ValueError, struct.error) as err:
        raise InputError(f"Could not open {path!r}: it does not read as a TIFF ({type(err).__name__}: {err}); a "
                         "truncated or corrupted file, or not an image?") from err
    finally:
        log.removeHandler(handler)
    end = max(ends, default=0)
    said = [m for m in said if "offset" in m.lower() or "truncat" in m.lower()]  # not its benign notes
    if end > size or said:
        detail = f" (tifffile: {said[0].strip()})" if said else ""
        where = f"its image data runs to byte {end:,} but the file has {size:,} bytes" if end > size else "its pages do not read"
        raise InputError(f"{path!r} is truncated or corrupted: {where}{detail}. Copy or download it again.")


#: the fewest slide pixels across a tile that st_predict upsamples to the network's input: below this a tile holds
#: too little of the tissue's structure for a prediction (a 165 um tile needs a slide finer than ~10 um/px)
MIN_TILE_PX = 16


def tile_reading(tile_um: float, size: int, slide_mpp: float, name: str) -> tuple[int, float, float]:
    """How to read tiles of ``tile_um`` micrometres for a network of ``size`` px on a slide at ``slide_mpp``:
    ``(tile_px, mpp, upsampling)`` for lazyslide's ``tile_tissues``.

    A slide at least as fine as the tiles (``slide_mpp <= tile_um / size``) is read at the tiles' resolution,
    ``size`` px a tile. A coarser slide is tiled at its own, finest resolution (``tile_um / slide_mpp`` px) and each
    tile is upsampled to ``size`` px, as spot-level ``predict`` resamples its crops; this warns once, giving both
    resolutions. A slide so coarse that a tile covers fewer than :data:`MIN_TILE_PX` px is refused."""
    tile_mpp = float(tile_um) / size
    if slide_mpp <= tile_mpp * (1 + 1e-6):
        return int(size), tile_mpp, 1.0
    tile_px = int(round(tile_um / slide_mpp))
    if tile_px < MIN_TILE_PX:
        raise InputError(
            f"The slide {name} is at {slide_mpp:.3g} um/px: a tile of {tile_um:.0f} um would cover {tile_um / slide_mpp:.1f}"
            f" px, fewer than the {MIN_TILE_PX} st_predict upsamples to the network's {size} px (the model's tiles are at "
            f"{tile_mpp:.3g} um/px). Predict it from a finer scan, or check the slide's micrometres per pixel (mpp=)."
        )
    upsampling = size / tile_px
    warn(f"The slide {name} is at {slide_mpp:.3g} um/px, coarser than the model's tiles ({tile_um:.0f} um over {size} px,"
         f" {tile_mpp:.3g} um/px): each tile is read at {tile_px} px and upsampled {upsampling:.2f}x. Detail finer than "
         "the scan is not in it, so expect less accurate predictions than on a slide at the model's resolution.", InputWarning)
    return tile_px, float(slide_mpp), upsampling
