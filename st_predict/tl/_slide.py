"""Whole-slide prediction: tissue detection, a tile grid at a physical pitch, batched trunk + translator.

Slides are opened, tissue is found and tiles are laid out by the scverse whole-slide stack
(wsidata's ``open_wsi`` and tile dataset, lazyslide's ``find_tissues`` / ``tile_tissues``), installed
with ``pip install 'st-predict[wsi]'``. Only the tiles of the batches in flight are in memory; the
predictions (one float32 per tile and gene) go into one array allocated up front.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

from st_predict._utils import (
    PREDICT_BATCH_SIZE,
    PREDICTED_KEY,
    PRETRAINED_KEY,
    InputError,
    MissingKeyError,
    index_batches,
    interactive,
    run_batches,
    single_thread_worker,
    thread_limits,
    user_stacklevel,
)

from ._slide_bins import add_bins, check_bins
from ._slide_open import default_num_workers, open_at_mpp
from ._slide_tiles import (
    add_overview,
    check_slide_settings,
    lay_tiles,
    tile_centres,
    tile_dataset,
    write_tile_table,
    wsi_stack,
)


def _tile_geometry_um(tiles, slide_mpp: float) -> tuple[float, float]:
    """Side and pitch (median distance to the nearest other tile centre) of tile shapes, in micrometres."""
    from scipy.spatial import cKDTree

    bounds = tiles.geometry.bounds
    side = float(np.median(bounds["maxx"] - bounds["minx"])) * slide_mpp
    xy = tile_centres(tiles)
    pitch = float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1])) * slide_mpp if len(xy) > 1 else side
    return side, pitch


def predict_slide(
    model,
    slide,
    mpp: float | None = None,
    pitch_um: float | None = None,
    tile_size_um: float | None = None,
    batch_size: int = PREDICT_BATCH_SIZE,
    tta: bool | None = None,
    key_added: str | None = None,
    progress: bool | None = None,
    num_workers: int | None = None,
    image_key: str | None = None,
    library_id: str | None = None,
    patch_size_um: float | None = None,
    image_element: str | None = None,
    features_key: str | None = None,
    tissue_method: str = "entropy",
    min_tissue_fraction: float = 0.7,
    image_mpp: float | None = 2.0,
    interval_level: float | None = 0.9,
    ensemble: bool | None = None,
    interval_depth: float | None = None,
    bin_um: float | None = None,
):
    """Predict expression over the tissue of a whole H&E slide that has no expression.

    Finds the tissue (lazyslide's ``find_tissues``), lays tiles on it every ``pitch_um``
    micrometres (default: the training data's spot pitch, :attr:`spot_pitch_um_`), each the
    physical size of the training patches (:attr:`patch_geometry_`), reads them lazily at the
    network's resolution through wsidata and runs trunk + translator on each batch. A slide scanned
    coarser than that resolution is tiled at its own pixels and each tile upsampled to the network's
    input, as spot-level :meth:`predict` resamples its crops: an :class:`~st_predict.InputWarning` gives
    both resolutions, and the factor is recorded (``uns["st_predict"]["upsampling"]``); a slide so coarse
    that a tile covers fewer than 16 pixels is refused. Needs ``pip install 'st-predict[wsi]'``.

    Parameters
    ----------
    model
        A trained :class:`~st_predict.NH2ST` (``model.predict_slide(slide, ...)`` calls this), or a
        :class:`~st_predict.Pretrained` predictor, which tiles at its own geometry and takes the parameters below
        but ``tile_size_um``, ``batch_size``, ``tta``, ``features_key``, ``ensemble``, ``interval_depth`` and
        ``bin_um`` (see :meth:`~st_predict.Pretrained.predict_slide`).
    slide
        A slide file (SVS, NDPI, pyramidal TIFF / OME-TIFF, anything OpenSlide or tiffslide
        reads), a plain JPEG, PNG or TIFF with ``mpp=`` (decoded into memory up to 2 GiB of pixels,
        about 715 Mpx; a larger TIFF is read lazily, a larger JPEG or PNG refused), a :class:`wsidata.WSIData`, a :class:`spatialdata.SpatialData` (or the path of
        its ``.zarr`` store) with an RGB uint8 image element, or an AnnData with a Visium-style
        image in ``uns["spatial"][library_id]["images"]`` (its µm/px taken from
        ``metadata["pixel_size_um"]`` and the image's scale factor, as st_predict's readers
        write them). The input is not modified.
    mpp
        Micrometres per level-0 pixel, for a slide whose metadata has none (it overrides the
        metadata otherwise). SpatialData images carry no µm/px: pass it.
    pitch_um
        Distance between tile centres in micrometres; smaller than the spot pitch for denser maps.
    tile_size_um
        Tile side in micrometres; default: the training patches' (``patch_geometry_.size_um``).
        Needed only for a model whose training data had no pixel size.
    batch_size
        Tiles per forward pass.
    tta
        Average over the 8 flips/rotations of each tile (default: the model's setting).
    key_added
        Name of the table (``sdata.tables[key_added]``; default ``"nh2st"``, ``"pretrained"`` for a pretrained
        predictor); the tiles are the shapes
        ``f"{key_added}_tiles"`` and the tissue polygons ``f"{key_added}_tissues"``.
    progress
        Print the tile count and show a progress bar (default: on a terminal or in a notebook).
    num_workers
        DataLoader worker processes that read and resize tiles while the network runs
        (default: none on 4 cores or fewer, where they slow the network down; otherwise half
        the cores, at most 8; ``0`` reads in this process).
    image_element
        The image element of a SpatialData (needed when it has several).
    image_key
        The image of an AnnData, ``uns["spatial"][library_id]["images"][image_key]`` (default ``"hires"``),
        as in :meth:`~st_predict.NH2ST.setup_anndata`. For a SpatialData, a deprecated name of
        ``image_element``.
    library_id
        The library of an AnnData whose ``uns["spatial"]`` holds several.
    patch_size_um
        Deprecated name of ``tile_size_um``.
    tissue_method
        How lazyslide's ``find_tissues`` tells tissue from glass: ``"entropy"`` (default: local
        entropy of the haematoxylin/eosin colour space, so a smooth stain haze or smear on the glass
        is not tissue) or ``"otsu"`` (lazyslide's default: a threshold on brightness, which keeps pale
        eosin haze as tissue). On HER2ST C2, written as a slide, ``"otsu"`` took 3.1 Mpx of the pink
        haze beside the section as tissue and left 1.6 % of the measured spots outside it; ``"entropy"``
        took 0.1 Mpx there and every spot inside.
    min_tissue_fraction
        Drop tiles whose area is less than this fraction tissue (lazyslide's ``tile_tissues`` with
        ``background_fraction = 1 - min_tissue_fraction``). Each tile's fraction is written to the
        table (``obs["tissue_fraction"]``).
    image_mpp
        Resolution, in micrometres per pixel, of the image of the slide put into the output (a lazy
        multiscale image element ``f"{key_added}_image"`` over the tiles' frame, so spatialdata-plot draws
        the tiles over the H&E); ``None``: no image. It is read from the slide only when the output is
        written or drawn.
    interval_level, ensemble, interval_depth
        For a model trained with ``reliability=True``: the tiles' bounds at this level for a measurement at
        ``interval_depth`` UMI per spot go into the table's layers ``"lower"`` and ``"upper"``, those for the
        expected expression into ``"expected_lower"`` and ``"expected_upper"`` (``None``: none), each gene's
        reliability into its ``var``, and ``ensemble`` is as in :meth:`predict`. The fold models then predict
        every tile too (K more passes over the tiles). The shift detector scores 128 sampled tiles against
        the calibration sections: past its threshold the slide is warned of and ``uns["st_predict"]
        ["intervals_trusted"]`` is ``False`` (not scored from ``features_key``, which has no pixels).
    features_key
        Predict from tile features already in ``slide`` instead of tiling and encoding it: the
        table ``slide.tables[features_key]`` that LazySlide's ``zs.tl.feature_extraction`` wrote
        (``"{model}_{tile_key}"``), one row per tile of its tile shapes. The features must be those of
        this model's frozen encoder on tiles of its patch (``as_tile_model().tile_kwargs``); only the
        head and translator run. LazySlide's transforms may resize and centre-crop where st_predict
        only resizes, so the values can differ slightly from ``predict_slide`` on the same tiles.
    bin_um
        Also predict squares of ``bin_um`` micrometres on the tissue with the sub-spot head (``train_bins``):
        table ``f"{key_added}_bins"`` over the squares ``f"{key_added}_bin_shapes"``, as :meth:`predict_bins`.

    Returns
    -------
    The slide as a SpatialData object (:class:`wsidata.WSIData`) with a table of tiles x genes
    (``X``: predictions on the ``log1p`` scale of counts per 10k, ``obsm["spatial"]``: tile centres
    in level-0 pixels, ``uns["st_predict"]``: the slide and settings) annotating the tile shapes.
    The table alone is an AnnData: ``sdata.tables[key_added]``. For an AnnData input its
    ``obsm["spatial"]`` is in the AnnData's full-resolution pixels and its ``uns["spatial"]``
    holds the library's images, so ``sc.pl.spatial`` draws the tiles over the H&E. The image
    ``f"{key_added}_image"`` (see ``image_mpp``) is the slide, downsampled, in the tiles' frame.
    """
    from ._slide_pretrained import is_pretrained, predict_slide_pretrained

    if is_pretrained(model):
        theirs = {"tile_size_um": tile_size_um, "patch_size_um": patch_size_um, "tta": tta, "features_key": features_key,
                  "ensemble": ensemble, "interval_depth": interval_depth, "bin_um": bin_um}
        given = sorted(k for k, v in theirs.items() if v is not None)
        if given or batch_size != PREDICT_BATCH_SIZE:
            raise InputError(f"{', '.join(given or ['batch_size'])}: NH2ST's settings, which a pretrained predictor has "
                             "not (it tiles at model.geometry; its batch size is Pretrained(batch_size=)).")
        return predict_slide_pretrained(model, slide, mpp, pitch_um, key_added or PRETRAINED_KEY, progress, num_workers,
                                        image_key, library_id, image_element, tissue_method, min_tissue_fraction,
                                        image_mpp, interval_level)
    key_added = PREDICTED_KEY if key_added is None else key_added
    if patch_size_um is not None:
        warnings.warn("predict_slide(patch_size_um=) is deprecated: use tile_size_um=.", FutureWarning,
                      stacklevel=user_stacklevel())
        tile_size_um = patch_size_um if tile_size_um is None else tile_size_um
    model._check_if_trained(warn=False)
    check_bins(model, bin_um, features_key)
    wsi_stack()  # the wsi extra is installed (a clear error otherwise)
    tile_um = tile_size_um if tile_size_um is not None else model.patch_geometry_.size_um
    if tile_um is None:
        raise InputError(
            "This model records no physical patch size (its training data had no pixel size): pass "
            "tile_size_um= (the side of its training patches in micrometres)."
        )
    if not tile_um > 0:
        raise InputError(f"tile_size_um must be positive, got {tile_um!r}.")
    pitch = pitch_um if pitch_um is not None else (model.spot_pitch_um_ or tile_um)
    check_slide_settings(tissue_method, min_tissue_fraction, pitch, mpp, image_mpp)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")
    opened, slide_mpp = open_at_mpp(slide, mpp, image_key, library_id, image_element)
    wsi, name = opened.wsi, opened.name
    size = model.module.image_size
    tta = model.tta_ if tta is None else bool(tta)
    tissue_level = tissue_mpp = bounds = None
    upsampling = 1.0
    tissue_key = f"{key_added}_tissues"
    if features_key is not None:
        tile_key, tiles, pred = _from_tile_features(model, wsi, features_key, batch_size)
        tta = False
        tile_um, pitch = _tile_geometry_um(tiles, slide_mpp)
        model_um = model.patch_geometry_.size_um if model.patch_geometry_ is not None else None
        if model_um and abs(tile_um - model_um) > 0.1 * model_um:
            warnings.warn(
                f"The tiles of {features_key!r} are {tile_um:.1f} um wide but the model was trained on {model_um:.1f} "
                "um patches: lay them with model.as_tile_model().tile_kwargs.", UserWarning, stacklevel=user_stacklevel())
    else:
        num_workers = default_num_workers() if num_workers is None else int(num_workers)
        laid = lay_tiles(wsi, name, slide_mpp, tile_um, size, pitch, tissue_method, min_tissue_fraction, key_added,
                         progress)
        tile_key, tiles, upsampling = laid.tile_key, laid.tiles, laid.upsampling
        tissue_level, tissue_mpp, stride_um = laid.tissue_level, laid.tissue_mpp, laid.stride_um
        if progress is None:
            progress = interactive()
        # a network that predicts from its neighbourhood reads the neighbouring tiles, one training pitch away
        neighbors = (_tile_neighbors(model, tiles, slide_mpp, stride_um) if model.module.context != "patch"
                     else None)
        with thread_limits():
            pred = _predict_tiles(model, wsi, tile_key, len(tiles), batch_size, num_workers, tta, progress, neighbors)
            if model.has_reliability:
                bounds = model.with_reliability(pred, lambda: _predict_tiles(model,
                    wsi, tile_key, len(tiles), batch_size, num_workers, tta, False, neighbors), interval_level,
                    ensemble, interval_depth)
                pred = bounds["point"]
                bounds["flags"] = model.flag_sections(model.shift_flags(
                    {str(name): _sampled_tiles(model, wsi, tile_key, len(tiles))}))
    layers = {k: bounds[k] for k in ("lower", "upper", "expected_lower", "expected_upper")
              if bounds is not None and k in bounds}
    uns = {
        "slide": str(name), "slide_mpp": float(slide_mpp), "patch_size_um": float(tile_um),
        "pitch_um": float(pitch), "image_size": int(size), "tta": bool(tta),
        "tissue_level": -1 if tissue_level is None else int(tissue_level), "features_key": features_key or "",
        "tissue_mpp": -1.0 if tissue_mpp is None else float(tissue_mpp),
        "tissue_method": tissue_method if features_key is None else "", "min_tissue_fraction": float(min_tissue_fraction),
        "upsampling": float(upsampling),
        "scale": "log1p(counts / library size * 1e4)",
    }
    if bounds is not None:
        uns.update(ensemble=bool(bounds["ensemble"]), interval_level=-1.0 if interval_level is None else float(interval_level),
                   **bounds.get("flags", {}))
        if "depth" in bounds:
            uns.update(interval_depth=float(bounds["depth"]), calibration_depth=model.calibration_depth)
    write_tile_table(wsi, opened, tiles, tile_key, pred, model.genes_, key_added, tile_um, uns, layers,
                     model.gene_reliability_ if bounds is not None else None, image_mpp=None)
    if bin_um is not None:
        add_bins(model, wsi, _tile_dataset(model, wsi, tile_key), tile_key, pred, slide_mpp, bin_um, batch_size,
                 tissue_key, opened.to_fullres, key_added)
    add_overview(wsi, slide_mpp, image_mpp, key_added)
    return wsi


def _from_tile_features(model, wsi, features_key: str, batch_size: int):
    """The tile key, tile shapes and predictions of a feature table written by ``zs.tl.feature_extraction``."""
    module = model.module
    if module.trunk_mode != "frozen":
        raise InputError("features_key needs a model with a frozen encoder: a fine-tuned one is not what "
                         "extracted the features.")
    if features_key not in wsi.tables:
        raise MissingKeyError(f"The slide has no table {features_key!r} (tables: {list(wsi.tables)}).")
    table = wsi.tables[features_key]
    tile_key = table.uns.get("spatialdata_attrs", {}).get("region")
    tile_key = tile_key[0] if isinstance(tile_key, list) else tile_key
    if tile_key not in wsi.shapes:
        raise MissingKeyError(f"The features {features_key!r} annotate {tile_key!r}, which is not among the slide's "
                              "shapes.")
    feats = np.asarray(table.X.toarray() if hasattr(table.X, "toarray") else table.X, dtype=np.float32)
    width = module.encoder_info.out_channels
    if feats.ndim != 2 or feats.shape[1] != width:
        raise InputError(
            f"The features {features_key!r} have {feats.shape[-1]} columns but the model's encoder "
            f"{module.encoder_info.name!r} gives {width}: they come from another encoder."
        )
    tiles = wsi.shapes[tile_key]
    order = pd.Index(table.obs["tile_id"].to_numpy()).get_indexer(tiles["tile_id"].to_numpy())
    if (order < 0).any():
        raise InputError(f"{int((order < 0).sum())} tiles of {tile_key!r} have no row in {features_key!r}.")
    feats = torch.from_numpy(feats[order])
    context = module.context != "patch"

    def one_batch(idx: np.ndarray) -> torch.Tensor:
        fm = {"fmaps": feats[torch.as_tensor(idx), :, None, None].to(module.device)}
        return module.latent(fm) if context else module.predict_expression(fm)

    out = run_batches(one_batch, index_batches(len(tiles), batch_size), len(tiles), module)
    out = out if out is not None else torch.zeros((0, len(model.genes_)))
    if context:
        slide_mpp = wsi.properties.mpp
        neighbors = _tile_neighbors(model, tiles, slide_mpp, _tile_geometry_um(tiles, slide_mpp)[1])
        every = np.arange(len(tiles))
        out = model._translate_neighborhoods(out, every, every, neighbors, batch_size)
    return tile_key, tiles, out.numpy()


def _tile_neighbors(model, tiles, slide_mpp: float, pitch_um: float) -> np.ndarray:
    """Each tile's ``K`` neighbours for a ``context="neighbors"`` network: the nearest tiles of its sub-grid
    at about the training spot pitch (every ``round(spot pitch / tile pitch)``-th tile; the adjacent tiles
    when the pitch is unknown or the tiles are at least that far apart)."""
    from st_predict.pp import grid_neighbors

    centres = tile_centres(tiles)
    every = max(1, int(round(model.spot_pitch_um_ / pitch_um))) if model.spot_pitch_um_ else 1
    return grid_neighbors(centres, pitch_um / slide_mpp, every, model.module.n_neighbors)


def as_tile_model(model, tta: bool | None = None):
    """This model as a lazyslide-models tile-prediction model, for LazySlide users::

        tiles = model.as_tile_model()
        zs.pp.tile_tissues(wsi, **tiles.tile_kwargs)
        zs.tl.tile_prediction(wsi, tiles)  # one column per gene in wsi["tiles"]

    ``tta``: the model's setting by default. Needs the ``wsi`` extra (lazyslide-models). A model with
    ``context="neighbors"`` cannot be one (tile_prediction gives it no neighbouring tiles): it raises an
    :class:`~st_predict.InputError` that says to use :meth:`predict_slide`."""
    from ._tile_model import NH2STTileModel

    return NH2STTileModel(model, tta=tta)


def _tile_dataset(model, wsi, tile_key: str):
    """wsidata's dataset of the tiles ``tile_key`` at the network's input size."""
    return tile_dataset(wsi, tile_key, model.module.image_size)


def _sampled_tiles(model, wsi, tile_key: str, n_tiles: int) -> torch.Tensor:
    """uint8 ``(m, 3, S, S)`` patches of up to the shift detector's number of tiles, drawn with a fixed seed."""
    dataset = _tile_dataset(model, wsi, tile_key)
    rows = model.shift_sample(np.zeros(n_tiles, dtype=int))["0"]
    return torch.stack([torch.as_tensor(np.asarray(dataset[int(i)]["image"])) for i in rows]).permute(0, 3, 1, 2).contiguous()


def _predict_tiles(model, wsi, tile_key: str, n_tiles: int, batch_size: int, num_workers: int, tta: bool,
                   progress: bool, neighbors: np.ndarray | None = None) -> np.ndarray:
    """Predictions ``(n_tiles, n_genes)`` of the tiles ``tile_key``, read in batches by wsidata. A
    ``context="neighbors"`` network first embeds every tile, then predicts each from the latents of its
    ``neighbors`` (``(n_tiles, K)``) too."""
    dataset = _tile_dataset(model, wsi, tile_key)
    # workers read and resize the next batches while the network runs on this one
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         worker_init_fn=single_thread_worker)
    module = model.module
    context = module.context != "patch"
    if context and neighbors is None:  # pragma: no cover - predict_slide always gives them
        raise RuntimeError("A context='neighbors' network needs the tiles' neighbours.")

    def one_batch(batch) -> torch.Tensor:
        img = {"patches": batch["image"].permute(0, 3, 1, 2).contiguous().to(module.device)}
        return module.latent(img, tta=tta) if context else module.predict_expression(img, tta=tta)

    pred = run_batches(one_batch, loader, n_tiles, module, bool(progress) and interactive(), "Predicting tiles")
    if context:
        every = np.arange(n_tiles)
        pred = model._translate_neighborhoods(pred, every, every, neighbors, batch_size)
    return pred.numpy()
