"""Gene selection and expression normalisation."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import sparse

from st_predict._utils import InputError

logger = logging.getLogger(__name__)


def _as_csr(x):
    return x.tocsr() if sparse.issparse(x) else sparse.csr_matrix(np.asarray(x))


#: Float counts within this of a whole number (and no more negative than minus this) are counts with
#: rounding noise (e.g. written by a tool that stores counts as float32 after arithmetic).
COUNT_TOLERANCE = 1e-3


def _counts_csr(x) -> sparse.csr_matrix:
    """A float64 CSR copy of counts, rounded to whole numbers (rounding noise removed; the caller's
    matrix is untouched)."""
    out = _as_csr(x).astype(np.float64)  # astype copies
    if out.data.size:
        np.rint(out.data, out=out.data)
        np.maximum(out.data, 0, out=out.data)
        out.eliminate_zeros()
    return out


def _row_blocks(n: int, width: int, budget: int = 1 << 22):
    """Slices of rows of an ``n x width`` matrix, about ``budget`` entries each: what the checks and the gene
    statistics hold at a time, so their memory does not grow with the number of spots (Visium HD's 10^5-10^6
    bins) beyond the matrix itself."""
    step = max(1, budget // max(1, int(width)))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def check_expression(matrix, where: str, is_count_data: bool = True) -> None:
    """Raise a ``ValueError`` naming ``where`` if ``matrix`` holds NaN/inf, or, for counts, negative
    or non-integer values. Reads the values a block at a time (no copy of the whole matrix)."""
    data = matrix.data if sparse.issparse(matrix) else np.asarray(matrix)
    if data.size == 0:
        return
    if not np.issubdtype(data.dtype, np.number):
        raise InputError(f"{where} has non-numeric dtype {data.dtype}.")
    flat = data.reshape(-1) if data.flags.c_contiguous or data.ndim == 1 else None
    blocks = ([flat[b] for b in _row_blocks(flat.size, 1)] if flat is not None
              else [data[b] for b in _row_blocks(data.shape[0], data.shape[1] if data.ndim > 1 else 1)])
    floating = np.issubdtype(data.dtype, np.floating)
    n_bad = n_neg = n_frac = n_noise = 0
    worst = 0.0
    for block in blocks:
        if floating:
            n_bad += int((~np.isfinite(block)).sum())
        if is_count_data and not n_bad:
            n_neg += int((block < -COUNT_TOLERANCE).sum())
            if floating:
                off = np.abs(block - np.round(block))
                n_frac += int((off > COUNT_TOLERANCE).sum())
                n_noise += int((off > 0).sum())
                worst = max(worst, float(off.max(initial=0.0)))
    if n_bad:
        raise InputError(f"{where} holds {n_bad} NaN or infinite values; expression must be finite.")
    if n_neg:
        raise InputError(f"{where} holds {n_neg} negative values, but counts were expected (is_count_data=True).")
    if n_frac:
        raise InputError(
            f"{where} holds {n_frac} non-integer values, but raw counts were expected. If it is "
            "already log-normalised, pass is_count_data=False to setup_anndata."
        )
    if n_noise:
        logger.info(
            "%s holds %d counts with rounding noise (at most %.2g from a whole number): they are used rounded.",
            where, n_noise, worst,
        )


def check_sections_have_counts(matrix, libraries, where: str) -> None:
    """Raise a ``ValueError`` naming the sections whose expression is all zero (nothing to learn or
    normalise: an empty or misread section)."""
    libraries = np.asarray(libraries).astype(str)
    totals = dict.fromkeys(np.unique(libraries), 0.0)
    for rows in _row_blocks(matrix.shape[0], matrix.shape[1]):
        x, libs = _as_csr(matrix[rows]), libraries[rows]
        for lib in np.unique(libs):
            totals[lib] += float(np.abs(x[libs == lib]).sum())
    empty = [lib for lib, total in totals.items() if total == 0]
    if empty:
        raise InputError(
            f"{where} is all zero in section(s) {', '.join(repr(str(lib)) for lib in empty)}: drop them, or check that "
            "their expression was read."
        )


def normalize_expression(
    counts, gene_idx: np.ndarray, is_count_data: bool = True, library_size: str = "all_genes",
    target_sum: float = 1e4,
) -> np.ndarray:
    """Dense float32 ``(n_obs, len(gene_idx))`` model targets.

    With counts: ``log1p(counts / library size * target_sum)``, library size summed over all genes
    (``library_size="all_genes"``, scanpy's ``normalize_total``) or over the selected genes only
    (``"selected_genes"``, the authors' code). Without counts: the selected columns as they are.
    Spots with a library size of 0 get 0.
    """
    if library_size not in ("all_genes", "selected_genes"):
        raise InputError(f"library_size must be 'all_genes' or 'selected_genes', got {library_size!r}.")
    gene_idx = np.asarray(gene_idx)
    n = counts.shape[0]
    out = np.empty((n, len(gene_idx)), np.float32)
    for rows in _row_blocks(n, counts.shape[1]):  # a block at a time: the result is the only full-size array
        if not is_count_data:
            out[rows] = _as_csr(counts[rows])[:, gene_idx].toarray()
            continue
        x = _counts_csr(counts[rows])
        sub = x[:, gene_idx]
        lib = np.asarray((x if library_size == "all_genes" else sub).sum(1)).ravel()
        scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
        out[rows] = np.log1p(sub.toarray() * scale[:, None])
    return out


_ENSEMBL = r"^ENS[A-Z]*G\d{6,}"


def absent_genes_hint(missing: Sequence[str], var_names, var: pd.DataFrame | None = None) -> str:
    """What a "genes are not in adata.var_names" error adds: the names ``var_names`` has in another case
    ("did you mean ERBB2?"), or, where ``var_names`` are Ensembl IDs and the genes are not, how to map them (naming
    the ``var`` column that holds the symbols, if one does). Empty when there is nothing to suggest."""
    names = pd.Index(np.asarray(var_names).astype(str))
    by_lower: dict[str, str] = {}
    for n in names:
        by_lower.setdefault(n.lower(), n)
    found = [by_lower[g.lower()] for g in map(str, missing) if g.lower() in by_lower]
    hint = ""
    if found:
        hint += f" Did you mean {', '.join(found[:10])}{' ...' if len(found) > 10 else ''}? (gene names are case-sensitive)"
    missing_ens = pd.Index([str(g) for g in missing]).str.match(_ENSEMBL)
    if len(names) and names.str.match(_ENSEMBL).mean() > 0.5 and not missing_ens.all():
        col = None
        if var is not None:
            for c in var.columns:
                values = var[c].astype(str)
                if values.isin([str(g) for g in missing]).any():
                    col = c
                    break
        how = (f"adata.var[{col!r}] holds the symbols: adata.var_names = adata.var[{col!r}].astype(str), then "
               "adata.var_names_make_unique()" if col is not None else
               "set adata.var_names to a column of gene symbols (then adata.var_names_make_unique())")
        hint += (f" adata.var_names look like Ensembl IDs (e.g. {names[0]!r}) and these genes are symbols: {how}.")
    return hint


def select_genes(
    counts,
    var_names: Sequence[str],
    libraries: Sequence[str],
    n_top: int = 250,
    genes: Sequence[str] | None = None,
    is_count_data: bool = True,
) -> list[str]:
    """The model's genes.

    ``genes`` given: checked to exist (a ``ValueError`` lists the absent ones) and returned in that
    order. Otherwise the ``n_top`` genes with the highest mean normalised expression
    (``log1p`` of counts per 10k) among the genes detected (count > 0) in every section. With fewer
    such genes than ``n_top``, all of them are used, with a warning that gives both numbers.
    """
    var_names = pd.Index(np.asarray(var_names).astype(str))
    if genes is not None:
        genes = [str(g) for g in genes]
        missing = [g for g in genes if g not in var_names]
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise InputError(f"{len(missing)} requested genes are not in adata.var_names: {shown}."
                             + absent_genes_hint(missing, var_names))
        if len(set(genes)) != len(genes):
            raise InputError("The gene list has duplicates.")
        return genes
    if n_top < 1:
        raise InputError(f"n_genes must be >= 1, got {n_top}.")
    libraries = np.asarray(libraries).astype(str)
    n, n_vars = counts.shape
    sections = np.unique(libraries)
    detected = np.zeros((len(sections), n_vars), dtype=bool)
    blocks = _row_blocks(n, n_vars)
    for rows in blocks:  # a block of spots at a time (no copy of the whole matrix)
        x, libs = (_counts_csr if is_count_data else _as_csr)(counts[rows]), libraries[rows]
        for k, lib in enumerate(sections):
            if (libs == lib).any():
                detected[k] |= np.asarray((x[libs == lib] > 0).sum(0)).ravel() > 0
    present = detected.all(0)
    if not present.any():
        raise InputError("No gene is detected in every section; cannot choose genes.")
    candidates = np.flatnonzero(present)
    total = np.zeros(len(candidates))
    for rows in blocks:
        total += normalize_expression(counts[rows], candidates, is_count_data=is_count_data).sum(0, dtype=np.float64)
    means = (total / n).astype(np.float32)
    order = candidates[np.argsort(-means, kind="stable")]
    if len(order) < n_top:
        from st_predict._utils import user_stacklevel

        warnings.warn(f"n_genes={n_top} asks for more genes than the {len(order):,} detected in every section (of "
                      f"{len(var_names):,} in var_names): the model predicts those {len(order):,}.", UserWarning,
                      stacklevel=user_stacklevel())
    return var_names[order[:n_top]].tolist()
