"""Full-resolution H&E images for the readers: TIFF / whole-slide images lazily (dask), others with PIL."""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from pathlib import Path

import numpy as np

from st_predict._utils import InputError, MissingFileError

_TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".qptiff")
_OPEN_LOCK = threading.Lock()


def _reset_lock() -> None:  # a lock held by another thread at fork time would stay held in the child
    global _OPEN_LOCK
    _OPEN_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock)


class _TiffLevel:
    """Read-only array view of one level of one series of a TIFF file, read through tifffile's zarr store.

    The file is opened on the first read **in each process** (so forked DataLoader workers never share a
    file position) and closed when the view is garbage collected; the view pickles as its path.
    """

    def __init__(self, path: Path, series: int = 0, level: int = 0):
        import tifffile
        import zarr

        self.path, self.series, self.level = str(path), int(series), int(level)
        with tifffile.TiffFile(self.path) as tf:
            if not tf.series:
                raise InputError(f"{path} holds no image series.")
            levels = tf.series[self.series].levels
            if not 0 <= self.level < len(levels):
                shapes = [tuple(lv.shape) for lv in levels]
                raise InputError(f"{path} has {len(levels)} pyramid levels {shapes}; level={level} does not exist.")
            self.axes = levels[self.level].axes
            store = tf.series[self.series].aszarr(level=self.level)
            try:
                z = zarr.open(store, mode="r")
                self.shape, self.dtype, self.chunks = tuple(z.shape), np.dtype(z.dtype), tuple(z.chunks)
            finally:
                store.close()
        self._array = None
        self._pid = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _open(self):
        if self._array is None or self._pid != os.getpid():
            with _OPEN_LOCK:
                if self._array is None or self._pid != os.getpid():
                    import tifffile
                    import zarr

                    store = tifffile.imread(self.path, aszarr=True, series=self.series, level=self.level)
                    weakref.finalize(self, store.close)
                    self._array, self._pid = zarr.open(store, mode="r"), os.getpid()
        return self._array

    def __getitem__(self, key):
        try:
            return self._open()[key]
        except Exception as err:  # a tile cut off or corrupted: found only when its pixels are read
            raise InputError(
                f"Could not read pixels {key} of the image {self.path}: {type(err).__name__}: {err} (a truncated "
                "or corrupted file?)"
            ) from err

    def __getstate__(self):
        return {**self.__dict__, "_array": None, "_pid": None}


def _as_rgb_uint8(arr, path: Path, axes: str):
    """A lazy ``(H, W, 3)`` uint8 view of a dask array with TIFF axes ``axes`` (``YXS``, ``SYX``, ``YX``...)."""
    import dask.array as da

    axes = axes.upper()
    extra = [i for i, a in enumerate(axes) if a not in "YXS"]
    if any(arr.shape[i] != 1 for i in extra):
        raise InputError(
            f"{path}: expected a 2D RGB image, got axes {axes!r} with shape {tuple(arr.shape)} (several planes)."
        )
    arr = arr[tuple(0 if i in extra else slice(None) for i in range(len(axes)))]
    axes = "".join(a for a in axes if a in "YXS")
    if "S" not in axes:
        arr, axes = da.stack([arr] * 3, axis=-1), axes + "S"  # greyscale
    arr = arr.transpose([axes.index("Y"), axes.index("X"), axes.index("S")])
    if arr.shape[2] not in (3, 4):
        raise InputError(f"{path}: expected 3 (RGB) or 4 (RGBA) channels, got {arr.shape[2]} (axes {axes!r}).")
    arr = arr[..., :3]
    if arr.dtype == np.uint16:
        arr = (arr // 257).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise InputError(f"{path}: expected a uint8 (or uint16) RGB image, got dtype {arr.dtype}.")
    return arr


def _read_image(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".jpg", ".jpeg"):
        # torchvision decodes straight into one HxWx3 buffer: the peak is the image itself (PIL's
        # decode + convert + array copies peaked at 3-4x the image; same pixels, checked in the tests)
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        try:
            arr = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()
            return np.ascontiguousarray(arr)
        except RuntimeError:  # a JPEG variant libjpeg in torchvision does not read: PIL below
            pass
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # full-resolution H&E is larger than PIL's decompression-bomb guard
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:  # PIL: truncated data, unknown format, bad header
        raise InputError(f"Could not read the image {path}: {err} (a truncated or corrupted file?)") from err
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _lazy_plain_image(path: Path):
    """A JPEG / PNG as a one-block dask array: the header is read now (size), the pixels when computed."""
    import dask
    import dask.array as da
    from dask.base import tokenize
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError(f"Could not read the image {path}: {err} (a truncated or corrupted file?)") from err
    finally:
        Image.MAX_IMAGE_PIXELS = old
    stat = path.stat()
    name = "image-" + tokenize(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    return da.from_delayed(dask.delayed(_read_image, pure=True)(path), shape=(height, width, 3), dtype=np.uint8,
                           name=name)


def read_fullres_image(path: str | os.PathLike, level: int = 0, lazy: bool = False):
    """A full-resolution H&E image as an ``(H, W, 3)`` uint8 array.

    TIFF files (also BigTIFF, pyramidal / whole-slide TIFF, OME-TIFF, SVS) are read **lazily**: a dask
    array over ``level`` (0 = full resolution) of the first image series, chunked by the file's tiles
    (or strips), so cropping a patch reads only the tiles under it. Other formats (JPEG, PNG...) are
    decoded into memory with PIL, or with ``lazy=True`` only when the pixels are needed (a one-block dask
    array: training decodes each section's image once, to crop its patches, and lets it go).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Image file {path} does not exist.")
    if path.suffix.lower() not in _TIFF_SUFFIXES:
        if lazy:
            return _lazy_plain_image(path)
        return _read_image(path)
    import dask.array as da
    import tifffile
    from dask.base import tokenize

    try:
        view = _TiffLevel(path, series=0, level=level)
    except (tifffile.TiffFileError, OSError, KeyError, IndexError) as err:  # a broken header or IFD
        raise InputError(f"Could not read the image {path}: {err} (a truncated or corrupted file?)") from err
    # tiles are the natural unit (a patch reads only the tiles under it); strips of a few rows are
    # grouped into chunks of about 256 rows
    chunks = tuple(
        min(n, c * -(-256 // c)) if a in "YX" and c < 256 else c
        for a, c, n in zip(view.axes.upper(), view.chunks, view.shape, strict=True)
    )
    stat = path.stat()
    name = "tiff-" + tokenize(str(path.resolve()), stat.st_mtime_ns, stat.st_size, level)
    arr = da.from_array(view, chunks=chunks, name=name, asarray=False, fancy=False, lock=False,
                        meta=np.empty((0,) * view.ndim, dtype=view.dtype))
    return _as_rgb_uint8(arr, path, view.axes)
