"""Whole-slide prediction with a pretrained predictor (:class:`~st_predict.Pretrained`): its tiles laid on the tissue
at the geometry it was trained on, its features computed once per slide and kept as its spots' are, and its (calibrated)
outputs written as NH2ST's slide predictions are."""

from __future__ import annotations

import numpy as np
import torch

from st_predict._utils import PRETRAINED_KEY, InputError, thread_limits

from ._slide_open import default_num_workers, open_at_mpp
from ._slide_tiles import check_slide_settings, lay_tiles, tile_centres, tile_dataset, write_tile_table


def is_pretrained(model) -> bool:
    """Whether ``model`` is a :class:`~st_predict.Pretrained` predictor (not a trained NH2ST)."""
    from st_predict.model import Pretrained

    return isinstance(model, Pretrained)


class _TileReader:
    """``read(indices) -> uint8 (m, 3, S, S)`` over a slide's tiles. The predictor asks for consecutive batches in
    order; those come from a DataLoader whose workers read ahead (any other request is read directly)."""

    def __init__(self, dataset, batch_size: int, num_workers: int):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self._batches, self._next = None, 0

    def __call__(self, idx: np.ndarray) -> torch.Tensor:
        idx, n = np.asarray(idx), len(self.dataset)
        if len(idx) and idx[0] == 0:  # a new pass over the tiles
            self._batches = iter(torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False,
                                                             num_workers=self.num_workers))
            self._next = 0
        expected = np.arange(self._next, min(n, self._next + self.batch_size))
        if self._batches is not None and np.array_equal(idx, expected):
            images = torch.as_tensor(next(self._batches)["image"])
            self._next = int(expected[-1]) + 1
        else:
            self._batches = None
            images = torch.stack([torch.as_tensor(np.asarray(self.dataset[int(i)]["image"])) for i in idx])
        return images.permute(0, 3, 1, 2).contiguous()


def predict_slide_pretrained(
    model,
    slide,
    mpp: float | None = None,
    pitch_um: float | None = None,
    key_added: str = PRETRAINED_KEY,
    progress: bool | None = None,
    num_workers: int | None = None,
    image_key: str | None = None,
    library_id: str | None = None,
    image_element: str | None = None,
    tissue_method: str = "entropy",
    min_tissue_fraction: float = 0.7,
    image_mpp: float | None = 2.0,
    interval_level: float | None = 0.9,
):
    """Predict the tissue of a whole H&E slide with a pretrained predictor (``model.predict_slide(slide, ...)``).

    The tissue is found and tiled as by NH2ST's :func:`~st_predict.tl.predict_slide`, with tiles of the predictor's
    geometry (:attr:`~st_predict.Pretrained.geometry`: ``tile_um`` micrometres read at ``tile_px`` pixels; a slide
    scanned coarser is read at its own pixels and upsampled, warned once), every ``pitch_um`` micrometres (default:
    ``tile_um``, tiles side by side). The encoder sees each tile once; the features are kept in memory and in the
    predictor's ``feature_cache``, keyed by the slide's content, so a second call on the same slide runs no encoder.
    STPath sees every tile of the slide in one call: more tiles than its ``max_spots`` are refused before any is
    encoded (a larger ``pitch_um``, or a region of interest, brings a slide within it).

    Calibrated (:meth:`~st_predict.Pretrained.calibrate`): the tiles' values are on the ``log1p(counts / library
    size * 1e4)`` scale, with the split-conformal bounds at ``interval_level`` in the table's layers ``"lower"`` and
    ``"upper"`` and each gene's reliability in its ``var``. Otherwise: the predictor's own outputs, no bounds.

    Parameters are those of :func:`~st_predict.tl.predict_slide` of the same name; ``num_workers`` DataLoader
    processes read the tiles ahead (default: none on 4 cores or fewer).

    Returns
    -------
    The slide as a :class:`wsidata.WSIData` with the table ``tables[key_added]`` (tiles x genes, ``obsm["spatial"]``:
    tile centres in level-0 pixels, or an AnnData input's full-resolution pixels; ``uns["st_predict"]``: the
    predictor, its licence, the geometry, the scale and the slide's settings), the tiles ``f"{key_added}_tiles"``, the
    tissue ``f"{key_added}_tissues"`` and, with ``image_mpp``, the image ``f"{key_added}_image"``.
    """
    g = model.geometry
    pitch = float(pitch_um) if pitch_um is not None else float(g.tile_um)
    check_slide_settings(tissue_method, min_tissue_fraction, pitch, mpp, image_mpp)
    opened, slide_mpp = open_at_mpp(slide, mpp, image_key, library_id, image_element)
    wsi, name = opened.wsi, opened.name
    laid = lay_tiles(wsi, name, slide_mpp, g.tile_um, g.tile_px, pitch, tissue_method, min_tissue_fraction, key_added,
                     progress, digest=True)
    tiles, n = laid.tiles, len(laid.tiles)
    max_spots = getattr(model.card, "max_spots", None)
    if g.whole_section and max_spots is not None and n > max_spots:
        raise InputError(
            f"{model.key!r} sees every tile of a slide in one call (memory grows with the square of their number): "
            f"{n} tiles of {g.tile_um:g} um every {pitch:g} um on {name} exceed its max_spots={max_spots}. Pass a "
            f"larger pitch_um= (about {pitch * np.sqrt(n / max_spots) * 1.05:.0f} um fits), predict a region of "
            "interest, or raise max_spots= in Pretrained(...) where the memory allows.")
    bounds_px = tiles.geometry.bounds[["minx", "miny", "maxx", "maxy"]].to_numpy(np.float64)
    key = {"section": f"{name} at {laid.tile_mpp:.6g} um/px", "image": laid.digest, "boxes": bounds_px}
    centres = tile_centres(tiles)
    num_workers = default_num_workers() if num_workers is None else int(num_workers)
    read = _TileReader(tile_dataset(wsi, laid.tile_key, g.tile_px), model.batch_size, num_workers)
    with thread_limits():
        raw = model._raw(read, n, centres, key)
    point, bounds = model.calibrated(raw, interval_level)
    uns = model.metadata(interval_level if bounds is not None else None)
    uns.update({
        "slide": str(name), "slide_mpp": float(slide_mpp), "patch_size_um": float(g.tile_um), "pitch_um": pitch,
        "image_size": int(g.tile_px), "tissue_level": int(laid.tissue_level), "tissue_mpp": float(laid.tissue_mpp),
        "tissue_method": tissue_method, "min_tissue_fraction": float(min_tissue_fraction),
        "upsampling": float(laid.upsampling),
    })
    layers = {"lower": bounds[0], "upper": bounds[1]} if bounds is not None else None
    write_tile_table(wsi, opened, tiles, laid.tile_key, point, model.genes_, key_added, g.tile_um, uns, layers,
                     model.gene_reliability_ if model.is_calibrated else None, image_mpp=image_mpp)
    return wsi
