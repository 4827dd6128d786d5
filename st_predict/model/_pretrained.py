"""A pretrained expression predictor of the lazyslide-models registry (STPath, Path2Space, DeepSpot-M) with NH2ST's
user API: predict spots and slides with no training, calibrate on a few measured sections, adapt, save a reference."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from st_predict._utils import (
    PREDICT_BATCH_SIZE,
    PRETRAINED_KEY,
    InputError,
    MissingFileError,
    MissingKeyError,
    progress_logger,
    staged_folder,
)

from ._pretrained_calibration import apply_map, calibration, interval_half_width
from ._pretrained_cards import card_info, geometry_for, load_card, predictor_class

logger = logging.getLogger(__name__)

#: the file :meth:`Pretrained.save` writes (with ``calibration.npz`` when calibrated)
PRETRAINED_FILE = "pretrained.json"


class Pretrained:
    """A predictor with released weights, run as st_predict runs NH2ST: no training, no paired data needed.

    >>> model = st_predict.Pretrained("path2space", genes=["ERBB2", "ESR1"])
    >>> model.predict(adata)                   # adata.obsm["pretrained"]: spots x genes
    >>> model.calibrate(measured)              # scale, reliability and 90 % intervals from measured sections
    >>> model.adapt(measured)                  # per-gene affine maps, scored on sections they were not fitted on

    Parameters
    ----------
    key
        A feature- or tile-prediction key of the lazyslide-models registry: ``"path2space"`` (CTransPath
        features), ``"stpath"`` (GigaPath features and the spots' coordinates, a whole section at a time) or
        ``"deepspotm"`` (its own Midnight backbone on the tiles; ``pip install deepspotm``). Their tile geometry is
        recorded (:attr:`geometry`, with where each value comes from); another key needs ``tile_um`` and ``tile_px``.
    genes
        The genes to predict (symbols); a gene outside the predictor's vocabulary is an error that names it.
        Default: the predictor's whole panel (STPath needs ``genes``: its panel is 38,982 Ensembl IDs).
    unknown_genes
        ``"drop"``: leave the genes outside the vocabulary out instead (listed in :attr:`dropped_genes_`; an error
        still when none is known).
    encoder, encoder_weights
        The feature encoder of a feature predictor, as NH2ST's ``encoder`` (default: the one the predictor was
        trained on, ``"lazyslide:<its vision_encoder>"``, with its published weights or ``encoder_weights``, a
        local file). Its features are cached per section (``feature_cache``) under the same key as NH2ST's frozen
        encoder, so one section is embedded once for every predictor and for NH2ST's frozen heads.
    tile_um, tile_px
        Override the recorded tile geometry (micrometres of tissue per tile, pixels per tile side).
    feature_cache
        A folder (or :class:`~st_predict.dataloaders.FeatureCache`, or ``True`` for the default one) to keep the
        features on disk; they are also kept in memory for this object's later calls. A ``dict``: kept in it
        instead, in memory, shared by the predictors given the same dict (one section embedded once for all).
    batch_size
        Tiles per encoder call.
    **predictor_kwargs
        Passed to the registry class: ``model_path`` and ``gene_voc_path`` (local weights files), ``token``,
        ``organ_type`` / ``tech_type`` (STPath), ``source`` (DeepSpot-M), ``max_spots`` (STPath).
    """

    def __init__(self, key: str, *, genes: Sequence[str] | None = None, encoder=None, encoder_weights=None,
                 tile_um: float | None = None, tile_px: int | None = None, feature_cache=None,
                 batch_size: int = PREDICT_BATCH_SIZE, unknown_genes: str = "raise", **predictor_kwargs):
        self.key = str(key)
        cls, self.task = predictor_class(self.key)
        self.info = card_info(cls)
        self.geometry = geometry_for(self.key, tile_um, tile_px)
        self._tile_overrides = {"tile_um": tile_um, "tile_px": tile_px}
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = int(batch_size)
        self.predictor_kwargs = dict(predictor_kwargs)
        genes = None if genes is None else [str(g) for g in genes]
        if unknown_genes not in ("raise", "drop"):
            raise InputError(f"unknown_genes must be 'raise' or 'drop', got {unknown_genes!r}.")
        self.unknown_genes = unknown_genes
        self.dropped_genes_: list[str] = []
        if genes is not None and (len(genes) == 0 or len(set(genes)) != len(genes)):
            raise InputError("genes must be a non-empty list of distinct gene symbols.")
        self.card = self._load(cls, genes)
        self.genes_ = self._check_genes(genes)
        self.encoder_arg, self.encoder_weights = encoder, encoder_weights
        self.encoder, self.encoder_spec = self._build_encoder(cls) if self.task == "feature" else (None, None)
        self.feature_cache = feature_cache
        self._memory: dict[str, torch.Tensor] = feature_cache if isinstance(feature_cache, dict) else {}
        self.calibration_: dict | None = None

    # -- building -----------------------------------------------------------------------------------------------
    def _load(self, cls, genes):
        import inspect

        kwargs = dict(self.predictor_kwargs)
        if genes is not None and "genes" in inspect.signature(cls.__init__).parameters:
            kwargs["genes"] = genes
        if self.key == "stpath" and genes is None:
            raise InputError("STPath's whole panel is 38,982 Ensembl IDs: pass genes= (symbols) to choose columns.")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                card = load_card(self.key, cls, kwargs)
            except ValueError as err:
                if "vocabulary" in str(err) and genes is not None:  # STPath: none of the genes is known
                    raise InputError(f"None of the genes {genes[:10]} is in {self.key!r}'s vocabulary.") from err
                raise
        for w in seen:  # STPath drops unknown genes with a warning: here they are an error (checked below)
            if "vocabulary" not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return card

    def _vocabulary(self) -> list[str] | None:
        """Every gene the predictor can output: STPath's symbols, a tile model's own panel (DeepSpot-M's, whatever
        ``genes`` the card was given), else the card's gene list or columns."""
        card = self.card
        if self.key == "stpath":
            return list(card.vocab.symbol2ensembl)
        names = getattr(getattr(card, "model", None), "gene_names", None)
        if names is not None:
            return [str(g) for g in names]
        for attr in ("genes", "columns"):
            value = getattr(card, attr, None)
            if value is not None and not callable(value):
                return [str(g) for g in value]
        return None

    def _check_genes(self, genes) -> list[str]:
        vocab = self._vocabulary()
        if genes is None:
            if vocab is None:
                raise InputError(f"{self.key!r} does not say which columns it predicts: pass genes=.")
            return vocab
        if vocab is not None:
            known = set(vocab)
            missing = [g for g in genes if g not in known]
            if missing and (self.unknown_genes == "raise" or len(missing) == len(genes)):
                raise MissingKeyError(f"{len(missing)} of the {len(genes)} genes are not in {self.key!r}'s vocabulary "
                                      f"({len(vocab)} genes): {missing[:10]}. Drop them from genes= (or pass "
                                      "unknown_genes='drop').")
            if missing:
                self.dropped_genes_ = missing
                genes = [g for g in genes if g in known]
                if isinstance(getattr(self.card, "genes", None), list):  # a tile model that selects its outputs
                    self.card.genes = list(genes)
        return list(genes)

    def _build_encoder(self, cls):
        from st_predict.nn import build_encoder, encoder_name

        name = self.encoder_arg
        if name is None:
            vision = getattr(cls, "features_model_name", None) or self.info["vision_encoder"]
            if vision is None:
                raise InputError(f"{self.key!r} names no feature encoder: pass encoder=.")
            name = f"lazyslide:{vision}"
        net, spec = build_encoder(name, self.encoder_weights, image_size=self.geometry.tile_px)
        if spec.input_size is not None and int(spec.input_size) != self.geometry.tile_px:
            raise InputError(f"The encoder {encoder_name(name)!r} reads {spec.input_size} px tiles but {self.key!r} was "
                             f"trained on {self.geometry.tile_px} px tiles: pass tile_px={spec.input_size} to use it.")
        return net.eval(), spec

    # -- description ----------------------------------------------------------------------------------------------
    @property
    def description(self) -> str:
        """The predictor, its licence and use, its input, its genes and its calibration."""
        i, g = self.info, self.geometry
        use = {True: "commercial use allowed", False: "non-commercial use only", None: "use terms not stated"}
        lines = [
            f"Pretrained predictor {self.key!r} ({self.task} prediction, {i['param_size'] or '?'} parameters): "
            f"licence {i['license']}, {use[i['commercial']]}" + (", gated weights (accept the terms on the Hub, "
                                                                  "HF_TOKEN)" if i["gated"] else "") + ".",
            f"Input: tiles of {g.tile_um:g} um at {g.tile_px} px ({g.tile_um / g.tile_px:.3g} um/px)"
            + (", every spot of a section in one call" if g.whole_section else "")
            + (f", features from {self.encoder_spec.name} ({self.encoder_spec.weights})" if self.encoder_spec else "")
            + f". Geometry from: {g.source}.",
            f"Genes: {len(self.genes_)}. Raw outputs: {g.scale}.",
        ]
        cal = self.calibration_
        if cal is None:
            lines.append("Not calibrated: outputs are on the predictor's own scale, with no reliability or intervals "
                         "(model.calibrate(measured sections)).")
        else:
            rel = cal["reliability"]
            lines.append(f"Calibrated on {len(cal['sections'])} section(s), {cal['n_spots']} spots "
                         f"({', '.join(cal['sections'][:5])}); adapted: {cal['adapt'] or 'no'}; "
                         f"{int(rel['reliable'].sum())} of {len(rel)} genes reliable.")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.description

    @property
    def is_calibrated(self) -> bool:
        return self.calibration_ is not None

    @property
    def gene_reliability_(self) -> pd.DataFrame:
        """Per gene: the PCC within each calibration section of predictions from maps not fitted on it, their mean
        (``reliability``), a 95 % interval over sections and ``reliable`` (its lower end above 0), as NH2ST's."""
        if self.calibration_ is None:
            raise InputError("This predictor is not calibrated: call model.calibrate(adata) with measured sections.")
        return self.calibration_["reliability"]

    # -- features and raw outputs ---------------------------------------------------------------------------------
    def _cache(self):
        from st_predict.dataloaders import FeatureCache

        fc = self.feature_cache
        if fc is None or fc is False or isinstance(fc, dict):
            return None
        return fc if isinstance(fc, FeatureCache) else FeatureCache(None if fc is True else fc)

    def _cached(self, key: dict, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        from st_predict.dataloaders import FeatureCache

        text = FeatureCache.key_text(key)
        if text not in self._memory:
            disk = self._cache()
            self._memory[text] = disk.get_or_compute(key, compute) if disk is not None else compute()
        return self._memory[text]

    def _features(self, read: Callable[[np.ndarray], torch.Tensor], n: int, key: dict) -> torch.Tensor:
        """The encoder's ``(n, D)`` features of ``n`` tiles (``read(indices) -> uint8 (m, 3, S, S)``), stored as
        NH2ST's frozen encoder stores its pooled maps ``(n, D, 1, 1)``."""
        from st_predict.dataloaders import maps_key, state_digest
        from st_predict.nn import prepare_patches

        spec, net = self.encoder_spec, self.encoder
        if not hasattr(self, "_weights_digest"):
            self._weights_digest = state_digest(net)
        full = maps_key(spec, self._weights_digest, self.geometry.tile_px, 1, True, key["section"], key["image"],
                        key["boxes"])

        def compute() -> torch.Tensor:
            out = []
            with torch.inference_mode():
                for start in range(0, n, self.batch_size):
                    x = prepare_patches(read(np.arange(start, min(n, start + self.batch_size))), spec.mean, spec.std)
                    if not spec.channels_last:
                        x = x.contiguous()
                    y = net(x)
                    out.append((y[:, :, None, None] if y.ndim == 2 else y.mean((2, 3), keepdim=True)).float().cpu())
            return torch.cat(out)

        return self._cached(full, compute)[:, :, 0, 0]

    def _tile_outputs(self, read, n: int, key: dict) -> torch.Tensor:
        """A tile predictor's outputs for ``n`` tiles, cached as features are (one entry per section)."""
        transform = self.card.get_transform() if hasattr(self.card, "get_transform") else None
        full = {"kind": "pretrained-tile-outputs", "predictor": self.key, "genes": list(self.genes_),
                "weights": {k: str(v) for k, v in self.predictor_kwargs.items() if k != "token"},
                "tile_px": self.geometry.tile_px, "section": key["section"], "image": key["image"], "boxes": key["boxes"]}

        def compute() -> torch.Tensor:
            out = []
            for start in range(0, n, self.batch_size):
                tiles = read(np.arange(start, min(n, start + self.batch_size)))
                if transform is not None:
                    batch = torch.stack([transform(t.permute(1, 2, 0).numpy()) for t in tiles])
                else:
                    batch = tiles.float() / 255
                res = self.card.predict(batch)
                out.append(torch.as_tensor(np.column_stack([np.asarray(res[g]) for g in self.genes_]), dtype=torch.float32))
            return torch.cat(out)

        return self._cached(full, compute)

    def _raw(self, read, n: int, coords: np.ndarray, key: dict) -> np.ndarray:
        """The predictor's own outputs ``(n, G)`` for the tiles of one section (or slide)."""
        if self.task == "tile":
            return self._tile_outputs(read, n, key).numpy()
        feats = self._features(read, n, key).numpy()
        kwargs = {"coords": np.asarray(coords, np.float32)} if getattr(self.card, "needs_coords", False) else {}
        try:
            res = self.card.predict(feats, **kwargs)
        except ValueError as err:
            if "shape" in str(err):
                raise InputError(f"The encoder {self.encoder_spec.name!r} gives {feats.shape[1]}-dim features, which "
                                 f"{self.key!r} cannot read ({err}). Use the encoder it was trained on.") from err
            raise InputError(str(err)) from err
        return np.column_stack([np.asarray(res[g], np.float32) for g in self.genes_])

    def _section_readers(self, adata: AnnData, library_key, spatial_key, image_key):
        """Per section: ``(rows, read, coords, key)`` of its spots' tiles at the predictor's geometry."""
        from st_predict.dataloaders import image_digest
        from st_predict.pp import (
            PIXEL_SIZE_KEY,
            make_patch_reader,
            section_pixel_sizes,
            spot_coordinates,
            spot_libraries,
        )

        if adata.n_obs == 0:
            raise InputError("The AnnData has no spots (n_obs == 0).")
        libraries = spot_libraries(adata, library_key)
        sizes = section_pixel_sizes(adata, libraries)
        unknown = [s for s, v in sizes.items() if v is None]
        if unknown:
            raise MissingKeyError(
                f"{self.key!r} reads tiles of {self.geometry.tile_um:g} um, but section(s) {unknown[:5]} have no pixel "
                f"size: set adata.uns['spatial'][section]['metadata'][{PIXEL_SIZE_KEY!r}] (micrometres per "
                "full-resolution pixel).")
        px = {s: self.geometry.tile_um / v for s, v in sizes.items()}
        reader = make_patch_reader(adata, spatial_key, image_key, library_key, px, self.geometry.tile_px)
        coords = spot_coordinates(adata, spatial_key)
        out = []
        for lib in pd.unique(reader.libraries):
            rows = np.flatnonzero(reader.libraries == lib)
            key = {"section": str(lib), "image": image_digest(reader.images[lib]), "boxes": reader.boxes[rows]}
            out.append((rows, lambda i, rows=rows: reader.read(rows[i]), coords[rows] * 1.0, key))
        return out

    def raw_outputs(self, adata: AnnData, library_key: str | None = None, spatial_key: str = "spatial",
                    image_key: str = "hires") -> np.ndarray:
        """The predictor's own outputs ``(n_spots, n_genes)`` for ``adata``'s spots, before any calibration."""
        out = np.empty((adata.n_obs, len(self.genes_)), np.float32)
        for rows, read, coords, key in self._section_readers(adata, library_key, spatial_key, image_key):
            out[rows] = self._raw(read, len(rows), coords, key)  # a section at a time (STPath needs all its spots)
        return out

    # -- calibrated predictions -----------------------------------------------------------------------------------
    def calibrated(self, raw: np.ndarray, interval_level: float | None = None):
        """The predictor's outputs ``raw`` (:meth:`raw_outputs`) as point predictions on the targets' scale and, at
        ``interval_level``, their conformal bounds ``(lower, upper)`` (``None`` without a level or a calibration);
        not calibrated: ``raw`` itself."""
        level = interval_level
        cal = self.calibration_
        if cal is None:
            return raw, None
        point = np.maximum(apply_map(cal["params"], raw), 0.0)  # the targets are log1p of counts: never below 0
        if level is None:
            return point, None
        q = interval_half_width(cal, float(level))[None, :]
        return point, (np.maximum(point - q, 0.0).astype(np.float32), (point + q).astype(np.float32))

    def predict(self, adata: AnnData, key_added: str = PRETRAINED_KEY, library_key: str | None = None,
                spatial_key: str = "spatial", image_key: str = "hires", interval_level: float | None = 0.9,
                progress: bool = False) -> pd.DataFrame:
        """Predict ``adata``'s spots into ``adata.obsm[key_added]`` (a spots x genes DataFrame) and return it.

        Calibrated (:meth:`calibrate`): on the ``log1p(counts / library size * 1e4)`` scale of NH2ST's targets, with
        ``obsm[f"{key_added}_lower"]`` / ``[f"{key_added}_upper"]``, split-conformal bounds that hold each gene's
        measured value in ``interval_level`` of a section's spots, for sections like the calibration ones. Not
        calibrated: the predictor's own outputs (see :attr:`description`), no bounds. ``uns["st_predict"][key_added]``
        records the predictor, its licence, the geometry and the scale. The spots need an image and a pixel size
        (``uns["spatial"][section]["metadata"]["pixel_size_um"]``), not expression."""
        if progress:
            progress_logger().info("%s: %d spots", self.key, adata.n_obs)
        raw = self.raw_outputs(adata, library_key, spatial_key, image_key)
        point, bounds = self.calibrated(raw, interval_level)
        df = pd.DataFrame(point, index=adata.obs_names.copy(), columns=list(self.genes_))
        adata.obsm[key_added] = df
        meta = self.metadata(interval_level if bounds is not None else None)
        if bounds is not None:
            adata.obsm[f"{key_added}_lower"] = pd.DataFrame(bounds[0], index=df.index, columns=df.columns)
            adata.obsm[f"{key_added}_upper"] = pd.DataFrame(bounds[1], index=df.index, columns=df.columns)
            meta["gene_reliability"] = self.gene_reliability_.copy()
        adata.uns.setdefault("st_predict", {})[key_added] = meta
        return df

    def metadata(self, interval_level: float | None) -> dict:
        """What a prediction records of this predictor (``uns["st_predict"][key]``)."""
        cal = self.calibration_
        return {
            "model": "Pretrained", "predictor": self.key, "license": self.info["license"],
            "commercial": "unknown" if self.info["commercial"] is None else bool(self.info["commercial"]),
            "gated": self.info["gated"], "tile_um": float(self.geometry.tile_um), "tile_px": int(self.geometry.tile_px),
            "encoder": self.encoder_spec.name if self.encoder_spec is not None else self.key,
            "calibrated": cal is not None, "adapted": "" if cal is None or cal["adapt"] is None else cal["adapt"],
            "scale": "log1p(counts / library size * 1e4)" if cal is not None else self.geometry.scale,
            "interval_level": -1.0 if interval_level is None else float(interval_level),
        }

    def get_predicted_expression(self, adata: AnnData, library_key: str | None = None, return_numpy: bool = False,
                                 **kwargs):
        """The (calibrated, where calibrated) predictions of ``adata``'s spots, without writing into it."""
        point, _ = self.calibrated(self.raw_outputs(adata, library_key, **kwargs))
        return point if return_numpy else pd.DataFrame(point, index=adata.obs_names.copy(), columns=list(self.genes_))

    # -- whole slides ---------------------------------------------------------------------------------------------
    def predict_slide(self, slide, **kwargs):
        """Predict the tissue of a whole H&E slide (a slide file, a plain image with ``mpp=``, a SpatialData, a
        WSIData or an AnnData with an image), as NH2ST's :func:`~st_predict.tl.predict_slide` does, with tiles of
        this predictor's :attr:`geometry` every ``pitch_um`` micrometres (default: side by side). Each tile goes
        through the encoder once; a second call on the same slide runs none. STPath refuses more tiles than its
        ``max_spots`` before encoding any. Calibrated, the table has the bounds (layers ``"lower"`` / ``"upper"``)
        and each gene's reliability (``var``). Takes ``mpp``, ``pitch_um``, ``key_added`` (default
        ``"pretrained"``), ``progress``, ``num_workers``, ``image_key``, ``library_id``, ``image_element``,
        ``tissue_method``, ``min_tissue_fraction``, ``image_mpp`` and ``interval_level``, as there. Returns the
        slide as a :class:`wsidata.WSIData` with the table ``tables[key_added]``."""
        from st_predict import tl

        return tl.predict_slide(self, slide, **kwargs)

    def predict_slides(self, slides, out_dir, **kwargs):
        """Predict many slides on dask into ``out_dir/<slide id>.zarr`` with a manifest to resume from, as
        :func:`~st_predict.tl.predict_slides`; each worker loads this predictor again from a saved reference (the
        weights must be where they were: the same ``model_path`` or Hugging Face cache on every worker)."""
        from st_predict import tl

        return tl.predict_slides(self, slides, out_dir, **kwargs)

    # -- calibration and adaptation -------------------------------------------------------------------------------
    def calibrate(self, adata: AnnData, library_key: str | None = None, layer: str | None = None,
                  adapt: str | None = None, spatial_key: str = "spatial", image_key: str = "hires") -> pd.DataFrame:
        """Calibrate on measured sections (``adata`` with counts in ``X`` or ``layers[layer]``, one or more sections).

        - the predictor's outputs are mapped onto ``log1p(counts / library size * 1e4)`` by one affine map for all
          genes that matches their mean and spread over the sections' spots (the order of the predictions is kept);
        - with ``adapt`` (see :meth:`adapt`), also one map per gene;
        - each gene's reliability is its PCC within each section, from maps fitted on the other sections;
        - the intervals are split-conformal on the absolute residuals of those predictions, each section weighing
          the same, as NH2ST's.

        Returns :attr:`gene_reliability_`. With one section the reliability has no interval over sections and the
        scale map is fitted on the section it is scored on (two numbers); three or more are better."""
        from st_predict.metrics import measured_expression
        from st_predict.pp import spot_libraries

        missing = [g for g in self.genes_ if g not in adata.var_names]
        if missing:
            raise MissingKeyError(f"{len(missing)} of the predictor's genes are not measured in adata.var_names, e.g. "
                                  f"{missing[:5]}: construct the predictor with genes= those measured.")
        libraries = spot_libraries(adata, library_key)
        truth = measured_expression(adata, self.genes_, layer).to_numpy(np.float32)
        raw = self.raw_outputs(adata, library_key, spatial_key, image_key)
        self.calibration_ = calibration(raw, truth, libraries, self.genes_, adapt)
        return self.gene_reliability_

    def adapt(self, adata: AnnData, method: str = "affine", library_key: str | None = None, layer: str | None = None,
              **kwargs) -> pd.DataFrame:
        """:meth:`calibrate` with one map per gene fitted on ``adata``'s measured sections (at least two):
        ``"affine"`` (``a_g + b_g * p``, weighted least squares) or ``"shift"`` (``a_g + p``). The reliability and
        intervals come from each section's predictions by maps fitted on the other sections, so they say whether the
        adaptation helps on a section it has not seen."""
        return self.calibrate(adata, library_key=library_key, layer=layer, adapt=method, **kwargs)

    # -- saving -----------------------------------------------------------------------------------------------------
    def save(self, dir_path: str | os.PathLike, overwrite: bool = False, **_ignored) -> None:
        """Save a reference to the weights (the registry key and the arguments, paths as given; never the weights)
        and the calibration, into ``dir_path`` (``pretrained.json``, ``calibration.npz``, ``reliability.csv``)."""
        target = Path(dir_path)
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise FileExistsError(f"{target} exists and is not empty: pass overwrite=True.")
        from st_predict import __version__

        encoder = self.encoder_arg
        record = {
            "format": 1, "st_predict": __version__, "key": self.key, "genes": list(self.genes_),
            "encoder": None if encoder is None else ("module" if isinstance(encoder, torch.nn.Module) else str(encoder)),
            "encoder_weights": None if self.encoder_weights is None else os.fspath(self.encoder_weights),
            "tile_um": self._tile_overrides["tile_um"], "tile_px": self._tile_overrides["tile_px"],
            "batch_size": self.batch_size,
            "predictor_kwargs": {k: (os.fspath(v) if isinstance(v, os.PathLike) else v)
                                 for k, v in self.predictor_kwargs.items() if k != "token"},
            "geometry": self.geometry.as_dict(), "info": self.info,
        }
        with staged_folder(target, replace=True) as tmp:
            cal = self.calibration_
            if cal is not None:
                a, b = cal["params"]["scale"]
                adapt = cal["params"]["adapt"]
                np.savez(tmp / "calibration.npz", scale=np.array([a, b]), scores=cal["scores"], weights=cal["weights"],
                         oof=cal["oof"], adapt=np.stack(adapt) if adapt is not None else np.zeros((0,)))
                cal["reliability"].to_csv(tmp / "reliability.csv")
                record["calibration"] = {"sections": cal["sections"], "n_spots": cal["n_spots"], "adapt": cal["adapt"]}
            (tmp / PRETRAINED_FILE).write_text(json.dumps(record, indent=1, default=str))

    @classmethod
    def load(cls, dir_path: str | os.PathLike, encoder=None, **overrides) -> Pretrained:
        """A saved predictor: its weights read again from where they were (``overrides``, e.g. ``model_path=``, give
        other files on another machine; a missing file names that fix); its calibration restored."""
        path = Path(dir_path) / PRETRAINED_FILE
        if not path.is_file():
            raise MissingFileError(f"No saved pretrained predictor at {dir_path} (expected {path}).")
        rec = json.loads(path.read_text())
        if rec.get("encoder") == "module" and encoder is None:
            raise InputError("This predictor used a user encoder module: pass it again, Pretrained.load(path, "
                             "encoder=<the module>).")
        kwargs = {**rec["predictor_kwargs"], **{k: v for k, v in overrides.items()
                                                if k not in ("encoder_weights", "feature_cache", "batch_size")}}
        model = cls(rec["key"], genes=rec["genes"], encoder=encoder if encoder is not None else rec["encoder"],
                    encoder_weights=overrides.get("encoder_weights", rec["encoder_weights"]),
                    tile_um=rec["tile_um"], tile_px=rec["tile_px"], feature_cache=overrides.get("feature_cache"),
                    batch_size=overrides.get("batch_size", rec["batch_size"]), **kwargs)
        if "calibration" in rec:
            z = np.load(Path(dir_path) / "calibration.npz")
            adapt = z["adapt"]
            info = rec["calibration"]
            model.calibration_ = {
                "params": {"scale": tuple(float(v) for v in z["scale"]),
                           "adapt": (adapt[0], adapt[1]) if adapt.size else None},
                "scores": z["scores"], "weights": z["weights"], "oof": z["oof"],
                "reliability": pd.read_csv(Path(dir_path) / "reliability.csv", index_col=0),
                "sections": info["sections"], "n_spots": info["n_spots"], "adapt": info["adapt"],
            }
        return model
