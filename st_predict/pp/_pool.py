"""Pooled supervision: neighbouring spots summed into super-spots, a measurement coarser than the spots (the
honest test of sub-spot predictions where no finer truth exists)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from st_predict._utils import SECTION_KEY, InputError, MissingKeyError

#: ``obsm`` key of a super-spot's footprint: its members' centres relative to its own, ``(n, k, 2)`` pixels
FOOTPRINT_KEY = "footprint"


def pool_spots(adata: ad.AnnData, size: int = 2, grid_keys: tuple[str, str] | None = None,
               library_key: str = SECTION_KEY, spatial_key: str = "spatial", key_added: str = FOOTPRINT_KEY) -> ad.AnnData:
    """Super-spots of ``size x size`` spots of the array grid (``obs[grid_keys]``; default ``array_row`` and
    ``array_col`` as Visium's, else HER2ST's ``array_x`` and ``array_y``), per section: only complete
    blocks, whose counts are summed (``X`` must be counts; sparse stays sparse). A super-spot's centre is its members' mean; its
    footprint, ``obsm[key_added]`` ``(n, size**2, 2)``, is its members' centres relative to it (the union of their
    discs). ``obs["members"]`` lists the members' names (``;``-separated), and ``uns["spatial"]`` is ``adata``'s.
    ``adata`` is not changed."""
    if grid_keys is None:
        grid_keys = ("array_row", "array_col") if {"array_row", "array_col"} <= set(adata.obs) else ("array_x", "array_y")
    missing = [k for k in (*grid_keys, library_key) if k not in adata.obs]
    if missing:
        raise MissingKeyError(f"pool_spots needs adata.obs columns {missing} (the array grid and the section).")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 2:
        raise InputError(f"size must be an integer >= 2, got {size!r}.")
    x = sp.csr_matrix(adata.X)
    if x.nnz and (np.any(x.data < 0) or np.any(np.abs(x.data - np.rint(x.data)) > 1e-6)):
        raise InputError("pool_spots sums counts: adata.X must hold non-negative integer counts.")
    obs = adata.obs
    keys = pd.DataFrame({"section": obs[library_key].astype(str).to_numpy(),
                         "bx": obs[grid_keys[0]].to_numpy() // size, "by": obs[grid_keys[1]].to_numpy() // size})
    group = keys.groupby(["section", "bx", "by"], sort=True, observed=True).indices
    blocks = [np.sort(rows) for rows in group.values() if len(rows) == size * size]
    if not blocks:
        raise InputError(f"No complete {size} x {size} block of spots on the array grid {grid_keys}.")
    coords = np.asarray(adata.obsm[spatial_key], np.float64)
    rows = np.concatenate(blocks)
    owner = np.repeat(np.arange(len(blocks)), size * size)
    pool = sp.csr_matrix((np.ones(len(rows)), (owner, rows)), shape=(len(blocks), adata.n_obs))
    centres = np.stack([coords[b].mean(0) for b in blocks])
    names = np.asarray(adata.obs_names)
    sections = [str(obs[library_key].iloc[b[0]]) for b in blocks]
    new_obs = pd.DataFrame({library_key: pd.Categorical(sections, categories=obs[library_key].astype("category").cat.categories),
                            "members": [";".join(names[b]) for b in blocks]},
                           index=[f"{s}_pool{'_'.join(names[b[0]].split('_')[1:]) or i}" for i, (s, b) in
                                  enumerate(zip(sections, blocks, strict=True))])
    summed = (pool @ x).astype(np.float32)
    out = ad.AnnData(X=summed if sp.issparse(adata.X) else summed.toarray(), obs=new_obs, var=adata.var.copy())
    out.obsm[spatial_key] = centres
    out.obsm[key_added] = np.stack([coords[b] - c for b, c in zip(blocks, centres, strict=True)])
    out.uns["spatial"] = adata.uns.get("spatial", {})
    return out
