"""Plots of which predictions to trust: genes ranked by reliability, reliability against the PCC achieved on a
held-out section, and a predicted map beside the width of its intervals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from st_predict._utils import PREDICTED_KEY, InputError, InputTypeError, MissingKeyError

from ._metrics_plots import _new_ax


def _reliability_table(source) -> pd.DataFrame:
    """The per-gene reliability table of a model trained with ``reliability=True``, of predictions
    (``adata.uns["st_predict"][key]["gene_reliability"]``, key ``"nh2st"``), or the table itself."""
    if isinstance(source, pd.DataFrame):
        table = source
    elif isinstance(source, ad.AnnData):
        meta = source.uns.get("st_predict", {})
        entry = meta.get(PREDICTED_KEY, {}) if isinstance(meta, Mapping) else {}
        table = entry.get("gene_reliability") if isinstance(entry, Mapping) else None
        if table is None:
            raise MissingKeyError(f"adata.uns['st_predict'][{PREDICTED_KEY!r}] has no 'gene_reliability': predict with "
                                  "a model trained with reliability=True.")
    elif hasattr(source, "gene_reliability_"):
        table = source.gene_reliability_
        if table is None:
            raise InputError("The model has no gene reliability: train it with reliability=True.")
    else:
        raise InputTypeError(f"Expected a model, an AnnData of predictions or a reliability table, got "
                             f"{type(source).__name__}.")
    if "reliability" not in table:
        raise MissingKeyError("The reliability table has no 'reliability' column.")
    return table


def gene_reliability(source, n_genes: int | None = 40, ax=None, title: str | None = None, save: str | None = None):
    """Genes ranked by reliability (out-of-fold PCC, mean over held-out training sections), with their 95 %
    intervals; genes flagged unreliable (interval reaching 0) are grey crosses.

    ``source``: a model trained with ``reliability=True``, an AnnData it predicted, or the table. ``n_genes``: the
    most and least reliable, half each (``None``: all). Returns the Axes.
    """
    table = _reliability_table(source).sort_values("reliability", ascending=False)
    if n_genes is not None and len(table) > n_genes:
        table = pd.concat([table.iloc[: n_genes // 2], table.iloc[-(n_genes - n_genes // 2):]])
    ax = _new_ax(ax, (4.6, 0.2 * len(table) + 1.2))
    y = np.arange(len(table))[::-1]
    ok = table["reliable"].to_numpy(bool) if "reliable" in table else np.ones(len(table), bool)
    if {"ci_low", "ci_high"} <= set(table):
        ax.hlines(y, table["ci_low"], table["ci_high"], color=np.where(ok, "C0", "0.6"), lw=1)
    ax.scatter(table["reliability"][ok], y[ok], color="C0", zorder=3, s=16, label="reliable")
    ax.scatter(table["reliability"][~ok], y[~ok], color="0.5", marker="x", zorder=3, s=16,
               label="unreliable (interval reaches 0)")
    ax.axvline(0, color="k", lw=0.6)
    ax.set_yticks(y, table.index, fontsize="x-small")
    ax.set_xlabel("reliability: out-of-fold PCC (95 % interval over sections)")
    ax.legend(fontsize="x-small", loc="lower right")
    ax.set_title(title if title is not None else "Genes ranked by reliability")
    if save is not None:
        ax.figure.savefig(save, dpi=110, bbox_inches="tight")
    return ax


def reliability_vs_achieved(source, achieved: pd.Series | Mapping, ax=None, title: str | None = None,
                            save: str | None = None):
    """Each gene's predicted reliability against the PCC it achieved on a held-out section, with the identity
    line and their Spearman correlation in the title. ``achieved``: per-gene PCC (e.g.
    ``metrics.pcc_per_gene`` on the held-out spots) indexed by gene. Returns the Axes."""
    from scipy.stats import spearmanr

    table = _reliability_table(source)
    achieved = pd.Series(achieved, dtype=float)
    genes = [g for g in table.index if g in achieved.index]
    if not genes:
        raise MissingKeyError("No gene of the reliability table is in `achieved`.")
    x, y = table.loc[genes, "reliability"].to_numpy(float), achieved.loc[genes].to_numpy(float)
    keep = np.isfinite(x) & np.isfinite(y)
    rho = spearmanr(x[keep], y[keep]).statistic if keep.sum() > 2 else np.nan
    ax = _new_ax(ax, (4.2, 4.0))
    ok = table.loc[genes, "reliable"].to_numpy(bool) if "reliable" in table else np.ones(len(genes), bool)
    ax.scatter(x[ok], y[ok], s=10, color="C0", label="reliable")
    ax.scatter(x[~ok], y[~ok], s=10, color="0.5", marker="x", label="unreliable")
    lo = float(np.nanmin(np.r_[x, y, 0.0])) - 0.05
    hi = float(np.nanmax(np.r_[x, y])) + 0.05
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--", label="identity")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("predicted reliability (out-of-fold PCC)")
    ax.set_ylabel("PCC achieved on the held-out section")
    ax.legend(fontsize="x-small")
    ax.set_title(title if title is not None else f"Reliability vs achieved (Spearman {rho:.2f}, {keep.sum()} genes)")
    if save is not None:
        ax.figure.savefig(save, dpi=110, bbox_inches="tight")
    return ax


def interval_map(adata: ad.AnnData, genes: Sequence[str] | str, key: str = PREDICTED_KEY,
                 library_id: str | None = None, save: str | None = None, **kwargs):
    """The predicted map of each gene beside the width of its intervals (``obsm[f"{key}_upper"] -
    obsm[f"{key}_lower"]``) on the H&E, drawn by squidpy's ``spatial_scatter`` (``**kwargs`` go to it).
    Returns the figure."""
    import squidpy as sq

    from ._spatial import predictions_to_anndata

    genes = [genes] if isinstance(genes, str) else list(genes)
    lo, hi = adata.obsm.get(f"{key}_lower"), adata.obsm.get(f"{key}_upper")
    if lo is None or hi is None:
        raise MissingKeyError(f"adata.obsm has no {key + '_lower'!r} / {key + '_upper'!r}: predict with a model "
                              "trained with reliability=True.")
    base = predictions_to_anndata(adata, key, genes=genes)
    width = (hi[genes] - lo[genes]).to_numpy(np.float32)
    names = [f"{g} predicted" for g in genes] + [f"{g} interval width" for g in genes]
    plot = ad.AnnData(np.column_stack([base.X, width]), obs=base.obs, var=pd.DataFrame(index=names),
                      obsm={"spatial": base.obsm["spatial"]}, uns={"spatial": base.uns["spatial"]})
    if library_id is None:
        libs = list(plot.uns["spatial"])
        if len(libs) != 1:
            raise InputError(f"adata has {len(libs)} sections; pass library_id=.")
        library_id = libs[0]
    order = [n for g in genes for n in (f"{g} predicted", f"{g} interval width")]
    sq.pl.spatial_scatter(plot, color=order, library_id=library_id, ncols=2, **kwargs)
    import matplotlib.pyplot as plt

    fig = plt.gcf()
    if save is not None:
        fig.savefig(save, dpi=110, bbox_inches="tight")
    return fig
