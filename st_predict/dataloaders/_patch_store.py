"""Training patches on disk (issue 19): one zarr array per section, keyed like the feature cache.

End-to-end training reads every spot's patch many times (each epoch, as a target and as a neighbour).
Kept in memory, the patches of a large training set (150 KB a spot at 224 px) and the section images
they are cropped from grow with the data. Here each section's patches are cropped once, section by
section (a lazily read image is decoded only for this), into a zarr array under the feature cache's
folder, named by the SHA-256 of a key (:func:`~st_predict.dataloaders._feature_cache.patches_key`: the section, its
image, its spots' crop boxes, the patch size); a batch reads only its own rows. A later training on the
same sections (another model, fold or run) opens the arrays instead of cropping again; a changed image,
spot or patch size is another key. Arrays are written in a hidden folder and renamed into place
(:func:`~st_predict._utils._atomic.staged_folder`), so a killed run leaves no half-written entry.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from st_predict._utils import staged_folder
from st_predict.dataloaders._feature_cache import FeatureCache, image_digest, patches_key

logger = logging.getLogger(__name__)

#: Spots per zarr shard (one file) and per write; each spot is its own chunk, so a batch reads only its rows.
SHARD = 256


class PatchStore:
    """uint8 patches ``(n, 3, S, S)`` read by row from per-section zarr arrays; indexing with an integer
    array or tensor returns a uint8 tensor, like indexing the in-memory patches."""

    def __init__(self, arrays: list, rows: list[np.ndarray], n: int, size: int):
        self.arrays = arrays
        self.where = np.full((n, 2), -1, dtype=np.int64)  # (array, row in it) of every spot
        for k, r in enumerate(rows):
            self.where[r, 0] = k
            self.where[r, 1] = np.arange(len(r))
        self.size = int(size)
        self.shape = (n, 3, self.size, self.size)
        self.dtype = torch.uint8

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), 3, self.size, self.size), dtype=np.uint8)
        where = self.where[idx]
        for k in np.unique(where[:, 0]):
            sel = np.flatnonzero(where[:, 0] == k)
            rows, inverse = np.unique(where[sel, 1], return_inverse=True)  # zarr wants them sorted, once each
            out[sel] = self.arrays[k].oindex[rows][inverse]
        return torch.from_numpy(out)


def _open(path: Path, key_text: str):
    import zarr

    try:
        arr = zarr.open_array(path, mode="r")
    except Exception as err:  # noqa: BLE001 - an unreadable entry is cropped again, and said
        logger.warning("Ignoring the unreadable patch-store entry %s (%s: %s).", path, type(err).__name__, err)
        return None
    if arr.attrs.get("key") != key_text:
        logger.warning("Ignoring the patch-store entry %s: it was written for another key.", path)
        return None
    return arr


def _write(path: Path, key_text: str, reader, rows: np.ndarray, size: int):
    import zarr

    with staged_folder(path, replace=True, create=False) as staging:
        arr = zarr.create_array(store=str(staging), shape=(len(rows), 3, size, size), dtype="uint8",
                                chunks=(1, 3, size, size), shards=(SHARD, 3, size, size),
                                attributes={"key": key_text})
        for s in range(0, len(rows), SHARD):
            arr[s:s + SHARD] = reader.read(rows[s:s + SHARD]).numpy()
    return zarr.open_array(path, mode="r")


def patch_store(reader, cache: FeatureCache, progress: bool = False) -> PatchStore:
    """The patches of every spot of ``reader`` (a :class:`~st_predict.dataloaders.PatchReader`) in the on-disk
    store of ``cache``: opened where an entry of the same key exists, else cropped section by section."""
    size = reader.out_size
    arrays, rows_of = [], []
    libs = pd.unique(reader.libraries)
    if progress:
        from tqdm.auto import tqdm

        libs = tqdm(libs, desc="Patch store", unit="section")
    for lib in libs:
        rows = np.flatnonzero(reader.libraries == lib)
        key = patches_key(size, str(lib), image_digest(reader.images[lib]), reader.boxes[rows])
        text = cache.key_text(key)
        path = cache.path(key).with_suffix(".zarr")
        arr = _open(path, text) if path.is_dir() else None
        if arr is None:
            arr = _write(path, text, reader, rows, size)
            reader.release()  # the section's decoded image is not needed any more
        arrays.append(arr)
        rows_of.append(rows)
    return PatchStore(arrays, rows_of, len(reader.libraries), size)
