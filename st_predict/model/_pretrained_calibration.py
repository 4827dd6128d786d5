"""Calibrating a pretrained predictor on measured sections (numpy only): its scale mapped onto
``log1p(counts / library size * 1e4)``, an optional per-gene adaptation, each gene's reliability and split-conformal
intervals, all from predictions of sections that the maps applied to them were not fitted on."""

from __future__ import annotations

import numpy as np
import pandas as pd

from st_predict._utils import InputError

from ._reliability import conformal_quantile, reliability_table

#: ways :meth:`~st_predict.Pretrained.adapt` fits per gene: ``"affine"`` (``a_g + b_g * p``), ``"shift"`` (``a_g + p``)
ADAPT_METHODS = ("affine", "shift")


def section_weights(libraries: np.ndarray) -> np.ndarray:
    """Each section weighs the same and each spot the same within its section (as NH2ST's calibration): sum 1."""
    libraries = np.asarray(libraries)
    sections, inverse, counts = np.unique(libraries, return_inverse=True, return_counts=True)
    w = 1.0 / (len(sections) * counts[inverse])
    return w / w.sum()


def _moments(x: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    mean = float((w[:, None] * x).sum() / x.shape[1])
    var = float((w[:, None] * (x - mean) ** 2).sum() / x.shape[1])
    return mean, float(np.sqrt(var))


def fit_map(pred: np.ndarray, truth: np.ndarray, weights: np.ndarray, adapt: str | None) -> dict:
    """The maps from a predictor's outputs ``(n, G)`` onto the measured ``truth`` ``(n, G)``:

    - ``scale`` ``(a, b)``: one affine map for all genes, ``a + b * pred``, that gives the predictions the mean and
      spread of the measured values over all spots and genes (``b > 0``: the order of the predictions and every
      PCC stay as they are);
    - with ``adapt``, per gene ``(a_g, b_g)`` on the scaled predictions, by weighted least squares (``"affine"``)
      or a shift alone (``"shift"``, ``b_g = 1``).
    """
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    p, y = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    p_mean, p_sd = _moments(p, w)
    y_mean, y_sd = _moments(y, w)
    b = y_sd / p_sd if p_sd > 1e-12 else 1.0
    out = {"scale": (y_mean - b * p_mean, b), "adapt": None}
    if adapt is None:
        return out
    if adapt not in ADAPT_METHODS:
        raise InputError(f"adapt method must be one of {ADAPT_METHODS}, got {adapt!r}.")
    s = out["scale"][0] + out["scale"][1] * p
    ws = w[:, None]
    s_mean, y_mean_g = (ws * s).sum(0), (ws * y).sum(0)
    if adapt == "shift":
        slope = np.ones(p.shape[1])
    else:
        cov = (ws * (s - s_mean) * (y - y_mean_g)).sum(0)
        var = (ws * (s - s_mean) ** 2).sum(0)
        slope = np.where(var > 1e-12, cov / np.maximum(var, 1e-12), 0.0)
    out["adapt"] = (y_mean_g - slope * s_mean, slope)
    return out


def apply_map(params: dict, pred: np.ndarray) -> np.ndarray:
    """:func:`fit_map`'s maps applied to a predictor's outputs."""
    a, b = params["scale"]
    out = a + b * np.asarray(pred, np.float64)
    if params.get("adapt") is not None:
        a_g, b_g = (np.asarray(v, np.float64) for v in params["adapt"])
        out = a_g[None, :] + b_g[None, :] * out
    return out.astype(np.float32)


def cross_fitted(pred: np.ndarray, truth: np.ndarray, libraries: np.ndarray, adapt: str | None) -> np.ndarray:
    """Each calibration section's predictions mapped by maps fitted on the other sections (all of them when there
    is one section: then the scale map alone, its two numbers fitted on the section itself)."""
    libraries = np.asarray(libraries)
    sections = list(pd.unique(libraries))
    if len(sections) == 1:
        if adapt is not None:
            raise InputError("adapt needs at least two measured sections: its per-gene maps are scored on sections "
                             "they were not fitted on. Calibrate on one section, or give more.")
        return apply_map(fit_map(pred, truth, section_weights(libraries), None), pred)
    out = np.empty(pred.shape, np.float32)
    for s in sections:
        held = libraries == s
        params = fit_map(pred[~held], truth[~held], section_weights(libraries[~held]), adapt)
        out[held] = apply_map(params, pred[held])
    return out


def calibration(pred: np.ndarray, truth: np.ndarray, libraries: np.ndarray, genes, adapt: str | None) -> dict:
    """Everything :meth:`~st_predict.Pretrained.calibrate` keeps: the maps fitted on all calibration sections
    (``params``), the out-of-section predictions (``oof``), each gene's reliability from them, and the conformal
    scores (``|measured - oof|``) with their section weights."""
    libraries = np.asarray(libraries).astype(str)
    pred, truth = np.asarray(pred, np.float32), np.asarray(truth, np.float32)
    if not np.isfinite(pred).all():
        bad = int((~np.isfinite(pred)).any(1).sum())
        raise InputError(f"The predictor gave NaN or infinite values for {bad} calibration spots.")
    oof = cross_fitted(pred, truth, libraries, adapt)
    weights = section_weights(libraries)
    return {
        "params": fit_map(pred, truth, weights, adapt),
        "oof": oof,
        "reliability": reliability_table(oof, truth, libraries, genes),
        "scores": np.abs(truth - oof).astype(np.float32),
        "weights": weights,
        "sections": list(pd.unique(libraries)),
        "n_spots": int(len(libraries)),
        "adapt": adapt,
    }


def interval_half_width(cal: dict, level: float) -> np.ndarray:
    """Per gene: the section-weighted split-conformal quantile of the absolute residuals at ``level``."""
    return conformal_quantile(cal["scores"], cal["weights"], level)
