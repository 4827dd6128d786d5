"""Whole-slide prediction: tissue detection, a tile grid at a physical pitch, batched trunk + translator.

Slides are opened, tissue is found and tiles are laid out by the scverse whole-slide stack
(wsidata's ``open_wsi`` and tile dataset, lazyslide's ``find_tissues`` / ``tile_tissues``), installed
with ``pip install 'st-predict[wsi]'``. Only the tiles of one batch are in memory at a time.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    from ._nh2st import NH2ST


def _wsi_stack():
    try:
        import lazyslide
        import wsidata
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "Whole-slide prediction needs wsidata and lazyslide: pip install 'st-predict[wsi]'."
        ) from err
    return wsidata, lazyslide


def open_slide(slide: Any):
    """A :class:`wsidata.WSIData` for a slide path (SVS, NDPI, pyramidal TIFF, ...) or a ``WSIData``."""
    wsidata, _ = _wsi_stack()
    if isinstance(slide, wsidata.WSIData):
        return slide
    if isinstance(slide, str | os.PathLike):
        path = os.fspath(slide)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Slide file {path!r} does not exist.")
        try:
            return wsidata.open_wsi(path)
        except Exception as err:
            raise ValueError(f"Could not open {path!r} as a whole-slide image: {err}") from err
    raise TypeError(f"slide must be a path or a wsidata.WSIData, got {type(slide).__name__}.")


def predict_slide(
    model: NH2ST,
    slide: Any,
    *,
    mpp: float | None = None,
    pitch_um: float | None = None,
    patch_size_um: float | None = None,
    batch_size: int = 64,
    tta: bool | None = None,
    key_added: str = "nh2st",
    progress: bool = True,
):
    """Predict expression over the tissue of a whole H&E slide; see :meth:`NH2ST.predict_slide`."""
    _, zs = _wsi_stack()
    wsi = open_slide(slide)
    name = os.fspath(slide) if isinstance(slide, str | os.PathLike) else (wsi.path or "the slide")
    if mpp is not None:
        if not mpp > 0:
            raise ValueError(f"mpp must be a positive number of micrometres per pixel, got {mpp!r}.")
        wsi.set_mpp(float(mpp))
    slide_mpp = wsi.properties.mpp
    if slide_mpp is None or not np.isfinite(slide_mpp) or slide_mpp <= 0:
        raise ValueError(
            f"The slide {name!r} records no micrometres per pixel; pass mpp= (e.g. mpp=0.25 for a 40x scan)."
        )
    patch_um = patch_size_um if patch_size_um is not None else model.patch_size_um_
    if patch_um is None:
        raise ValueError(
            "This model records no physical patch size (its training data had no pixel size): pass "
            "patch_size_um= (the side of its training patches in micrometres)."
        )
    pitch = pitch_um if pitch_um is not None else (model.spot_pitch_um_ or patch_um)
    if not pitch > 0:
        raise ValueError(f"pitch_um must be positive, got {pitch!r}.")
    size = model.module.image_size
    tile_mpp = float(patch_um) / size  # tiles are read straight at the network's resolution
    stride = max(1, int(round(pitch / tile_mpp)))
    tissue_key, tile_key = f"{key_added}_tissues", f"{key_added}_tiles"
    # tissue detection on the coarsest pyramid level that still resolves a tile (>= 4 px per tile side):
    # lazyslide's "auto" picks the level by free memory, which on a large slide means gigabytes
    level_mpp = [slide_mpp * d for d in wsi.properties.level_downsample]
    fine_enough = [i for i, m in enumerate(level_mpp) if m <= patch_um / 4]
    tissue_level = max(fine_enough, key=lambda i: level_mpp[i]) if fine_enough else 0
    zs.pp.find_tissues(wsi, level=tissue_level, key_added=tissue_key)
    if tissue_key not in wsi.shapes or len(wsi.shapes[tissue_key]) == 0:
        raise ValueError(f"No tissue found on the slide {name!r}.")
    zs.pp.tile_tissues(wsi, tile_px=size, stride_px=stride, mpp=tile_mpp, tissue_key=tissue_key,
                       key_added=tile_key)
    tiles = wsi.shapes[tile_key]
    if len(tiles) == 0:
        raise ValueError(f"No tissue found on the slide {name!r} (no tile of {patch_um:g} um on tissue).")
    dataset = wsi.ds.tile_images(tile_key=tile_key, image_size=size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    if progress:
        from tqdm.auto import tqdm

        print(f"{len(tiles)} tiles of {patch_um:g} um every {pitch:g} um on {name}")
        loader = tqdm(loader, desc="Predicting tiles", unit="batch")
    tta = model.tta_ if tta is None else bool(tta)
    module = model.module.eval()
    device = next(module.parameters()).device
    out = []
    with torch.no_grad():
        for batch in loader:
            img = batch["image"].permute(0, 3, 1, 2).contiguous()  # (B, 3, size, size) uint8
            out.append(module.predict_expression({"patches": img.to(device)}, tta=tta).float().cpu().numpy())
    pred = np.concatenate(out)
    centres = np.column_stack([tiles.geometry.centroid.x.to_numpy(), tiles.geometry.centroid.y.to_numpy()])
    from anndata import AnnData
    from spatialdata.models import TableModel

    obs = pd.DataFrame({"region": pd.Categorical([tile_key] * len(tiles)),
                        "tile_id": tiles["tile_id"].to_numpy(), "tissue_id": tiles["tissue_id"].to_numpy()},
                       index=[f"tile_{i}" for i in tiles["tile_id"]])
    table = AnnData(pred.astype(np.float32), obs=obs, var=pd.DataFrame(index=list(model.genes_)))
    table.obsm["spatial"] = centres
    table.uns["st_predict"] = {
        "slide": str(name), "slide_mpp": float(slide_mpp), "patch_size_um": float(patch_um),
        "pitch_um": float(pitch), "image_size": int(size), "tta": bool(tta), "tissue_level": int(tissue_level),
        "scale": "log1p(counts / library size * 1e4)",
    }
    wsi.tables[key_added] = TableModel.parse(table, region=tile_key, region_key="region", instance_key="tile_id")
    return wsi
