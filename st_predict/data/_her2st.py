"""Reader (and fetcher) for the HER2ST / legacy-ST format: counts table + spot file + H&E image."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from st_predict._utils import SECTION_KEY, InputError, MissingFileError

from ._images import _read_image, read_fullres_image

logger = logging.getLogger(__name__)

#: almaan/her2st snapshot the registry below was checked against.
HER2ST_COMMIT = "85df7411b987a7dec3feff9718b869a7a82091ec"
_BASE = f"https://raw.githubusercontent.com/almaan/her2st/{HER2ST_COMMIT}/data/"
#: local file -> (path in almaan/her2st, md5)
HER2ST_FILES = {
    "counts/C2.tsv.gz": ("ST-cnts/C2.tsv.gz", "313dd945ce88c5bc526f147f2237aa5b"),
    "counts/C3.tsv.gz": ("ST-cnts/C3.tsv.gz", "a659c3aab3781e58d3bda9c377f20bfd"),
    "counts/C4.tsv.gz": ("ST-cnts/C4.tsv.gz", "d8347339fe38bc2d778a2a41a6ac111d"),
    "counts/C5.tsv.gz": ("ST-cnts/C5.tsv.gz", "96b62df369829dc87cf2701962de841f"),
    "counts/C6.tsv.gz": ("ST-cnts/C6.tsv.gz", "615b46fb428bc3b841c4540a8407decb"),
    "spots/C2_selection.tsv": ("ST-spotfiles/C2_selection.tsv", "47a40ce9ee27f51f7e6983768551d4d9"),
    "spots/C3_selection.tsv": ("ST-spotfiles/C3_selection.tsv", "b226fe0ffc1938c4354c69da1efd5f2a"),
    "spots/C4_selection.tsv": ("ST-spotfiles/C4_selection.tsv", "ff1c4b99e5945580d9053818e9d895bb"),
    "spots/C5_selection.tsv": ("ST-spotfiles/C5_selection.tsv", "9e2415cf9c43b1d787d49de84662f6e4"),
    "spots/C6_selection.tsv": ("ST-spotfiles/C6_selection.tsv", "78d579f138ef4adf5dea5e34b59d63cf"),
    "images/C2_5714_HE_BT_C2.jpg": ("ST-imgs/C/C2/5714_HE_BT_C2.jpg", "44b9ebdf03839fb486210658ba61fef4"),
    "images/C3_5714_HE_BT_D1.jpg": ("ST-imgs/C/C3/5714_HE_BT_D1.jpg", "f44fb551ca7f2ff85079d9bea581e38c"),
    "images/C4_5714_HE_BT_D2.jpg": ("ST-imgs/C/C4/5714_HE_BT_D2.jpg", "4b3d2a1ecf1d843646e54c198dc6cdd1"),
    "images/C5_5714_HE_BT_E1.jpg": ("ST-imgs/C/C5/5714_HE_BT_E1.jpg", "cd914f5fee22880219c3db755d7a59aa"),
    "images/C6_5714_HE_BT_E2.jpg": ("ST-imgs/C/C6/5714_HE_BT_E2.jpg", "f657b9b383b87517b0089ef46bf8668b"),
}
#: ST spots are 100 um wide on a 200 um grid.
_SPOT_DIAMETER_OVER_SPACING = 0.5
_SPOT_SPACING_UM = 200.0


def fetch_her2st(path: str | os.PathLike | None = None, timeout: float = 30.0) -> Path:
    """Download the five patient-C HER2ST sections (C2-C6, 28 MB) into ``path`` and check their md5.

    Files already present with the right checksum are not downloaded again. Offline, this raises a
    ``RuntimeError`` that says which files to put where.

    Parameters
    ----------
    path
        Destination folder (default: pooch's user cache, ``.../st_predict/her2st``).
    timeout
        Seconds before a download attempt gives up.
    """
    import pooch

    path = Path(path) if path is not None else Path(pooch.os_cache("st_predict")) / "her2st"
    downloader = pooch.HTTPDownloader(timeout=timeout, progressbar=False)
    for local, (remote, md5) in HER2ST_FILES.items():
        try:
            pooch.retrieve(
                _BASE + remote, known_hash=f"md5:{md5}", fname=Path(local).name, path=path / Path(local).parent,
                downloader=downloader,
            )
        except Exception as err:
            raise RuntimeError(
                f"Could not fetch {local} ({type(err).__name__}: {err}). Download the HER2ST files of "
                f"github.com/almaan/her2st (commit {HER2ST_COMMIT[:7]}: data/ST-cnts/C?.tsv.gz, "
                "data/ST-spotfiles/C?_selection.tsv, data/ST-imgs/C/C?/*.jpg) into "
                f"{path}/counts, {path}/spots and {path}/images (images named '<section>_<file>.jpg'), "
                "then call st_predict.data.read_her2st on that folder."
            ) from err
    return path


def _find_image(root: Path, section: str) -> Path:
    hits = sorted((root / "images").glob(f"{section}_*.jpg")) + sorted((root / "images").glob(f"{section}.jpg"))
    if not hits:
        raise MissingFileError(f"No H&E image for section {section!r} in {root / 'images'} (expected '{section}_*.jpg').")
    return hits[0]


def read_her2st(
    path: str | os.PathLike, sections: list[str] | None = None, load_images: bool | str = True
) -> ad.AnnData:
    """Read sections in the HER2ST / legacy-ST layout into one AnnData.

    ``path`` holds ``counts/<S>.tsv.gz`` (spots x genes raw counts, spot id ``"<x>x<y>"``),
    ``spots/<S>_selection.tsv`` (``x, y, pixel_x, pixel_y``) and ``images/<S>_*.jpg`` (full-resolution
    H&E). Spots are joined by id (never by row order); spots in the spot file without counts are
    dropped (and logged), counts without a spot-file row raise an error.

    Parameters
    ----------
    path
        The folder.
    sections
        Section ids to read (default: every ``counts/*.tsv.gz``).
    load_images
        Load the H&E images (about 280 MB of RAM each for HER2ST); ``"lazy"``: read each image's header
        only, and its pixels when they are used (a one-block dask array; training decodes each section's
        image once, to crop its patches).

    Returns
    -------
    AnnData with raw counts (CSR) in ``X`` over the genes shared by all sections, ``obs["section"]``,
    ``obs["array_x"/"array_y"]``, ``obsm["spatial"]`` (full-resolution pixels) and
    ``uns["spatial"][section]`` with ``images["hires"]`` (the full-resolution image, so
    ``tissue_hires_scalef = 1.0``), ``spot_diameter_fullres`` and ``metadata["pixel_size_um"]``
    (micrometres per pixel, from the 200 µm spot grid).
    """
    root = Path(path)
    if load_images not in (True, False, "lazy"):
        raise InputError(f"load_images must be True, False or 'lazy', got {load_images!r}.")
    if not (root / "counts").is_dir():
        raise MissingFileError(f"{root} has no 'counts' folder; is it a HER2ST-format folder?")
    available = sorted(p.name[: -len(".tsv.gz")] for p in (root / "counts").glob("*.tsv.gz"))
    sections = list(sections) if sections is not None else available
    missing = [s for s in sections if s not in available]
    if missing or not sections:
        raise MissingFileError(f"Sections {missing or sections} not found in {root / 'counts'} (have {available}).")
    adatas, uns = [], {}
    for sec in sections:
        cnt = pd.read_csv(root / "counts" / f"{sec}.tsv.gz", sep="\t", index_col=0)
        cnt.index = cnt.index.astype(str)
        spots_file = root / "spots" / f"{sec}_selection.tsv"
        if not spots_file.is_file():
            raise MissingFileError(f"Section {sec!r} has no spot file {spots_file}.")
        pos = pd.read_csv(spots_file, sep="\t")
        for col in ("x", "y", "pixel_x", "pixel_y"):
            if col not in pos:
                raise InputError(f"{spots_file} lacks column {col!r}.")
        pos.index = pos["x"].round().astype(int).astype(str) + "x" + pos["y"].round().astype(int).astype(str)
        if pos.index.duplicated().any():
            raise InputError(f"{spots_file} lists spot ids twice: {list(pos.index[pos.index.duplicated()][:3])}.")
        no_pos = cnt.index.difference(pos.index)
        if len(no_pos):
            raise InputError(f"Section {sec!r}: {len(no_pos)} spots have counts but no position, e.g. {list(no_pos[:3])}.")
        dropped = pos.index.difference(cnt.index)
        if len(dropped):
            logger.info("Section %s: %d spots of the spot file have no counts and are dropped.", sec, len(dropped))
        pos = pos.loc[cnt.index]
        a = ad.AnnData(
            X=sparse.csr_matrix(cnt.to_numpy(dtype=np.float32)),
            obs=pd.DataFrame(
                {SECTION_KEY: sec, "array_x": pos["x"].to_numpy(), "array_y": pos["y"].to_numpy()},
                index=[f"{sec}_{i}" for i in cnt.index],
            ),
            var=pd.DataFrame(index=cnt.columns.astype(str)),
        )
        a.obsm["spatial"] = pos[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
        coords = a.obsm["spatial"]
        d = np.sqrt(((coords[:, None] - coords[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        spacing = float(np.median(d.min(1))) if len(coords) > 1 else float("nan")
        entry = {
            "images": {},
            "scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": _SPOT_DIAMETER_OVER_SPACING * spacing},
            "metadata": {"source_image": None},
        }
        if np.isfinite(spacing) and spacing > 0:
            entry["metadata"]["pixel_size_um"] = _SPOT_SPACING_UM / spacing
        if load_images:
            img_path = _find_image(root, sec)
            if load_images == "lazy":
                entry["images"]["hires"] = read_fullres_image(img_path, lazy=True)
            else:
                entry["images"]["hires"] = _read_image(img_path)
            entry["metadata"]["source_image"] = img_path.name
        uns[sec] = entry
        adatas.append(a)
    adata = ad.concat(adatas, join="inner", merge="same")
    adata.obs[SECTION_KEY] = pd.Categorical(adata.obs[SECTION_KEY], categories=sections)
    adata.uns["spatial"] = uns
    return adata
