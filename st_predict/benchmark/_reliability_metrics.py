"""Point 4 of reliability: how good a model's reliability and intervals are on a held-out section."""

from __future__ import annotations

import numpy as np

from st_predict.metrics import crps_gaussian, interval_scores

#: fractions of the held-out spots kept (the most certain first) for the risk-coverage curve
KEEP = (1.0, 0.9, 0.8, 0.7, 0.5)


def reliability_metrics(model, single: np.ndarray, folds: np.ndarray, truth: np.ndarray, depth=None) -> dict:
    """For a model trained with ``reliability=True``: its point prediction ``single`` ``(n, G)`` of a held-out
    section, the fold models' ``folds`` ``(K, n, G)`` and the measured ``truth`` on the model's scale.

    Returns per-gene coverage of the 80 % and 90 % intervals (mean, and mean absolute error against nominal),
    the mean 90 % width, the Spearman correlation across genes of the reliability with the PCC achieved here,
    the ensemble's PCC beside the single model's, a risk-coverage curve (per-gene PCC and MSE on the spots kept
    after dropping the most uncertain, by their mean 90 % width), and the mean CRPS of a Gaussian with the 90 %
    interval's width against the point model with a constant width per gene (the out-of-fold residual SD).

    ``depth``: the held-out section's UMI per spot (one per spot, or a number). The intervals are then those for
    a measurement at that depth and the reliability that at its median (:meth:`~st_predict.NH2ST.gene_reliability`);
    ``None``: at the calibration depth. Sharpness sits beside coverage: ``width_ratio_marginal_90`` (the mean
    90 % width over that of each gene's marginal interval of the same coverage) and ``crps_one_width_per_gene``
    (see :func:`~st_predict.metrics.interval_scores`)."""
    from scipy.stats import norm

    from st_predict.metrics import pcc_per_gene

    out: dict = {}
    ensemble = (folds.sum(0) + single) / (len(folds) + 1)
    out["pcc_single"] = float(np.nanmean(pcc_per_gene(single, truth)))
    out["pcc_ensemble"] = float(np.nanmean(pcc_per_gene(ensemble, truth)))
    depth_known = depth is not None and np.isfinite(model.calibration_depth)
    if depth_known:
        depth = np.maximum(np.asarray(depth, np.float64), 1.0)
    table = model.gene_reliability(depth=float(np.median(depth))) if depth_known else model.gene_reliability_
    out.update(reliability_columns(table["reliability"].to_numpy(float), table["reliable"].to_numpy(bool), single,
                                   truth))
    bounds = {level: model.intervals_from_folds(single, folds, level, depth if depth_known else None)
              for level in (0.8, 0.9)}
    out.update(interval_columns(bounds, single, truth))
    lo, hi = bounds[0.9]
    sigma = np.maximum((hi - lo) / (2 * norm.ppf(0.95)), 1e-6)
    order = np.argsort((hi - lo).mean(1))
    curve = []
    for keep in KEEP:
        sel = order[: max(3, int(round(keep * len(order))))]
        curve.append({"keep": keep, "pcc": float(np.nanmean(pcc_per_gene(single[sel], truth[sel]))),
                      "mse": float(((single[sel] - truth[sel]) ** 2).mean())})
    out["risk_coverage"] = curve
    const = np.maximum(model.conformal_["oof_residual_sd"], 1e-6)[None, :]
    out["crps_adaptive"] = float(crps_gaussian(truth, single, sigma).mean())
    out["crps_constant_width"] = float(crps_gaussian(truth, single, const).mean())
    return out


def reliability_columns(reliability: np.ndarray, reliable: np.ndarray, single: np.ndarray, truth: np.ndarray) -> dict:
    """How well each gene's ``reliability`` (and ``reliable`` flag), from the training sections, foretells the PCC that
    the point prediction ``single`` ``(n, G)`` achieves against ``truth`` on the held-out section: the Spearman
    correlation across genes, and the count and mean PCC of the reliable genes and of the others."""
    from scipy.stats import spearmanr

    from st_predict.metrics import pcc_per_gene

    r = pcc_per_gene(single, truth)
    ok = np.isfinite(reliability) & np.isfinite(r)
    reliable = np.asarray(reliable, bool)
    return {
        "spearman_reliability": float(spearmanr(reliability[ok], r[ok]).statistic) if ok.sum() > 2 else float("nan"),
        "n_reliable_genes": int(reliable.sum()),
        "pcc_reliable_genes": float(np.nanmean(r[reliable])) if reliable.any() else float("nan"),
        "pcc_unreliable_genes": float(np.nanmean(r[~reliable])) if (~reliable).any() else float("nan"),
    }


def interval_columns(bounds: dict, single: np.ndarray, truth: np.ndarray) -> dict:
    """Per-gene coverage of the intervals ``bounds[level] = (lower, upper)`` (mean, and mean absolute error against
    ``level``) and their mean width, for each level; at 0.9 also their sharpness against each gene's marginal interval
    and the CRPS with one width per gene (:func:`~st_predict.metrics.interval_scores`)."""
    out: dict = {}
    for level, (lo, hi) in sorted(bounds.items()):
        cov = ((truth >= lo) & (truth <= hi)).mean(0)
        tag = int(round(level * 100))
        out[f"coverage_{tag}"] = float(cov.mean())
        out[f"coverage_mae_{tag}"] = float(np.abs(cov - level).mean())
        out[f"width_{tag}"] = float((hi - lo).mean())
    if 0.9 in bounds:
        sharp = interval_scores(*bounds[0.9], truth, single, 0.9)
        out["width_ratio_marginal_90"] = sharp["width_ratio_marginal"]
        out["crps_one_width_per_gene"] = sharp["crps_one_width_per_gene"]
    return out
