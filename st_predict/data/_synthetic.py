"""Synthetic H&E-like tissue with spots and counts, and a planted morphology -> expression signal."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from st_predict._utils import SECTION_KEY, InputError

# Colours (RGB, 0-255) of the tissue programs: stroma (pink), tumour (purple), fat/lumen (pale).
_PROGRAM_COLOURS = np.array(
    [[225, 140, 180], [110, 60, 150], [245, 235, 240], [170, 90, 110], [90, 120, 170]], dtype=np.float64
)


def _smooth_fields(rng, n_fields, h, w, n_bumps, width):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    fields = np.zeros((n_fields, h, w))
    for f in range(n_fields):
        for _ in range(n_bumps):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            amp = rng.uniform(0.5, 1.5)
            fields[f] += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
    return fields


def synthetic_tissue(
    n_sections: int = 3,
    n_rows: int = 10,
    n_cols: int = 10,
    n_genes: int = 60,
    n_programs: int = 3,
    spot_spacing: int = 32,
    library_size: float = 3000.0,
    signal: float = 2.5,
    seed: int = 0,
) -> ad.AnnData:
    """Sections of synthetic tissue: an RGB image, a grid of spots, and Poisson counts.

    Each section has ``n_programs`` smooth spatial "tissue programs" (mixture weights that sum to 1 at
    every pixel). A program sets both the image (its colour, plus nuclei-like dark dots whose density
    follows program 1) and the expression (each program up-regulates its own block of genes by
    ``exp(signal)``). The signal is therefore learnable from a spot's patch alone. Programs change
    over a few spot spacings, so neighbours are correlated but not identical.

    Parameters
    ----------
    n_sections
        Number of sections (libraries ``"S0"``, ``"S1"``, ...).
    n_rows, n_cols
        Spot grid of each section.
    n_genes
        Number of genes (``"G000"``...).
    n_programs
        Number of tissue programs (<= 5).
    spot_spacing
        Centre-to-centre spot distance in pixels; the image has a margin of one spacing.
    library_size
        Mean total counts per spot.
    signal
        Log fold change of a program's genes (0 gives no morphology -> expression signal).
    seed
        Random seed.

    Returns
    -------
    AnnData with raw integer counts in ``X``, ``obs["section"]``, ``obsm["spatial"]`` (full-resolution
    pixels), ``obsm["programs"]`` (each spot's true program mixture) and Visium-style
    ``uns["spatial"][section]`` with ``images["hires"]`` (uint8, full resolution) and
    ``scalefactors`` (``tissue_hires_scalef = 1.0``, ``spot_diameter_fullres``).
    """
    if not 1 <= n_programs <= len(_PROGRAM_COLOURS):
        raise InputError(f"n_programs must be in [1, {len(_PROGRAM_COLOURS)}], got {n_programs}.")
    rng = np.random.default_rng(seed)
    h, w = (n_rows + 1) * spot_spacing, (n_cols + 1) * spot_spacing
    base = rng.normal(0.0, 1.0, n_genes)
    loadings = np.zeros((n_genes, n_programs))
    blocks = np.array_split(np.arange(n_genes), n_programs + 1)  # last block: genes without signal
    for p in range(n_programs):
        loadings[blocks[p], p] = signal * rng.uniform(0.5, 1.0, len(blocks[p]))
    obs, spatial, xs, programs, uns = [], [], [], [], {}
    yy, xx = np.mgrid[0:h, 0:w]
    for s in range(n_sections):
        sec = f"S{s}"
        fields = _smooth_fields(rng, n_programs, h, w, n_bumps=4, width=2.0 * spot_spacing)
        fields = 3.0 * fields / fields.max()
        mix = np.exp(fields) / np.exp(fields).sum(0, keepdims=True)  # (P, H, W)
        img = np.tensordot(mix, _PROGRAM_COLOURS[:n_programs], axes=(0, 0))  # (H, W, 3)
        # nuclei-like dark dots, denser where program 1 (tumour) dominates
        dens = mix[min(1, n_programs - 1)]
        dots = rng.random((h, w)) < 0.02 * dens
        img[dots] *= 0.35
        img += rng.normal(0, 6, img.shape)
        img = np.clip(img, 0, 255).astype(np.uint8)
        centres_r = (np.arange(n_rows) + 1) * spot_spacing
        centres_c = (np.arange(n_cols) + 1) * spot_spacing
        half = spot_spacing // 2
        for r, cy in enumerate(centres_r):
            for c, cx in enumerate(centres_c):
                m = mix[:, cy - half : cy + half, cx - half : cx + half].mean((1, 2))
                programs.append(m)
                rate = np.exp(base + loadings @ m)
                lib = library_size * rng.lognormal(0, 0.2)
                xs.append(rng.poisson(lib * rate / rate.sum()))
                spatial.append((cx, cy))
                obs.append((f"{sec}_{r}x{c}", sec, r, c))
        uns[sec] = {
            "images": {"hires": img},
            "scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 0.55 * spot_spacing},
            "metadata": {"source": "st_predict.data.synthetic_tissue", "seed": seed},
        }
    obs_df = pd.DataFrame(obs, columns=["name", SECTION_KEY, "array_row", "array_col"]).set_index("name")
    obs_df.index.name = None
    obs_df[SECTION_KEY] = pd.Categorical(obs_df[SECTION_KEY])
    adata = ad.AnnData(
        X=np.asarray(xs, dtype=np.float32),
        obs=obs_df,
        var=pd.DataFrame(index=[f"G{i:03d}" for i in range(n_genes)]),
    )
    adata.obsm["spatial"] = np.asarray(spatial, dtype=np.float64)
    adata.obsm["programs"] = np.asarray(programs, dtype=np.float32)
    adata.uns["spatial"] = uns
    return adata


def synthetic_spatialdata(chunk_size: int = 64, **kwargs):
    """:func:`synthetic_tissue` as a :class:`spatialdata.SpatialData`, laid out like spatialdata-io's
    Visium reader: per section an image element ``"<S>_image"`` (``(c, y, x)``, chunked), a circles
    element ``"<S>"`` (radius ``spot_diameter_fullres / 2``), each in its own coordinate system
    ``"<S>"``, and one table ``"table"`` (``region_key="region"``, ``instance_key="spot_id"``) with
    the counts. ``kwargs`` go to :func:`synthetic_tissue`.
    """
    import geopandas as gpd
    from shapely.geometry import Point
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity

    adata = synthetic_tissue(**kwargs)
    images, shapes = {}, {}
    for sec, entry in adata.uns["spatial"].items():
        cs = {sec: Identity()}
        img = entry["images"]["hires"].transpose(2, 0, 1)
        images[f"{sec}_image"] = Image2DModel.parse(
            img, dims=("c", "y", "x"), chunks=(3, chunk_size, chunk_size), transformations=cs
        )
        sel = (adata.obs[SECTION_KEY] == sec).to_numpy()
        xy = adata.obsm["spatial"][sel]
        radius = entry["scalefactors"]["spot_diameter_fullres"] / 2
        gdf = gpd.GeoDataFrame(
            {"radius": np.full(len(xy), radius)},
            geometry=[Point(x, y) for x, y in xy],
            index=pd.Index(np.arange(int(sel.sum())).astype(str)),
        )
        shapes[sec] = ShapesModel.parse(gdf, transformations=cs)
    obs = adata.obs.copy()
    obs["region"] = pd.Categorical(obs[SECTION_KEY].astype(str))
    obs["spot_id"] = obs.groupby("region", observed=True).cumcount().astype(str).to_numpy()
    table = ad.AnnData(X=adata.X, obs=obs, var=adata.var.copy())
    table.obsm["programs"] = adata.obsm["programs"]
    table = TableModel.parse(table, region=list(shapes), region_key="region", instance_key="spot_id")
    return SpatialData(images=images, shapes=shapes, tables={"table": table})
