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


def check_expression(matrix, where: str, is_count_data: bool = True) -> None:
    """Raise a ``ValueError`` naming ``where`` if ``matrix`` holds NaN/inf, or, for counts, negative
    or non-integer values."""
    data = matrix.data if sparse.issparse(matrix) else np.asarray(matrix)
    if data.size == 0:
        return
    if not np.issubdtype(data.dtype, np.number):
        raise InputError(f"{where} has non-numeric dtype {data.dtype}.")
    n_bad = int((~np.isfinite(data)).sum()) if np.issubdtype(data.dtype, np.floating) else 0
    if n_bad:
        raise InputError(f"{where} holds {n_bad} NaN or infinite values; expression must be finite.")
    if is_count_data:
        n_neg = int((data < -COUNT_TOLERANCE).sum())
        if n_neg:
            raise InputError(
                f"{where} holds {n_neg} negative values, but counts were expected (is_count_data=True)."
            )
        if np.issubdtype(data.dtype, np.floating):
            off = np.abs(data - np.round(data))
            n_frac = int((off > COUNT_TOLERANCE).sum())
            if n_frac:
                raise InputError(
                    f"{where} holds {n_frac} non-integer values, but raw counts were expected. If it is "
                    "already log-normalised, pass is_count_data=False to setup_anndata."
                )
            n_noise = int((off > 0).sum())
            if n_noise:
                logger.info(
                    "%s holds %d counts with rounding noise (at most %.2g from a whole number): they are "
                    "used rounded.", where, n_noise, float(off.max()),
                )


def check_sections_have_counts(matrix, libraries, where: str) -> None:
    """Raise a ``ValueError`` naming the sections whose expression is all zero (nothing to learn or
    normalise: an empty or misread section)."""
    x = _as_csr(matrix)
    libraries = np.asarray(libraries).astype(str)
    totals = {lib: float(np.abs(x[libraries == lib]).sum()) for lib in np.unique(libraries)}
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
    if not is_count_data:
        return np.asarray(_as_csr(counts)[:, gene_idx].toarray(), dtype=np.float32)
    x = _counts_csr(counts)
    sub = x[:, gene_idx]
    if library_size == "all_genes":
        lib = np.asarray(x.sum(1)).ravel()
    elif library_size == "selected_genes":
        lib = np.asarray(sub.sum(1)).ravel()
    else:
        raise InputError(f"library_size must be 'all_genes' or 'selected_genes', got {library_size!r}.")
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    dense = sub.toarray() * scale[:, None]
    return np.log1p(dense).astype(np.float32)


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
    x = _counts_csr(counts) if is_count_data else _as_csr(counts)
    libraries = np.asarray(libraries).astype(str)
    present = np.ones(x.shape[1], dtype=bool)
    for lib in np.unique(libraries):
        present &= np.asarray((x[libraries == lib] > 0).sum(0)).ravel() > 0
    if not present.any():
        raise InputError("No gene is detected in every section; cannot choose genes.")
    candidates = np.flatnonzero(present)
    norm = normalize_expression(x, candidates, is_count_data=is_count_data)
    means = norm.mean(0)
    order = candidates[np.argsort(-means, kind="stable")]
    if len(order) < n_top:
        from st_predict._utils import user_stacklevel

        warnings.warn(f"n_genes={n_top} asks for more genes than the {len(order):,} detected in every section (of "
                      f"{len(var_names):,} in var_names): the model predicts those {len(order):,}.", UserWarning,
                      stacklevel=user_stacklevel())
    return var_names[order[:n_top]].tolist()
