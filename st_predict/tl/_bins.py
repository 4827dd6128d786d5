"""Sub-spot bins back to spots: the check that the bins explain what the spot model says."""

from __future__ import annotations

import numpy as np
import pandas as pd

from st_predict._utils import InputError, MissingKeyError, footprint_fraction, spot_shape


def aggregate_bins(bins, by: str = "spot", weight: str | None = "spot_weight", layer: str = "share",
                   at=None, library_key: str = "section", spatial_key: str = "spatial") -> pd.DataFrame:
    """Bins of :meth:`~st_predict.NH2ST.predict_bins` summed back into spots, as counts are: per group of
    ``bins.obs[by]``, ``log1p(1e4 * sum(w * share) / sum(w))`` with ``w = bins.obs[weight]`` (the bin's
    fraction inside its spot's disc; ``None``: every bin of the group counts fully). The result is on the
    spots' scale (``log1p`` counts per 10k), groups x genes, groups in order of first appearance; a group whose
    weights sum to 0 is NaN.

    ``at``: an AnnData of other spots (``obs[library_key]`` naming the bins' sections, centres in
    ``obsm[spatial_key]``, discs of ``uns["spatial"][section]["scalefactors"]["spot_diameter_fullres"]``, or
    squares of that side where the section is binned, as Visium HD is): each of its spots gets the bins its
    footprint covers, weighted by the fraction of each bin inside it (rows: ``at.obs_names``). E.g. spots or HD
    bins measured at a finer scale than the spots the bins were predicted around."""
    if at is not None:
        return _aggregate_at(bins, at, layer, library_key, spatial_key)
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


def _aggregate_at(bins, at, layer: str, library_key: str, spatial_key: str) -> pd.DataFrame:
    from scipy.spatial import cKDTree

    if library_key not in at.obs or spatial_key not in at.obsm:
        raise MissingKeyError(f"at needs obs[{library_key!r}] and obsm[{spatial_key!r}].")
    sides = bins.uns.get("st_predict", {}).get("bins", {}).get("bin_px")
    if not sides:
        raise MissingKeyError("bins.uns['st_predict']['bins']['bin_px'] is missing: pass predict_bins' output.")
    share = np.asarray(bins.layers[layer], np.float64)
    out = np.full((at.n_obs, bins.n_vars), np.nan)
    sections = at.obs[library_key].astype(str).to_numpy()
    centres = np.asarray(at.obsm[spatial_key], np.float64)
    for sec in pd.unique(sections):
        if sec not in sides:
            raise InputError(f"Section {sec!r} of at has no bins (bins have {sorted(sides)}).")
        try:
            radius = float(at.uns["spatial"][sec]["scalefactors"]["spot_diameter_fullres"]) / 2
            square = spot_shape(at.uns["spatial"][sec]) == "square"
        except KeyError as err:
            raise MissingKeyError(f"at.uns['spatial'][{sec!r}]['scalefactors']['spot_diameter_fullres'] is missing.") from err
        mine = np.flatnonzero(bins.obs["section"].astype(str).to_numpy() == sec)
        side = float(sides[sec])
        xy = np.asarray(bins.obsm["spatial"], np.float64)[mine]
        tree = cKDTree(xy)
        reach = (radius * np.sqrt(2) if square else radius) + side * np.sqrt(0.5)  # the farthest bin centre that counts
        for i in np.flatnonzero(sections == sec):
            near = np.asarray(tree.query_ball_point(centres[i], reach), dtype=np.int64)
            if not len(near):
                continue
            w = footprint_fraction(xy[near], side, np.broadcast_to(centres[i], (len(near), 2)), radius, square)
            if w.sum() > 0:
                out[i] = np.log1p(1e4 * (w[:, None] * share[mine[near]]).sum(0) / w.sum())
    return pd.DataFrame(out, index=at.obs_names.copy(), columns=bins.var_names.copy())
