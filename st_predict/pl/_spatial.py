"""Plots of predicted expression on the tissue: an AnnData for scanpy/squidpy, and predicted vs measured."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from st_predict._utils import PREDICTED_KEY, InputError, InputTypeError, MissingKeyError, downsample


def predictions_to_anndata(
    adata: ad.AnnData,
    key: str = PREDICTED_KEY,
    measured: pd.DataFrame | None = None,
    genes: Sequence[str] | None = None,
    image_key: str = "hires",
    max_image_side: int = 1500,
) -> ad.AnnData:
    """An AnnData whose ``X`` is the predicted expression in ``adata.obsm[key]`` (genes as
    ``var_names``), keeping ``obs``, ``obsm["spatial"]`` and a downsampled copy of each section's image
    as ``uns["spatial"][lib]["images"]["hires"]`` (with ``tissue_hires_scalef``, the key scanpy and
    squidpy look for by default), so any scanpy / squidpy plot takes predicted genes as ``color``. ``genes`` restricts it to those genes. With
    ``measured`` (spots x genes, same scale), the columns are ``"<gene> predicted"`` and
    ``"<gene> measured"``.
    """
    if key not in adata.obsm:
        raise MissingKeyError(f"adata.obsm[{key!r}] is missing: run model.predict(adata, key_added={key!r}) first.")
    pred = adata.obsm[key]
    if not isinstance(pred, pd.DataFrame):
        raise InputTypeError(f"adata.obsm[{key!r}] must be a DataFrame of predicted genes.")
    if genes is not None:
        missing = [g for g in genes if g not in pred.columns]
        if missing:
            raise MissingKeyError(f"Genes not predicted in adata.obsm[{key!r}]: {missing}")
        pred = pred[list(genes)]
    x, names = pred.to_numpy(np.float32), [str(g) for g in pred.columns]
    if measured is not None:
        missing = [g for g in pred.columns if g not in measured.columns]
        if missing:
            raise MissingKeyError(f"Genes absent from the measured table: {missing[:10]}")
        measured = measured.loc[adata.obs_names, pred.columns]
        x = np.concatenate([x, measured.to_numpy(np.float32)], axis=1)
        names = [f"{g} predicted" for g in names] + [f"{g} measured" for g in pred.columns]
    out = ad.AnnData(x, obs=adata.obs.copy(), var=pd.DataFrame(index=names))
    out.obsm["spatial"] = np.asarray(adata.obsm["spatial"])
    uns = {}
    for lib, entry in adata.uns.get("spatial", {}).items():
        img = entry.get("images", {}).get(image_key)
        sf = entry.get("scalefactors", {})
        new_sf = {k: v for k, v in sf.items() if k == "spot_diameter_fullres"}
        images = {}
        if img is not None:
            small, factor = downsample(img, max_image_side)
            images["hires"] = small
            new_sf["tissue_hires_scalef"] = sf.get(f"tissue_{image_key}_scalef", 1.0) * factor
        uns[lib] = {"images": images, "scalefactors": new_sf}
    out.uns["spatial"] = uns
    return out


def predicted_vs_measured(
    adata: ad.AnnData,
    genes: Sequence[str],
    measured: pd.DataFrame,
    key: str = PREDICTED_KEY,
    library_id: str | None = None,
    library_key: str | None = None,
    save: str | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    margin: float = 0.05,
    image_alpha: float = 0.5,
):
    """Predicted (top row) and measured (bottom row) expression of ``genes`` on the H&E of one section.

    Each gene has **one colour scale** for its two panels (from the lower to the higher of both sides'
    extremes, from 0 at the lowest: values below 0 do not exist on the ``log1p`` scale, and a prediction
    below 0 takes the lowest colour) and a colour bar labelled with the scale (``log1p`` counts per 10k). The
    H&E is drawn faded (``image_alpha``) and the spots with a thin white edge, so that the dark end of the
    colour map stands out against haematoxylin-purple tissue. The predicted panel's
    title gives the gene's Pearson correlation with the measured values across the spots. The view is
    cropped to the spots (plus ``margin`` of their extent). ``measured`` is a spots x genes DataFrame on
    the predictions' scale; ``title`` says, for example, how the genes were chosen. Returns the figure.
    """
    import matplotlib.pyplot as plt

    genes = list(genes)
    plot = predictions_to_anndata(adata, key, measured=measured, genes=genes)
    if library_id is None:
        libs = list(plot.uns["spatial"])
        if len(libs) != 1:
            raise InputError(f"adata has {len(libs)} sections; pass library_id= (and library_key=).")
        library_id = libs[0]
    if library_id not in plot.uns["spatial"]:
        raise MissingKeyError(f"No section {library_id!r} in adata.uns['spatial'] (it has: {list(plot.uns['spatial'])}).")
    mask = np.ones(plot.n_obs, bool)
    if library_key is not None:
        mask = plot.obs[library_key].astype(str).to_numpy() == str(library_id)
        if not mask.any():
            raise InputError(f"No spot has {library_key} == {library_id!r}.")
    entry = plot.uns["spatial"][library_id]
    image = entry["images"].get("hires")
    scale = float(entry["scalefactors"].get("tissue_hires_scalef", 1.0))
    xy = np.asarray(plot.obsm["spatial"], dtype=float)[mask] * scale
    diameter = float(entry["scalefactors"].get("spot_diameter_fullres", 0.0)) * scale
    lo, hi = xy.min(0), xy.max(0)
    pad = margin * (hi - lo).max() + diameter
    x0, x1, y0, y1 = lo[0] - pad, hi[0] + pad, lo[1] - pad, hi[1] + pad
    if image is not None:  # stay on the image
        x0, y0 = max(x0, 0.0), max(y0, 0.0)
        x1, y1 = min(x1, image.shape[1]), min(y1, image.shape[0])
    n = len(genes)
    width = 3.4
    height = width * (y1 - y0) / max(x1 - x0, 1e-9)
    fig, axes = plt.subplots(2, n, figsize=(width * n + 1.2 * n, 2 * height + 1.0), squeeze=False,
                             constrained_layout=True)
    # marker area in points^2 for a spot of the real diameter (at least a small dot)
    pts_per_px = width * 72 / max(x1 - x0, 1e-9)
    size = max((diameter * pts_per_px) ** 2, 4.0) if diameter > 0 else 12.0
    for j, gene in enumerate(genes):
        pred = np.asarray(plot[mask, f"{gene} predicted"].X).ravel()
        meas = np.asarray(plot[mask, f"{gene} measured"].X).ravel()
        vmin, vmax = max(0.0, float(min(pred.min(), meas.min()))), float(max(pred.max(), meas.max()))
        vmax = max(vmax, vmin + 1e-6)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.corrcoef(pred, meas)[0, 1] if pred.std() > 0 and meas.std() > 0 else np.nan
        for i, (values, label) in enumerate(((pred, "predicted"), (meas, "measured"))):
            ax = axes[i, j]
            if image is not None:
                ax.imshow(image, alpha=image_alpha)
            points = ax.scatter(xy[:, 0], xy[:, 1], c=values, cmap=cmap, vmin=vmin, vmax=vmax, s=size,
                                edgecolors="white", linewidths=0.4)
            ax.set_xlim(x0, x1)
            ax.set_ylim(y1, y0)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            pcc = "n/a" if np.isnan(r) else f"{r:.2f}"
            ax.set_title(f"{gene} {label}" + (f"\nPCC with measured: {pcc}" if i == 0 else ""), fontsize=10)
            if j == 0:
                ax.set_ylabel(label)
        bar = fig.colorbar(points, ax=axes[:, j], shrink=0.7)
        bar.set_label("log1p(counts per 10k)")
    if title is not None:
        fig.suptitle(title)
    if save is not None:
        fig.savefig(save, dpi=110, bbox_inches="tight")
    return fig
