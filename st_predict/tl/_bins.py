"""Sub-spot bins back to spots: the check that the bins explain what the spot model says."""

from __future__ import annotations

import numpy as np
import pandas as pd

from st_predict._utils import InputError, MissingKeyError


def aggregate_bins(bins, by: str = "spot", weight: str | None = "spot_weight", layer: str = "share") -> pd.DataFrame:
    """Bins of :meth:`~st_predict.NH2ST.predict_bins` summed back into their spots, as counts are: per group of
    ``bins.obs[by]``, ``log1p(1e4 * sum(w * share) / sum(w))`` with ``w = bins.obs[weight]`` (the bin's
    fraction inside its spot's disc; ``None``: every bin of the group counts fully). The result is on the
    spots' scale (``log1p`` counts per 10k), groups x genes, groups in order of first appearance; a group whose
    weights sum to 0 is NaN."""
    for key, where in ((by, "obs"), (weight, "obs")):
        if key is not None and key not in bins.obs:
            raise MissingKeyError(f"bins.{where} has no column {key!r}.")
    if layer not in bins.layers:
        raise MissingKeyError(f"bins.layers has no {layer!r} (the densities predict_bins writes).")
    share = np.asarray(bins.layers[layer], np.float64)
    w = np.ones(bins.n_obs) if weight is None else bins.obs[weight].to_numpy(np.float64)
    if np.any(~np.isfinite(w)) or np.any(w < 0):
        raise InputError(f"bins.obs[{weight!r}] must be finite and non-negative.")
    groups = pd.Index(pd.unique(bins.obs[by].astype(str)))
    codes = groups.get_indexer(bins.obs[by].astype(str))
    num = np.zeros((len(groups), share.shape[1]))
    np.add.at(num, codes, w[:, None] * share)
    den = np.bincount(codes, weights=w, minlength=len(groups))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.log1p(1e4 * num / den[:, None])
    out[den <= 0] = np.nan
    return pd.DataFrame(out, index=groups, columns=bins.var_names.copy())
