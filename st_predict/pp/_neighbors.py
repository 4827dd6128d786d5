"""Each spot's K nearest spatial neighbours (same section only), from squidpy."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from st_predict._errors import InputError
from st_predict._logging import quiet_logger


def spatial_knn(coords: np.ndarray, libraries, n_neighbors: int) -> np.ndarray:
    """``(n_obs, K)`` indices of each spot's ``K`` nearest spots of the same section, nearest first.

    Built with :func:`squidpy.gr.spatial_neighbors_knn` (``library_key`` keeps sections apart) on a
    throw-away AnnData, so the user's object is not touched. Raises a ``ValueError`` naming every
    section with fewer than ``K + 1`` spots.
    """
    from st_predict._deps import import_squidpy

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
