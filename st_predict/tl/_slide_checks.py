"""Checks on a slide before it is tiled: a TIFF cut short, and a slide with no stained pixel."""

from __future__ import annotations

import os

import numpy as np

from st_predict._utils import InputError

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
