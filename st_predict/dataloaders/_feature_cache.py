"""An on-disk cache of encoder features, keyed by everything they depend on (issue 16).

Each entry is one tensor (e.g. a frozen encoder's features of one section's spots) in one file,
named by the SHA-256 of its key: the encoder and its weights, the section and its image, the spot
coordinates, the patch size and the transform. A changed part of the key is another file, so a
stale feature is never read; the key is stored in the file too and checked on reading. Entries are
written through :func:`~st_predict._utils._atomic.staged_file`, so a crash while writing leaves no entry
(only a hidden temporary file that is never read). torch and the standard library only.

The location is ``root=``, else ``$ST_PREDICT_CACHE_DIR``, else ``$XDG_CACHE_HOME/st_predict/features``
(``~/.cache/st_predict/features``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from st_predict._utils import InputTypeError, digest, staged_file

logger = logging.getLogger(__name__)

#: Environment variable that moves the default cache location.
CACHE_ENV = "ST_PREDICT_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$ST_PREDICT_CACHE_DIR``, else ``$XDG_CACHE_HOME/st_predict/features`` (default ``~/.cache``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "st_predict" / "features"


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes, values): the identity of its weights."""
    return digest(module)


def maps_key(info, weights: str, input_size: int, views: int, pooled: bool, section: str, image: str, boxes) -> dict:
    """The cache key of a frozen encoder's maps of one section's spots: the encoder (name, weights
    digest, input size, normalisation), the views (1, or the 8 flips/rotations), whether the maps
    were averaged to ``1 x 1``, the section, its image digest and the spots' crop boxes (which carry
    the patch size in pixels). Shared by training, prediction and the benchmark runner."""
    return {
        "kind": "nh2st-trunk-maps", "encoder": info.name, "weights": weights, "input_size": int(input_size),
        "mean": tuple(info.mean), "std": tuple(info.std), "views": int(views), "pooled": bool(pooled),
        "section": section, "image": image, "boxes": boxes,
    }


def patches_key(out_size: int, section: str, image: str, boxes) -> dict:
    """The key of one section's training patches in the on-disk patch store: the section, its image digest,
    its spots' crop boxes (in the image's pixels) and the side the crops are resampled to."""
    return {"kind": "nh2st-patches", "out_size": int(out_size), "section": section, "image": image, "boxes": boxes}


def image_digest(image) -> str:
    """SHA-256 of a section image: all its bytes when it is in memory (numpy); for a lazy image (dask,
    zarr) its shape, dtype and every 16th row and column, so that keying does not read the whole slide."""
    if isinstance(image, np.ndarray):
        return digest(image)
    sample = np.asarray(image[::16, ::16])
    return digest(sample) + f"-lazy{tuple(image.shape)}"


def _canonical(value):
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return {"sha256": digest(value)}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise InputTypeError(f"A feature-cache key part must be a plain value, array or tensor, got {type(value).__name__}.")


class FeatureCache:
    """Features on disk, one file per key.

    Parameters
    ----------
    root
        Folder of the cache (default: :func:`default_cache_dir`).

    Examples
    --------
    >>> cache = FeatureCache(tmp)
    >>> key = {"encoder": "resnet18", "weights": state_digest(trunk), "section": "C2", "coords": xy, "patch_um": 165.0}
    >>> feats = cache.get_or_compute(key, lambda: encode(patches))  # computed once, then read
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    @staticmethod
    def key_text(key: Mapping) -> str:
        """The key as canonical JSON (arrays and tensors by their SHA-256)."""
        return json.dumps(_canonical(dict(key)), sort_keys=True, separators=(",", ":"))

    def path(self, key: Mapping) -> Path:
        """Where the entry of ``key`` lives."""
        name = digest(self.key_text(key))
        return self.root / name[:2] / f"{name}.pt"

    def get(self, key: Mapping) -> torch.Tensor | None:
        """The cached tensor of ``key``, or ``None`` when there is none (or it was written for another key)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - an unreadable entry is recomputed, and said
            logger.warning("Ignoring the unreadable feature-cache entry %s (%s: %s).", path, type(err).__name__, err)
            return None
        if not isinstance(entry, dict) or entry.get("key") != self.key_text(key):
            logger.warning("Ignoring the feature-cache entry %s: it was written for another key.", path)
            return None
        return entry["features"]

    def put(self, key: Mapping, features: torch.Tensor) -> Path:
        """Write ``features`` for ``key`` atomically; returns the entry's path."""
        path = self.path(key)
        with staged_file(path) as tmp:
            torch.save({"key": self.key_text(key), "features": features.detach().cpu().contiguous()}, tmp)
        return path

    def get_or_compute(self, key: Mapping, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached tensor of ``key``; computed with ``compute()`` and stored when missing."""
        found = self.get(key)
        if found is not None:
            return found
        features = compute()
        self.put(key, features)
        return features
