"""Synthetic tissue with a planted pattern finer than a spot: a truth for sub-spot predictions."""

from __future__ import annotations

import numpy as np

from st_predict._utils import SECTION_KEY, InputError

from ._synthetic import synthetic_tissue

#: the planted gene's name
HOT_GENE = "G_HOT"
_HOT_COLOUR = np.array([60.0, 170.0, 100.0])


def synthetic_subspot_tissue(n_sections: int = 3, n_rows: int = 10, n_cols: int = 10, cell: int = 8,
                             spot_spacing: int = 32, spot_diameter: float = 26.0, hot_share: float = 0.04,
                             pixel_size_um: float = 1.0, seed: int = 0, **kwargs):
    """:func:`synthetic_tissue` with one more gene, ``G_HOT``, expressed only in "hot" cells finer than a spot.

    The image is cut into squares of ``cell`` pixels. Each square is hot with a probability drawn per block of
    ``spot_spacing`` pixels (uniform in 0.3-0.7, so within a spot some squares are hot and others not). A hot
    square is tinted green with a checker texture of ``cell / 2`` pixels. ``G_HOT``'s share of a spot's library
    is ``hot_share`` times the fraction of the spot's disc (``spot_diameter`` pixels) that is hot, and its
    counts are Poisson; the other genes are :func:`synthetic_tissue`'s. Spot totals alone therefore carry where
    in the spot the gene is only through the image.

    Returns the AnnData of :func:`synthetic_tissue` (``spot_diameter_fullres`` set to ``spot_diameter``,
    ``metadata["pixel_size_um"]`` to ``pixel_size_um``) with ``G_HOT`` as its last gene (replacing the last
    gene without signal) and ``uns["subspot"]``: ``{"gene", "cell", "hot": {section: (H, W) float mask}}``.
    """
    if cell < 2 or spot_spacing % cell:
        raise InputError(f"cell must be >= 2 and divide spot_spacing ({spot_spacing}), got {cell}.")
    adata = synthetic_tissue(n_sections=n_sections, n_rows=n_rows, n_cols=n_cols, spot_spacing=spot_spacing,
                             seed=seed, **kwargs)
    rng = np.random.default_rng(seed + 7919)
    x = np.asarray(adata.X, dtype=np.float64)
    hot_counts = np.zeros(adata.n_obs)
    masks = {}
    sections = adata.obs[SECTION_KEY].astype(str).to_numpy()
    for sec, entry in adata.uns["spatial"].items():
        img = entry["images"]["hires"].astype(np.float64)
        h, w = img.shape[:2]
        blocks = rng.uniform(0.3, 0.7, (-(-h // spot_spacing), -(-w // spot_spacing)))
        per = spot_spacing // cell
        p = np.kron(blocks, np.ones((per, per)))
        hot_cells = rng.random(p.shape) < p
        mask = np.kron(hot_cells, np.ones((cell, cell)))[:h, :w]
        yy, xx = np.mgrid[0:h, 0:w]
        checker = np.where(((yy // max(cell // 2, 1)) + (xx // max(cell // 2, 1))) % 2 == 0, 25.0, -25.0)
        tinted = 0.4 * img + 0.6 * _HOT_COLOUR[None, None, :] + checker[..., None]
        img = np.where(mask[..., None] > 0, tinted, img)
        entry["images"]["hires"] = np.clip(img, 0, 255).astype(np.uint8)
        entry["scalefactors"]["spot_diameter_fullres"] = float(spot_diameter)
        entry["metadata"]["pixel_size_um"] = float(pixel_size_um)
        masks[sec] = mask.astype(np.float32)
        rows = np.flatnonzero(sections == sec)
        r = spot_diameter / 2
        for i in rows:
            cx, cy = adata.obsm["spatial"][i]
            disc = (yy - cy + 0.5) ** 2 + (xx - cx + 0.5) ** 2 <= r**2
            frac = mask[disc].mean()
            lib = x[i].sum()
            hot_counts[i] = rng.poisson(lib * hot_share * frac)
    x[:, -1] = hot_counts
    adata.X = x.astype(np.float32)
    names = list(adata.var_names)
    names[-1] = HOT_GENE
    adata.var_names = names
    adata.uns["subspot"] = {"gene": HOT_GENE, "cell": int(cell), "hot": masks}
    return adata
