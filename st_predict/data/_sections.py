"""Select sections of a multi-section AnnData without copying the images."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad

from st_predict._constants import SECTION_KEY


def select_sections(adata: ad.AnnData, sections: Sequence[str], section_key: str = SECTION_KEY) -> ad.AnnData:
    """The spots of ``sections`` as a new AnnData (expression, obs, var, obsm and layers copied) whose
    ``uns["spatial"]`` holds only those sections and **shares** their image arrays with ``adata``.

    ``adata[mask].copy()`` deep-copies ``uns``, i.e. every full-resolution image (about 280 MB per
    HER2ST section); this does not.
    """
    if section_key not in adata.obs:
        raise KeyError(f"section_key={section_key!r} is not a column of adata.obs.")
    sections = [str(s) for s in sections]
    present = set(adata.obs[section_key].astype(str))
    missing = [s for s in sections if s not in present]
    if missing:
        raise KeyError(f"Sections {missing} are not in adata.obs[{section_key!r}] (have {sorted(present)}).")
    view = adata[adata.obs[section_key].astype(str).isin(sections).to_numpy()]
    out = ad.AnnData(
        X=view.X.copy() if view.X is not None else None,
        obs=view.obs.copy(),
        var=view.var.copy(),
        obsm={k: v.copy() for k, v in view.obsm.items()},
        layers={k: v.copy() for k, v in view.layers.items()},
    )
    if hasattr(out.obs[section_key], "cat"):
        out.obs[section_key] = out.obs[section_key].cat.remove_unused_categories()
    spatial = adata.uns.get("spatial", {})
    out.uns["spatial"] = {lib: spatial[lib] for lib in sections if lib in spatial}
    return out
