"""Evaluation metrics for predicted expression: per-gene PCC, MSE, MAE."""

from __future__ import annotations

import numpy as np
import pandas as pd


def _as_array(x) -> np.ndarray:
    return x.to_numpy(dtype=np.float64) if isinstance(x, pd.DataFrame) else np.asarray(x, dtype=np.float64)


def pcc_per_gene(pred, truth) -> np.ndarray:
    """Pearson correlation of each gene (column) across spots (rows). NaN where either side is
    constant (e.g. a gene never detected in the section)."""
    p, t = _as_array(pred), _as_array(truth)
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and truth {t.shape} differ in shape.")
    pc, tc = p - p.mean(0), t - t.mean(0)
    denom = np.sqrt((pc**2).sum(0) * (tc**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (pc * tc).sum(0) / denom
    r[~(denom > 0)] = np.nan
    return r


def evaluate(pred, truth) -> dict[str, float]:
    """Metrics of one section: ``pcc`` (mean over genes of the per-gene PCC, NaN genes excluded from
    the mean and counted in ``n_nan_genes``), ``mse`` and ``mae`` over spots x genes, ``n_genes``,
    ``n_spots``."""
    p, t = _as_array(pred), _as_array(truth)
    r = pcc_per_gene(p, t)
    n_nan = int(np.isnan(r).sum())
    return {
        "pcc": float(np.nanmean(r)) if n_nan < len(r) else float("nan"),
        "mse": float(((p - t) ** 2).mean()),
        "mae": float(np.abs(p - t).mean()),
        "n_nan_genes": n_nan,
        "n_genes": int(p.shape[1]),
        "n_spots": int(p.shape[0]),
    }
