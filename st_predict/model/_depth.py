"""The counts model behind the intervals for a measurement: what a ``log1p(counts / library * 1e4)`` value
measured at a given depth (UMI per spot) scatters by, given the expected expression.

The UMIs a spot yields of a gene, given its expected share ``r`` of the library, are Poisson with mean
``depth * r`` (multinomial sampling of the library). On the model's scale a measurement is
``log1p(1e4 * K / depth)``: at a low depth it is mostly 0 for a low-expressed gene, and its mean falls below the
expected ``log1p(1e4 * r)``. This module gives that mean and variance (exactly, by summing the Poisson law, up to
100 expected UMIs; by a second-order expansion above), binomial thinning of counts to a lower depth, and the grid
of depths at which the calibration sections are thinned."""

from __future__ import annotations

import functools

import numpy as np

from st_predict._utils import InputError

TARGET_SUM = 1e4
#: expected expression grid (log1p counts per 10k) and depth grid (log10 UMI per spot) of the moment table
_MU = np.linspace(0.0, 10.0, 501)
_LOG_DEPTH = np.linspace(1.0, 7.0, 121)
#: expected UMIs up to which the Poisson law is summed exactly
_EXACT_UP_TO = 100.0
#: the calibration sections are also thinned to their depth times these fractions (1 to 1/64 of it)
THINNING_FRACTIONS = tuple(2.0 ** -k for k in range(7))


@functools.lru_cache(maxsize=1)
def _moment_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, var, slope)`` of ``log1p(1e4 K / D)``, ``K ~ Poisson(D expm1(mu) / 1e4)``, on the grid
    ``_MU x _LOG_DEPTH``; ``slope`` is d mean / d mu."""
    from scipy.stats import poisson

    mu, logd = np.meshgrid(_MU, _LOG_DEPTH, indexing="ij")
    depth = 10.0**logd
    lam = depth * np.expm1(mu) / TARGET_SUM
    c = TARGET_SUM / depth
    # second-order expansion of f(K) = log1p(c K) around lam (Poisson: Var K = lam, E (K - lam)^4 ~ 3 lam^2)
    d1 = c / (1 + c * lam)
    d2 = -(d1**2)
    mean = np.log1p(c * lam) + 0.5 * d2 * lam
    var = d1**2 * lam + 0.5 * d2**2 * lam**2
    exact = lam <= _EXACT_UP_TO
    k = np.arange(int(_EXACT_UP_TO + 12 * np.sqrt(_EXACT_UP_TO) + 20))
    lam_e, c_e = lam[exact], c[exact]
    for chunk in np.array_split(np.arange(len(lam_e)), max(1, len(lam_e) // 4000)):
        pmf = poisson.pmf(k[None, :], lam_e[chunk, None])
        y = np.log1p(c_e[chunk, None] * k[None, :])
        m = (pmf * y).sum(1)
        idx = np.flatnonzero(exact)[chunk]
        mean.flat[idx] = m
        var.flat[idx] = np.maximum((pmf * y**2).sum(1) - m**2, 0.0)
    slope = np.gradient(mean, _MU, axis=0)
    return mean, var, np.maximum(slope, 0.0)


def _interp(table: np.ndarray, mu: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of a ``_MU x _LOG_DEPTH`` table at ``mu`` and ``depth`` (broadcast)."""
    mu, depth = np.broadcast_arrays(np.asarray(mu, np.float64), np.asarray(depth, np.float64))
    fm = np.clip((mu - _MU[0]) / (_MU[1] - _MU[0]), 0, len(_MU) - 1.000001)
    fd = np.clip((np.log10(np.maximum(depth, 1e-9)) - _LOG_DEPTH[0]) / (_LOG_DEPTH[1] - _LOG_DEPTH[0]), 0,
                 len(_LOG_DEPTH) - 1.000001)
    i, j = fm.astype(np.int64), fd.astype(np.int64)
    a, b = fm - i, fd - j
    return ((1 - a) * (1 - b) * table[i, j] + a * (1 - b) * table[i + 1, j] + (1 - a) * b * table[i, j + 1]
            + a * b * table[i + 1, j + 1])


def measured_moments(mu, depth) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, variance and d mean / d mu of a measurement ``log1p(1e4 K / depth)`` whose expected expression is
    ``mu`` (``log1p`` of the expected counts per 10k), under Poisson sampling of ``depth`` UMIs. Broadcasts."""
    mean, var, slope = _moment_table()
    return _interp(mean, mu, depth), _interp(var, mu, depth), _interp(slope, mu, depth)


def expected_from_measured(mean_measured, depth: float) -> np.ndarray:
    """The expected expression ``mu`` whose measurement at ``depth`` has mean ``mean_measured`` (the inverse of
    the mean of :func:`measured_moments`; a network trained on measurements at ``depth`` predicts that mean)."""
    curve = measured_moments(_MU, float(depth))[0]
    curve = np.maximum.accumulate(curve)  # monotone, for the inverse
    return np.interp(np.asarray(mean_measured, np.float64), curve, _MU)


def thin_counts(counts, fraction: float, seed: int = 0):
    """Binomial thinning: each UMI of ``counts`` (a spots x genes count matrix, dense or sparse) is kept with
    probability ``fraction``, as sequencing ``fraction`` as deep would. Returns a CSR matrix; ``counts`` is not
    changed."""
    import scipy.sparse as sp

    if not 0 < fraction <= 1:
        raise InputError(f"fraction must be in (0, 1], got {fraction!r}.")
    x = sp.csr_matrix(counts, dtype=np.float64, copy=True)
    data = np.rint(x.data)
    if np.any(np.abs(x.data - data) > 1e-6) or np.any(data < 0):
        raise InputError("thin_counts needs non-negative integer counts.")
    x.data = np.random.default_rng(seed).binomial(data.astype(np.int64), fraction).astype(np.float64)
    x.eliminate_zeros()
    return x


def check_depth(depth, name: str = "interval_depth") -> float:
    """``depth`` as a positive float (UMI per spot), or an error naming ``name``."""
    if isinstance(depth, bool) or not isinstance(depth, int | float | np.integer | np.floating) or not np.isfinite(depth) \
            or depth <= 0:
        raise InputError(f"{name} must be a positive number of UMI per spot, got {depth!r}.")
    return float(depth)


def quantile_at_depth(depths: np.ndarray, quantiles: np.ndarray, depth) -> np.ndarray:
    """Per-gene quantiles ``quantiles`` ``(n_depths, G)`` calibrated at ``depths`` (descending), interpolated in
    log depth at ``depth`` (a scalar: ``(G,)``; per spot ``(n,)``: ``(n, G)``); clamped to the grid's ends."""
    depths = np.asarray(depths, np.float64)
    order = np.argsort(depths)
    x, q = np.log(depths[order]), np.asarray(quantiles, np.float64)[order]
    d = np.log(np.atleast_1d(np.asarray(depth, np.float64)))
    pos = np.clip(np.interp(d, x, np.arange(len(x))), 0, len(x) - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, len(x) - 1)
    w = (pos - lo)[:, None]
    out = (1 - w) * q[lo] + w * q[hi]
    return out[0] if np.ndim(depth) == 0 else out
