"""Sub-spot bins over a whole slide: ``predict_slide(..., bin_um=)``. Every tile on tissue owns the squares of a
lattice of ``bin_um`` micrometres that lie inside it and are nearer its centre than any other tile's (so no
square is written twice); the model's sub-spot head gives each square its densities, reconciled with the
tile's prediction; squares off the tissue are dropped."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from st_predict._utils import InputError, footprint_fraction, interval_overlap


def _plan(boxes: np.ndarray, side: float, tissue) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per tile ``(i, rows, cols)``: the lattice squares of ``side`` px inside its box ``(minx, miny, maxx, maxy)``
    whose centre is nearest to its centre among all tiles and lies on ``tissue`` (a shapely geometry or None)."""
    import shapely
    from scipy.spatial import cKDTree

    centres = np.column_stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2])
    tree = cKDTree(centres)
    out = []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        cols = np.arange(np.ceil(x0 / side - 1e-9), np.floor(x1 / side + 1e-9))
        rows = np.arange(np.ceil(y0 / side - 1e-9), np.floor(y1 / side + 1e-9))
        if not len(cols) or not len(rows):
            continue
        gy, gx = np.meshgrid(rows, cols, indexing="ij")
        cx, cy = (gx.ravel() + 0.5) * side, (gy.ravel() + 0.5) * side
        keep = tree.query(np.column_stack([cx, cy]))[1] == i
        if tissue is not None:
            keep &= shapely.contains_xy(tissue, cx, cy)
        if keep.any():
            out.append((i, gy.ravel()[keep].astype(np.int64), gx.ravel()[keep].astype(np.int64)))
    return out


def slide_bins(model, dataset, tiles, pred: np.ndarray, slide_mpp: float, bin_um: float, batch_size: int,
               tissues=None, reconcile: bool = True):
    """The bins of the tiles ``tiles`` (their images: ``dataset``, in the same order; their predictions:
    ``pred``): ``(bin_rows, bin_cols, tile_index, share, side_px, disc_weight)`` in level-0 pixels."""
    import shapely

    from st_predict.nn import disc_weights

    cfg = model.bins_["config"]
    h, w = cfg["map_size"]
    side = float(bin_um) / float(slide_mpp)
    boxes = tiles.geometry.bounds[["minx", "miny", "maxx", "maxy"]].to_numpy(np.float64)
    tissue = shapely.union_all(tissues.geometry.to_numpy()) if tissues is not None and len(tissues) else None
    plan = _plan(boxes, side, tissue)
    n_bins = int(sum(len(p[1]) for p in plan))
    share = np.zeros((n_bins, len(model.genes_)), np.float32)
    rc, owner = np.zeros((n_bins, 2), np.int64), np.zeros(n_bins, np.int64)
    # the disc a spot's prediction is the mean over, in map cells: the training sections' (they agree closely)
    radius = float(np.mean(list(cfg["radius_cells"].values())))
    square = bool(cfg.get("square")) and all(cfg["square"].values())  # trained on Visium HD's square bins
    footprint = disc_weights(h, w, radius, square=square)
    bins = model._bin_module()
    module = model.module.eval()
    pos = 0
    with torch.no_grad():
        for start in range(0, len(plan), batch_size):
            chunk = plan[start: start + batch_size]
            idx = [p[0] for p in chunk]
            patches = torch.stack([torch.as_tensor(np.asarray(dataset[int(i)]["image"])) for i in idx])
            fine, final = bins.features(module, patches.permute(0, 3, 1, 2).contiguous().to(module.device))
            rho = bins.rates(fine, final)
            if reconcile:
                target = torch.from_numpy(np.expm1(pred[idx]) / 1e4).to(rho)
                fp = footprint[None].expand(len(idx), h, w).to(rho)
                rho = rho * (target / bins.spot_share(rho, fp).clamp_min(1e-12))[:, :, None, None]
            rho = rho.cpu().numpy().astype(np.float64)
            for (i, by, bx), dens in zip(chunk, rho, strict=True):
                x0, y0, x1, _ = boxes[i]
                cell = (x1 - x0) / w
                vals = np.einsum("bi,gij,bj->bg", interval_overlap(by * side, side, y0, cell, h), dens,
                                 interval_overlap(bx * side, side, x0, cell, w))
                share[pos: pos + len(by)] = vals
                rc[pos: pos + len(by)] = np.column_stack([by, bx])
                owner[pos: pos + len(by)] = i
                pos += len(by)
    # each bin's fraction inside its tile's disc (for summing bins back into tiles)
    centres = np.column_stack([(rc[:, 1] + 0.5) * side, (rc[:, 0] + 0.5) * side])
    tile_centres = np.column_stack([(boxes[owner, 0] + boxes[owner, 2]) / 2, (boxes[owner, 1] + boxes[owner, 3]) / 2])
    r_px = radius * (boxes[owner, 2] - boxes[owner, 0]) / w
    weight = footprint_fraction(centres, side, tile_centres, r_px, square)
    return rc, owner, share, side, weight


def bins_elements(model, rc, owner, share, side, weight, tiles, to_fullres: float, key: str, bin_um: float):
    """The shapes (squares) and the table of the slide's bins, as SpatialData elements."""
    import geopandas as gpd
    import shapely
    from anndata import AnnData
    from spatialdata.models import ShapesModel, TableModel

    ids = np.arange(len(rc))
    x0, y0 = rc[:, 1] * side, rc[:, 0] * side
    shapes = ShapesModel.parse(gpd.GeoDataFrame({"bin_id": ids}, geometry=shapely.box(x0, y0, x0 + side, y0 + side),
                                                index=pd.Index(ids.astype(str))))
    obs = pd.DataFrame({"region": pd.Categorical([key] * len(ids)), "bin_id": ids,
                        "tile_id": tiles["tile_id"].to_numpy()[owner], "tile_weight": weight,
                        "bin_row": rc[:, 0], "bin_col": rc[:, 1]}, index=[f"bin_{i}" for i in ids])
    table = AnnData(np.log1p(1e4 * share).astype(np.float32), obs=obs, var=pd.DataFrame(index=list(model.genes_)))
    table.layers["share"] = share
    table.obsm["spatial"] = np.column_stack([x0 + side / 2, y0 + side / 2]) * to_fullres
    table.uns["st_predict"] = {"bin_um": float(bin_um), "bin_px": float(side),
                               "scale": "log1p(1e4 * share of the spot's library per unit of area)"}
    return shapes, TableModel.parse(table, region=key, region_key="region", instance_key="bin_id")


def check_bins(model, bin_um, features_key) -> None:
    """Before any tile is read: ``bin_um`` needs the sub-spot head and the tiles' pixels."""
    if bin_um is None:
        return
    if not model.has_bins:
        raise InputError("bin_um needs the model's sub-spot head: call model.train_bins() after model.train().")
    if features_key is not None:
        raise InputError("bin_um reads each tile's pixels for the sub-spot head: not with features_key (features only).")
    if isinstance(bin_um, bool) or not isinstance(bin_um, int | float | np.integer | np.floating) or not bin_um > 0:
        raise InputError(f"bin_um must be a positive number of micrometres, got {bin_um!r}.")


def add_bins(model, wsi, dataset, tile_key: str, pred, slide_mpp: float, bin_um: float, batch_size: int,
             tissue_key: str, to_fullres: float, key: str) -> None:
    """Write the slide's bins into ``wsi``: table ``f"{key}_bins"`` annotating the squares ``f"{key}_bin_shapes"``."""
    tiles = wsi.shapes[tile_key]
    tissues = wsi.shapes[tissue_key] if tissue_key in wsi.shapes else None
    rc, owner, share, side, weight = slide_bins(model, dataset, tiles, pred, slide_mpp, bin_um, batch_size, tissues)
    shapes, table = bins_elements(model, rc, owner, share, side, weight, tiles, to_fullres, f"{key}_bin_shapes", bin_um)
    wsi.shapes[f"{key}_bin_shapes"] = shapes
    wsi.tables[f"{key}_bins"] = table
