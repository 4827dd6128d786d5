"""Each spot's K nearest spatial neighbours (same section only), from squidpy."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from st_predict._utils import InputError, quiet_logger


def _check_sizes(libraries, n_neighbors: int) -> None:
    counts = pd.Series(np.asarray(libraries).astype(str)).value_counts()
    small = counts[counts < n_neighbors + 1]
    if len(small):
        detail = ", ".join(f"{lib!r} has {n}" for lib, n in small.items())
        raise InputError(
            f"The neighbour branch needs at least K + 1 = {n_neighbors + 1} spots per section "
            f"(n_neighbors={n_neighbors}); {detail}. Lower n_neighbors or drop the section."
        )


def _squidpy_knn(coords: np.ndarray, libraries, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and distances ``(n_obs, K)`` of each spot's ``K`` nearest spots of its section (every section
    has more than ``K`` spots), nearest first, from :func:`squidpy.gr.spatial_neighbors_knn` on a throw-away
    AnnData."""
    from st_predict._utils import import_squidpy

    sq = import_squidpy()
    libraries = pd.Categorical(np.asarray(libraries).astype(str))
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
        same = np.flatnonzero((libraries == libraries[bad]) & (coords == coords[bad]).all(axis=1))
        why = (f"{len(same)} spots of section {libraries[bad]!r} sit at the same coordinates {coords[bad].tolist()} "
               f"(rows {same[:5].tolist()} of obsm['spatial']): squidpy drops zero distances, so give each spot its "
               "own position" if len(same) > 1 else "are several spots at identical coordinates?")
        raise InputError(f"squidpy returned {rows[bad]} neighbours for spot {bad} instead of {n_neighbors}; {why}.")
    idx = indices.reshape(n, n_neighbors)
    d = data.reshape(n, n_neighbors)
    # squidpy sorts each row by column index; order by distance instead (a stable sort keeps ties by index)
    order = np.argsort(d, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1).astype(np.int64), np.take_along_axis(d, order, axis=1)


def spatial_knn(coords: np.ndarray, libraries, n_neighbors: int) -> np.ndarray:
    """``(n_obs, K)`` indices of each spot's ``K`` nearest spots of the same section, nearest first.

    Built with :func:`squidpy.gr.spatial_neighbors_knn` (``library_key`` keeps sections apart) on a
    throw-away AnnData, so the user's object is not touched. Raises a ``ValueError`` naming every
    section with fewer than ``K + 1`` spots.
    """
    _check_sizes(libraries, n_neighbors)
    return _squidpy_knn(np.asarray(coords, dtype=np.float64), libraries, n_neighbors)[0]


def padded_knn(coords: np.ndarray, libraries, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and distances ``(n_obs, K)`` of each spot's ``K`` nearest spots of its section, nearest first;
    a section with ``K`` spots or fewer lists all its other spots and then the spot itself (distance ``inf``)."""
    coords = np.asarray(coords, dtype=np.float64)
    libraries = np.asarray(libraries).astype(str)
    idx = np.empty((len(coords), n_neighbors), dtype=np.int64)
    dist = np.full((len(coords), n_neighbors), np.inf)
    counts = pd.Series(libraries).value_counts()
    large = np.isin(libraries, counts.index[counts > n_neighbors])
    if large.any() and n_neighbors > 0:
        rows = np.flatnonzero(large)
        i, d = _squidpy_knn(coords[rows], libraries[rows], n_neighbors)
        idx[rows], dist[rows] = rows[i], d
    for lib in counts.index[counts <= n_neighbors]:
        rows = np.flatnonzero(libraries == lib)
        d = np.linalg.norm(coords[rows, None] - coords[None, rows], axis=-1)
        for k, row in enumerate(rows):
            order = [j for j in np.argsort(d[k], kind="stable") if j != k]
            m = min(len(order), n_neighbors)
            idx[row] = ([int(rows[j]) for j in order] + [int(row)] * n_neighbors)[:n_neighbors]
            dist[row, :m] = d[k, order[:m]]
    return idx, dist


def context_neighbors(coords: np.ndarray, libraries, n_neighbors: int) -> np.ndarray:
    """:func:`spatial_knn` for prediction: ``(n_obs, K)`` indices of each spot's ``K`` nearest spots of its
    section, where a section with ``K`` spots or fewer (which training refuses) lists all its other spots,
    nearest first, and then the spot itself to fill the row (the neighbourhood of a spot with no neighbours is
    the spot alone)."""
    return padded_knn(coords, libraries, n_neighbors)[0]


#: ``obsm`` keys of :func:`spatial_neighbors`' arrays: ``f"{key_added}_indices"`` and ``f"{key_added}_distances"``
NEIGHBORS_KEY = "spatial_neighbors"
#: neighbours per spot that :func:`spatial_neighbors` and ``setup_anndata`` store (the paper's largest K)
N_NEIGHBORS_STORED = 25


def spatial_neighbors(
    adata: ad.AnnData,
    n_neighs: int = N_NEIGHBORS_STORED,
    library_key: str | None = None,
    spatial_key: str = "spatial",
    key_added: str = NEIGHBORS_KEY,
) -> None:
    """Each spot's ``n_neighs`` nearest spots of its section, as scVIVA stores them: the dense arrays
    ``adata.obsm[f"{key_added}_indices"]`` (``(n_obs, K)`` row positions, nearest first) and
    ``adata.obsm[f"{key_added}_distances"]`` (their distances in full-resolution pixels), from squidpy's
    :func:`~squidpy.gr.spatial_neighbors_knn`. A section with ``K`` spots or fewer lists all its other spots,
    then the spot itself (distance ``inf``). :meth:`~st_predict.NH2ST.setup_anndata` registers them (and computes
    them when absent); a model with ``K`` neighbours reads their first ``K`` columns.

    The indices are row positions: subsetting the AnnData afterwards makes them stale
    (``setup_anndata`` checks them against the coordinates, and computes them again if they do not match).
    """
    from ._patches import spot_coordinates, spot_libraries

    if not isinstance(n_neighs, int | np.integer) or n_neighs < 0:
        raise InputError(f"n_neighs must be a number of neighbours >= 0, got {n_neighs!r}.")
    idx, dist = padded_knn(spot_coordinates(adata, spatial_key), spot_libraries(adata, library_key), int(n_neighs))
    adata.obsm[f"{key_added}_indices"] = idx
    adata.obsm[f"{key_added}_distances"] = dist.astype(np.float32)


def stored_neighbors_match(adata: ad.AnnData, key: str, coords: np.ndarray, libraries) -> bool:
    """Whether ``adata.obsm``'s neighbour arrays under ``key`` belong to these spots: indices in range, of the
    spot's own section, at the stored distances, nearest first."""
    idx, dist = adata.obsm.get(f"{key}_indices"), adata.obsm.get(f"{key}_distances")
    if idx is None or dist is None:
        return False
    idx, dist = np.asarray(idx), np.asarray(dist, dtype=np.float64)
    if idx.ndim != 2 or idx.shape != dist.shape or len(idx) != len(coords) or not np.issubdtype(idx.dtype, np.integer):
        return False
    if idx.size == 0:
        return True
    if idx.min() < 0 or idx.max() >= len(coords):
        return False
    libraries = np.asarray(libraries).astype(str)
    if (libraries[idx] != libraries[:, None]).any():
        return False
    real = np.isfinite(dist)
    d = np.linalg.norm(np.asarray(coords, dtype=np.float64)[idx] - np.asarray(coords, dtype=np.float64)[:, None], axis=-1)
    return bool(np.allclose(d[real], dist[real], rtol=1e-3, atol=1e-2) and (np.diff(dist, axis=1) >= -1e-3).all())


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
