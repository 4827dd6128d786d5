"""Scores of prediction intervals: coverage beside sharpness, and ``predict``'s measurement interval rebuilt at
each evaluated spot's own depth."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from st_predict._utils import PREDICTED_KEY, InputError, MissingKeyError


def crps_gaussian(y, mu, sigma) -> np.ndarray:
    """The continuous ranked probability score of a Gaussian ``N(mu, sigma^2)`` at ``y`` (lower is better)."""
    from scipy.stats import norm

    z = (y - mu) / sigma
    return sigma * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / np.sqrt(np.pi))


def marginal_width(truth: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """Per gene: the width of the central interval of the measured values ``truth`` ``(n, G)`` that holds the
    fraction ``coverage[g]`` of them (the narrowest interval that knows nothing of the spot)."""
    truth = np.asarray(truth, np.float64)
    cov = np.clip(np.asarray(coverage, np.float64), 0, 1)
    lo = np.array([np.quantile(truth[:, g], (1 - c) / 2) for g, c in enumerate(cov)])
    hi = np.array([np.quantile(truth[:, g], (1 + c) / 2) for g, c in enumerate(cov)])
    return hi - lo


def interval_scores(lower, upper, truth, point=None, level: float | None = None) -> dict[str, float]:
    """Coverage and sharpness of intervals ``lower``..``upper`` for the measured ``truth`` (all ``(n, G)``).

    Returns ``coverage`` (per gene, mean over genes), ``coverage_min_gene``, ``width`` (mean), and
    ``width_ratio_marginal``: the mean width over that of each gene's central marginal interval of the same
    per-gene coverage, taken from ``truth`` itself (an oracle that knows the evaluated distribution; below 1
    the intervals know something of each spot). With ``point`` and ``level`` (a central interval of that
    coverage) also ``crps``, the mean CRPS of a Gaussian of the interval's width, and
    ``crps_one_width_per_gene``, the same with each gene's mean width at every spot (lower is better: below it,
    the per-spot widths carry information). Coverage alone is no evidence of trust: intervals as wide as the
    marginal spread cover too."""
    lo, hi, y = (np.asarray(a, np.float64) for a in (lower, upper, truth))
    if not lo.shape == hi.shape == y.shape:
        raise InputError(f"lower {lo.shape}, upper {hi.shape} and truth {y.shape} differ in shape.")
    cov = ((y >= lo) & (y <= hi)).mean(0)
    width = hi - lo
    out = {"coverage": float(cov.mean()), "coverage_min_gene": float(cov.min()), "width": float(width.mean()),
           "width_ratio_marginal": float(width.mean() / max(float(marginal_width(y, cov).mean()), 1e-12))}
    if point is not None and level is not None:
        from scipy.stats import norm

        sigma = np.maximum(width / (2 * norm.ppf(0.5 + level / 2)), 1e-6)
        p = np.asarray(point, np.float64)
        out["crps"] = float(crps_gaussian(y, p, sigma).mean())
        out["crps_one_width_per_gene"] = float(crps_gaussian(y, p, sigma.mean(0)[None, :]).mean())
    return out


def spot_depth(adata, genes=None, layer: str | None = None, library_size: str = "all_genes") -> np.ndarray:
    """UMI per spot of ``adata``'s counts (``X`` or ``layers[layer]``): over all genes, or with
    ``library_size="selected_genes"`` over ``genes`` (the model's convention, ``uns[...]["library_size"]``)."""
    matrix = adata.layers[layer] if layer is not None else adata.X
    if library_size == "selected_genes":
        matrix = matrix[:, adata.var_names.get_indexer(list(genes))]
    return np.asarray(matrix.sum(1)).ravel().astype(np.float64)


def intervals_at_depth(adata, key: str = PREDICTED_KEY, depth=None, layer: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``predict``'s interval for a measurement, rebuilt at another depth: by default each spot's own UMI count
    (from ``adata``'s counts, as the model counts a library), or ``depth`` (a number, or one per spot).

    Reads ``obsm[key]`` (the point), ``obsm[f"{key}_model_sd"]`` and ``uns["st_predict"][key]``'s
    ``interval_quantiles`` and ``calibration_depth``, which a model trained with ``reliability=True`` on counts
    writes. Returns the lower and upper bounds as spots x genes DataFrames."""
    from st_predict.model import measurement_bounds

    meta = adata.uns.get("st_predict", {})
    entry = meta.get(key) if isinstance(meta, Mapping) else None
    need = [f"obsm[{k!r}]" for k in (key, f"{key}_model_sd") if k not in adata.obsm]
    if not isinstance(entry, Mapping) or "interval_quantiles" not in entry:
        need.append(f"uns['st_predict'][{key!r}]['interval_quantiles']")
    if need:
        raise MissingKeyError(f"Rebuilding the intervals at a depth needs {', '.join(need)}: predict with a model "
                              "trained with reliability=True on counts writes them.")
    if str(entry.get("counts_model", "none")) == "none":
        raise InputError(f"The intervals of {key!r} have no counts model (the model was trained on normalised data "
                         "or by an older st_predict): they hold at one depth only.")
    point = adata.obsm[key]
    if not isinstance(point, pd.DataFrame):
        raise InputError(f"adata.obsm[{key!r}] must be the spots x genes DataFrame predict writes.")
    genes = list(point.columns)
    if depth is None:
        depth = np.maximum(spot_depth(adata, genes, layer, str(entry.get("library_size", "all_genes"))), 1.0)
    q = entry["interval_quantiles"]
    q = q if isinstance(q, pd.DataFrame) else pd.DataFrame(q)
    q.index = q.index.astype(np.float64)
    lo, hi = measurement_bounds(point.to_numpy(), adata.obsm[f"{key}_model_sd"][genes].to_numpy(), q[genes],
                                float(entry["calibration_depth"]), depth)
    return (pd.DataFrame(lo, index=point.index, columns=genes), pd.DataFrame(hi, index=point.index, columns=genes))
