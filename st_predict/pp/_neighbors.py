"""Each spot's K nearest spatial neighbours (same section only), from squidpy."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from st_predict._utils import InputError, quiet_logger


def spatial_knn(coords: np.ndarray, libraries, n_neighbors: int) -> np.ndarray:
    """``(n_obs, K)`` indices of each spot's ``K`` nearest spots of the same section, nearest first.

    Built with :func:`squidpy.gr.spatial_neighbors_knn` (``library_key`` keeps sections apart) on a
    throw-away AnnData, so the user's object is not touched. Raises a ``ValueError`` naming every
    section with fewer than ``K + 1`` spots.
    """
    from st_predict._utils import import_squidpy

    sq = import_squidpy()

    coords = np.asarray(coords, dtype=np.float64)
    libraries = pd.Categorical(np.asarray(libraries).astype(str))
    counts = pd.Series(libraries).value_counts()
    small = counts[counts < n_neighbors + 1]
    if len(small):
        detail = ", ".join(f"{lib!r} has {n}" for lib, n in small.items())
        raise InputError(
            f"The neighbour branch needs at least K + 1 = {n_neighbors + 1} spots per section "
            f"(n_neighbors={n_neighbors}); {detail}. Lower n_neighbors or drop the section."
        )
    tmp = ad.AnnData(obs=pd.DataFrame({"library": libraries}, index=[str(i) for i in range(len(coords))]))
    tmp.obsm["spatial"] = coords
    # squidpy reports each graph at INFO through spatialdata's logger: a line per model, not news to a user
    with quiet_logger("spatialdata._logging"):
        res = sq.gr.spatial_neighbors_knn(
            tmp, spatial_key="spatial", library_key="library", n_neighs=n_neighbors, copy=True
        )
    dist = res.distances.tocsr()
    dist.sort_indices()
    n = dist.shape[0]
    indptr, indices, data = dist.indptr, dist.indices, dist.data
    rows = np.diff(indptr)
    if (rows != n_neighbors).any():
        bad = int(np.flatnonzero(rows != n_neighbors)[0])
        raise InputError(
            f"squidpy returned {rows[bad]} neighbours for spot {bad} instead of {n_neighbors}; "
            "are several spots at identical coordinates?"
        )
    idx = indices.reshape(n, n_neighbors)
    d = data.reshape(n, n_neighbors)
    # squidpy sorts each row by column index; order by distance instead (a stable sort keeps ties by index)
    order = np.argsort(d, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1).astype(np.int64)


def context_neighbors(coords: np.ndarray, libraries, n_neighbors: int) -> np.ndarray:
    """:func:`spatial_knn` for prediction: ``(n_obs, K)`` indices of each spot's ``K`` nearest spots of its
    section, where a section with ``K`` spots or fewer (which training refuses) lists all its other spots,
    nearest first, and then the spot itself to fill the row (the neighbourhood of a spot with no neighbours is
    the spot alone)."""
    coords = np.asarray(coords, dtype=np.float64)
    libraries = np.asarray(libraries).astype(str)
    out = np.empty((len(coords), n_neighbors), dtype=np.int64)
    counts = pd.Series(libraries).value_counts()
    large = np.isin(libraries, counts.index[counts > n_neighbors])
    if large.any():
        rows = np.flatnonzero(large)
        out[rows] = rows[spatial_knn(coords[rows], libraries[rows], n_neighbors)]
    for lib in counts.index[counts <= n_neighbors]:
        rows = np.flatnonzero(libraries == lib)
        d = np.linalg.norm(coords[rows, None] - coords[None, rows], axis=-1)
        for i, row in enumerate(rows):
            others = [int(rows[j]) for j in np.argsort(d[i], kind="stable") if j != i]
            out[row] = (others + [int(row)] * n_neighbors)[:n_neighbors]
    return out


def grid_neighbors(centres: np.ndarray, stride: float, every: int, n_neighbors: int) -> np.ndarray:
    """``(n, K)`` neighbours of tiles laid on a regular grid (centres in pixels, ``stride`` pixels apart), taken
    among the tiles of the tile's own sub-grid of every ``every``-th row and column: with tiles at half the
    training spot pitch and ``every=2``, a tile's neighbours are the tiles one training pitch away, the
    neighbourhood the network was trained on, not the adjacent tiles half that far."""
    centres = np.asarray(centres, dtype=np.float64)
    every = max(1, int(every))
    grid = np.rint((centres - centres.min(0)) / float(stride)).astype(np.int64)
    classes = (grid[:, 0] % every) * every + grid[:, 1] % every
    return context_neighbors(centres, classes, n_neighbors)
