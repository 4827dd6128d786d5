"""Evaluation metrics for predicted expression: per-gene PCC, MSE, MAE, and labelled optimistic variants.

The honest number is :func:`evaluate`'s ``pcc``: Pearson correlation of each gene across the spots of
one section, averaged over all genes (genes constant in the section give NaN, are excluded from the
mean and counted). Papers in this field often report two inflated variants, offered here with their
names saying so:

``pcc_top50`` (optimistic)
    the mean PCC of the 50 genes that correlate best *in the evaluated section*, i.e. genes picked
    after seeing the test results;
:func:`pooled_pcc` (optimistic)
    the per-gene PCC over the spots of several sections concatenated, which rewards getting the
    differences *between* sections right (batch effects, tissue composition) rather than the spatial
    pattern within each section.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from st_predict._utils import PREDICTED_KEY, InputError, InputTypeError, InputWarning, MissingKeyError, warn


def _as_array(x) -> np.ndarray:
    return x.to_numpy(dtype=np.float64) if isinstance(x, pd.DataFrame) else np.asarray(x, dtype=np.float64)


def pcc_per_gene(pred, truth) -> np.ndarray:
    """Pearson correlation of each gene (column) across spots (rows). NaN where either side is
    constant (e.g. a gene never detected in the section)."""
    p, t = _as_array(pred), _as_array(truth)
    if p.shape != t.shape:
        raise InputError(f"pred {p.shape} and truth {t.shape} differ in shape.")
    pc, tc = p - p.mean(0), t - t.mean(0)
    denom = np.sqrt((pc**2).sum(0) * (tc**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (pc * tc).sum(0) / denom
    # constant where all values are equal: then the centred values are rounding noise, not a signal (the mean of n
    # equal floats need not equal them), and that noise must not give a correlation
    constant = (p.max(0) == p.min(0)) | (t.max(0) == t.min(0)) if len(p) else np.ones(p.shape[1], bool)
    r[~(denom > 0) | constant] = np.nan
    return r


def top_k_pcc(pred, truth, k: int = 50) -> float:
    """**Optimistic**: mean PCC of the ``k`` genes with the highest PCC in this very section (genes
    chosen after seeing the results). NaN genes are never among them. Reported by several papers;
    use :func:`evaluate`'s ``pcc`` for an honest number."""
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}.")
    return _mean_of_best(pcc_per_gene(pred, truth), k)


def _mean_of_best(r: np.ndarray, k: int | None = None) -> float:
    """Mean of the ``k`` largest non-NaN values of ``r`` (all of them for ``k=None``); NaN if none."""
    valid = np.sort(r[~np.isnan(r)])[::-1]
    return float(valid[:k].mean()) if len(valid) else float("nan")


def pooled_pcc(preds: Sequence[pd.DataFrame], truths: Sequence[pd.DataFrame]) -> float:
    """**Optimistic**: mean over genes of the PCC computed over the spots of several sections
    concatenated (only the genes present in every ``pred`` and ``truth``).

    Between-section differences (library depth, tissue composition) inflate it; the honest summary is
    the mean over sections of each section's :func:`evaluate` ``pcc``.

    Parameters
    ----------
    preds, truths
        One spots x genes DataFrame per section, with gene names as columns.
    """
    if len(preds) != len(truths) or not preds:
        raise InputError(f"Give one truth per prediction (got {len(preds)} predictions, {len(truths)} truths).")
    genes = None
    for df in [*preds, *truths]:
        if not isinstance(df, pd.DataFrame):
            raise InputTypeError("pooled_pcc needs DataFrames with gene names as columns.")
        cols = pd.Index(df.columns)
        genes = cols if genes is None else genes.intersection(cols, sort=False)
    if len(genes) == 0:
        raise InputError("No gene is shared by every section's predictions and truths.")
    for i, (p, t) in enumerate(zip(preds, truths, strict=True)):
        if p.shape[0] != t.shape[0]:
            raise InputError(f"Section {i}: {p.shape[0]} predicted spots but {t.shape[0]} measured spots.")
    p = np.concatenate([_as_array(df[genes]) for df in preds])
    t = np.concatenate([_as_array(df[genes]) for df in truths])
    return _mean_of_best(pcc_per_gene(p, t))


def evaluate(
    pred,
    truth=None,
    top_k: int = 50,
    *,
    key: str = PREDICTED_KEY,
    layer: str | None = None,
    is_count_data: bool = True,
    library_key: str | None = None,
) -> dict[str, float] | pd.DataFrame:
    """Metrics of one section: ``evaluate(pred, truth)``, or straight from an AnnData,
    ``evaluate(adata, key="nh2st")``.

    Returns ``pcc`` (mean over genes of the per-gene PCC; NaN genes are left out of the mean and
    counted in ``n_nan_genes``), ``mse`` and ``mae`` over spots x genes, ``n_genes``, ``n_spots``, and
    the **optimistic** ``pcc_top50`` (:func:`top_k_pcc` with ``k = top_k``; the key keeps its name
    for other ``top_k``), labelled as such wherever st_predict reports it. From an AnnData also
    ``trained_on``: whether its spots include a section the model trained on, as
    :meth:`~st_predict.NH2ST.predict` recorded (an :class:`~st_predict.InputWarning` says so).

    Parameters
    ----------
    pred
        Predictions (spots x genes array or DataFrame), or an AnnData whose ``obsm[key]`` holds them
        (as :meth:`~st_predict.NH2ST.predict` writes) and whose ``X`` (or ``layers[layer]``) holds the
        measured expression.
    truth
        Measured expression on the predictions' scale (``log1p`` counts per 10k), same shape. Not
        given with an AnnData: taken from it and normalised as the model's targets are
        (:func:`~st_predict.pp.normalize_expression`; ``is_count_data=False`` if it is already).
    top_k
        Genes in the optimistic ``pcc_top50``.
    key
        AnnData input: the ``obsm`` key of the predictions (a spots x genes DataFrame, as
        :meth:`~st_predict.NH2ST.predict` writes it; default ``"nh2st"``).
    layer
        AnnData input: the layer holding the measured expression (default ``X``).
    is_count_data
        AnnData input: ``True`` when the measured expression is raw counts, normalised here as the
        model's targets are; ``False`` when it is already on the predictions' scale.
    library_key
        AnnData input: an ``obs`` column of sections. The result is then a DataFrame with a row per
        section (per-section PCC is the honest number; one PCC over several sections is not) and a
        ``trained_on`` column from what :meth:`~st_predict.NH2ST.predict` recorded.
    """
    from anndata import AnnData

    if isinstance(pred, AnnData):
        if truth is not None:
            raise TypeError("evaluate(adata, ...) takes the measured expression from adata: do not pass truth.")
        return _evaluate_anndata(pred, key, layer, is_count_data, library_key, top_k)
    if truth is None:
        raise TypeError("evaluate(pred, truth): pass the measured expression, or an AnnData as the first argument.")
    p, t = _as_array(pred), _as_array(truth)
    if p.shape != t.shape:
        raise InputError(f"Predictions {p.shape} and measured expression {t.shape} differ in shape.")
    r = pcc_per_gene(p, t)
    n_nan = int(np.isnan(r).sum())
    return {
        "pcc": _mean_of_best(r),
        "mse": float(((p - t) ** 2).mean()),
        "mae": float(np.abs(p - t).mean()),
        "n_nan_genes": n_nan,
        "n_genes": int(p.shape[1]),
        "n_spots": int(p.shape[0]),
        "pcc_top50": _mean_of_best(r, top_k),
    }


def measured_expression(adata, genes: Sequence[str], layer: str | None = None, is_count_data: bool = True) -> pd.DataFrame:
    """The measured expression of ``genes`` in ``adata`` (``X`` or ``layers[layer]``) on the model's
    scale (:func:`~st_predict.pp.normalize_expression`: ``log1p`` counts per 10k, or as it is with
    ``is_count_data=False``), as a spots x genes DataFrame to score predictions against."""
    from st_predict.pp import absent_genes_hint, check_expression, normalize_expression

    if adata.n_vars == 0:
        raise InputError("The AnnData has no measured expression (n_vars == 0) to evaluate against.")
    genes = [str(g) for g in genes]
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise MissingKeyError(f"{len(missing)} predicted genes are not in adata.var_names, e.g. {missing[:5]}."
                              + absent_genes_hint(missing, adata.var_names, adata.var))
    if layer is not None and layer not in adata.layers:
        raise MissingKeyError(f"adata.layers has no {layer!r} (it has: {list(adata.layers)}).")
    matrix = adata.layers[layer] if layer is not None else adata.X
    # the same refusal as training: NaN, infinite, negative or (for counts) non-integer values
    check_expression(matrix, f"adata.layers[{layer!r}]" if layer is not None else "adata.X", is_count_data)
    values = normalize_expression(matrix, adata.var_names.get_indexer(genes), is_count_data=is_count_data)
    return pd.DataFrame(values, index=adata.obs_names, columns=genes)


def _evaluate_anndata(adata, key, layer, is_count_data, library_key, top_k):
    if key not in adata.obsm:
        raise MissingKeyError(f"adata.obsm has no predictions {key!r} (it has: {list(adata.obsm)}); run model.predict first.")
    pred = adata.obsm[key]
    if not isinstance(pred, pd.DataFrame):
        raise InputTypeError(f"adata.obsm[{key!r}] must be a spots x genes DataFrame (as model.predict writes it).")
    truth = measured_expression(adata, pred.columns, layer, is_count_data)
    meta = adata.uns.get("st_predict", {})
    entry = meta.get(key, {}) if isinstance(meta, Mapping) else {}
    trained = {str(s) for s in (entry.get("training_sections", []) if isinstance(entry, Mapping) else [])}
    if library_key is None:
        scores = evaluate(pred, truth, top_k)
        # the sections of these spots, by the column predict read them from (or the one section of uns["spatial"])
        column = entry.get("library_key") if isinstance(entry, Mapping) else None
        if column and column in adata.obs:
            sections = set(adata.obs[column].astype(str))
        else:
            spatial = adata.uns.get("spatial")
            sections = {str(next(iter(spatial)))} if isinstance(spatial, Mapping) and len(spatial) == 1 else set()
        seen = sorted(sections & trained)
        scores["trained_on"] = bool(seen)
        if seen:
            warn(f"adata holds spots of the model's training section(s) {', '.join(seen)}: this score is not "
                 "held out. Pass library_key= for one row per section, marked trained_on.", InputWarning)
        return scores
    if library_key not in adata.obs:
        raise MissingKeyError(f"{library_key!r} is not a column of adata.obs.")
    sections = adata.obs[library_key].astype(str).to_numpy()
    rows = {}
    for sec in pd.unique(sections):
        m = sections == sec
        rows[sec] = {**evaluate(pred.to_numpy()[m], truth.to_numpy()[m], top_k), "trained_on": sec in trained}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(library_key)
