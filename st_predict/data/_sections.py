"""Select or concatenate sections of multi-section AnnDatas without copying the images."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from st_predict._utils import SECTION_KEY, InputError, MissingKeyError, user_stacklevel


def _renamed(library_key: str, section_key: str | None, where: str) -> str:
    if section_key is None:
        return library_key
    import warnings

    warnings.warn(f"{where}(section_key=) is deprecated: use library_key=.", FutureWarning, stacklevel=user_stacklevel())
    return section_key


def select_sections(
    adata: ad.AnnData, sections: Sequence[str], library_key: str = SECTION_KEY, *, section_key: str | None = None
) -> ad.AnnData:
    """The spots of ``sections`` as a new AnnData (expression, obs, var, obsm and layers copied) whose
    ``uns["spatial"]`` holds only those sections and **shares** their image arrays with ``adata``.

    ``adata[mask].copy()`` deep-copies ``uns``, i.e. every full-resolution image (about 280 MB per
    HER2ST section); this does not. ``library_key`` is the obs column of sections (``section_key``: its
    deprecated name).
    """
    section_key = _renamed(library_key, section_key, "select_sections")
    if section_key not in adata.obs:
        raise MissingKeyError(f"library_key={section_key!r} is not a column of adata.obs.")
    sections = [str(s) for s in sections]
    present = set(adata.obs[section_key].astype(str))
    missing = [s for s in sections if s not in present]
    if missing:
        raise MissingKeyError(f"Sections {missing} are not in adata.obs[{section_key!r}] (have {sorted(present)}).")
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


def concat_sections(
    adatas: Sequence[ad.AnnData], library_key: str = SECTION_KEY, *, section_key: str | None = None
) -> ad.AnnData:
    """Concatenate AnnDatas of different sections (e.g. from st_predict's readers) into one, keeping
    every section's ``uns["spatial"]`` entry; image arrays are shared, not copied.

    Genes are those present in every AnnData (``join="inner"``); ``var`` columns that agree are kept.
    When spot names repeat across the AnnDatas (Visium barcodes do), every spot is renamed
    ``"<name>_<section>"``.

    Parameters
    ----------
    adatas
        AnnDatas with ``obs[library_key]`` and their sections in ``uns["spatial"]``.
    library_key
        The obs column naming each spot's section.
    section_key
        Deprecated name of ``library_key``.

    Returns
    -------
    AnnData
        All spots, with ``obs[library_key]`` categorical (sections in the order given).
    """
    section_key = _renamed(library_key, section_key, "concat_sections")
    adatas = list(adatas)
    if not adatas:
        raise InputError("No AnnData to concatenate.")
    uns, sections = {}, []
    for i, a in enumerate(adatas):
        if section_key not in a.obs:
            raise MissingKeyError(f"library_key={section_key!r} is not a column of adata.obs of AnnData {i}.")
        for lib, entry in a.uns.get("spatial", {}).items():
            if lib in uns:
                raise InputError(f"Section {lib!r} is in uns['spatial'] of more than one AnnData.")
            uns[lib] = entry
        sections += [s for s in pd.unique(a.obs[section_key].astype(str)) if s not in sections]
    names = [a.obs_names.astype(str) for a in adatas]
    if not pd.Index(np.concatenate(names)).is_unique:
        names = [n + "_" + a.obs[section_key].astype(str).to_numpy() for n, a in zip(names, adatas, strict=True)]
        dup = pd.Index(np.concatenate(names))
        if not dup.is_unique:
            raise InputError(f"Spot names repeat within a section, e.g. {list(dup[dup.duplicated()][:3])}.")
    parts = []  # shallow AnnDatas under the new names, without uns (concat would deep-copy the images)
    for a, n in zip(adatas, names, strict=True):
        obs = a.obs.copy()
        obs.index = n
        obsm = {k: v.set_axis(n) if isinstance(v, pd.DataFrame) else v for k, v in a.obsm.items()}
        parts.append(ad.AnnData(X=a.X, obs=obs, var=a.var, obsm=obsm, layers=dict(a.layers)))
    out = ad.concat(parts, join="inner", merge="same")
    out.obs[section_key] = pd.Categorical(out.obs[section_key].astype(str), categories=sections)
    out.uns["spatial"] = uns
    return out
