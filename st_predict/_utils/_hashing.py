"""The one hashing helper: SHA-256 digests of arrays, tensors, state dicts, text and files (a file's digest is
computed once per process, and again only when the file changes)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

#: (path, size, mtime) -> digest of a file already read
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def digest(value) -> str:
    """SHA-256 (hex) of ``value``: an array or tensor (its dtype, shape and bytes), a state dict or module
    (names and tensors, in order), ``str`` or ``bytes``."""
    import numpy as np

    h = hashlib.sha256()
    if isinstance(value, str | bytes):
        h.update(value.encode() if isinstance(value, str) else value)
        return h.hexdigest()
    if hasattr(value, "state_dict") and callable(value.state_dict):
        value = value.state_dict()
    if isinstance(value, Mapping):
        for name, tensor in value.items():
            h.update(str(name).encode())
            h.update(digest(tensor).encode())
        return h.hexdigest()
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().contiguous().numpy()
    arr = np.ascontiguousarray(value)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.view(np.uint8).reshape(-1).data if arr.size else b"")
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read once per process (again if its size or modification time
    changes)."""
    path = os.path.abspath(os.fspath(path))
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
        _FILE_DIGESTS[key] = h.hexdigest()
    return _FILE_DIGESTS[key]
