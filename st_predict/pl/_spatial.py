"""Plots of predicted expression on the tissue (on top of squidpy's ``spatial_scatter``)."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from st_predict._constants import PREDICTED_KEY


def _lowres(img, max_side: int) -> tuple[np.ndarray, float]:
    h, w = img.shape[:2]
    step = max(1, int(np.ceil(max(h, w) / max_side)))
    small = np.asarray(img[::step, ::step])
    if small.dtype != np.uint8 and small.max() > 1.0:
        small = small.astype(np.uint8)
    return small, 1.0 / step


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
    as ``uns["spatial"][lib]["images"]["lowres"]`` (with ``tissue_lowres_scalef``), so any scanpy /
    squidpy plot takes predicted genes as ``color``. ``genes`` restricts it to those genes. With
    ``measured`` (spots x genes, same scale), the columns are ``"<gene> predicted"`` and
    ``"<gene> measured"``.
    """
    if key not in adata.obsm:
        raise KeyError(f"adata.obsm[{key!r}] is missing: run model.predict(adata, key_added={key!r}) first.")
    pred = adata.obsm[key]
    if not isinstance(pred, pd.DataFrame):
        raise TypeError(f"adata.obsm[{key!r}] must be a DataFrame of predicted genes.")
    if genes is not None:
        missing = [g for g in genes if g not in pred.columns]
        if missing:
            raise KeyError(f"Genes not predicted in adata.obsm[{key!r}]: {missing}")
        pred = pred[list(genes)]
    x, names = pred.to_numpy(np.float32), [str(g) for g in pred.columns]
    if measured is not None:
        missing = [g for g in pred.columns if g not in measured.columns]
        if missing:
            raise KeyError(f"Genes absent from the measured table: {missing[:10]}")
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
            small, factor = _lowres(img, max_image_side)
            images["lowres"] = small
            new_sf["tissue_lowres_scalef"] = sf.get(f"tissue_{image_key}_scalef", 1.0) * factor
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
    **kwargs,
):
    """Predicted (top row) and measured (bottom row) expression of ``genes`` on the tissue, drawn by
    :func:`squidpy.pl.spatial_scatter` over the H&E image. ``measured`` is a spots x genes
    DataFrame on the same scale as the predictions. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    import squidpy as sq

    genes = list(genes)
    plot = predictions_to_anndata(adata, key, measured=measured, genes=genes)
    if library_id is None:
        libs = list(plot.uns["spatial"])
        if len(libs) != 1:
            raise ValueError(f"adata has {len(libs)} sections; pass library_id= (and library_key=).")
        library_id = libs[0]
    colors = [f"{g} predicted" for g in genes] + [f"{g} measured" for g in genes]
    kwargs.setdefault("cmap", "viridis")
    kwargs.setdefault("size", 1.2)
    sq.pl.spatial_scatter(
        plot, color=colors, library_id=library_id, library_key=library_key, img_res_key="lowres",
        ncols=len(genes), wspace=0.05, **kwargs,
    )
    fig = plt.gcf()
    if save is not None:
        fig.savefig(save, dpi=110, bbox_inches="tight")
    return fig
