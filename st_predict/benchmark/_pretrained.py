"""Pretrained predictors (:class:`~st_predict.Pretrained`) in the leave-one-section-out table: zero-shot, calibrated or
adapted on each fold's training sections, on the fold's genes, with reliability columns from their calibration."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from st_predict._utils import InputError

from ._methods import Fold

#: how a pretrained predictor is fitted on a fold, and the suffix of its row
MODES = {"zero-shot": "zero-shot", "calibrate": "calibrated", "adapt": "adapted"}
#: the predictors of the lazyslide-models registry with a recorded geometry
PREDICTORS = ("path2space", "stpath", "deepspotm")


class PretrainedMethod:
    """A predictor with released weights, fitted on a fold by calibrating, adapting or not at all.

    - ``mode="zero-shot"``: its own outputs, nothing fitted (their scale is the predictor's: PCC is comparable with
      the other rows, MSE and MAE are not);
    - ``"calibrate"``: :meth:`~st_predict.Pretrained.calibrate` on the fold's training sections (one scale map for
      all genes onto ``log1p`` counts per 10k, per-gene reliability, split-conformal intervals);
    - ``"adapt"``: :meth:`~st_predict.Pretrained.adapt`, one affine map per gene as well.

    The fold's genes (chosen on its training sections, as for every row) that the predictor cannot output are
    counted in ``missing_genes_`` (the row's ``n_genes_not_output``) and predicted by their mean over the training
    spots: a constant, so their PCC is NaN and counted among the row's NaN genes, never dropped. ``memory`` is shared
    by the rows of one run (:func:`pretrained_methods`), so a section's features are computed once for every fold and
    mode. ``**kwargs`` go to :class:`~st_predict.Pretrained` (``model_path=``, ``encoder=``, ``encoder_weights=``...).
    """

    def __init__(self, key: str, mode: str = "calibrate", memory: dict | None = None, **kwargs):
        if mode not in MODES:
            raise InputError(f"mode must be one of {list(MODES)}, got {mode!r}.")
        self.key, self.mode, self.kwargs = str(key), mode, dict(kwargs)
        self.memory = {} if memory is None else memory
        self.model_ = None
        self.missing_genes_: list[str] | None = None

    @property
    def sees_context(self) -> bool:
        """STPath attends over every spot of the section; the others predict each spot from its own tile."""
        return self.model_ is not None and bool(self.model_.geometry.whole_section)

    def _where(self, fold: Fold) -> dict:
        setup = fold.extra.get("setup", {})
        return {"library_key": setup.get("library_key"), "spatial_key": setup.get("spatial_key", "spatial"),
                "image_key": setup.get("image_key", "hires")}

    def fit(self, fold: Fold) -> None:
        from st_predict import Pretrained

        self.model_ = model = Pretrained(self.key, genes=list(fold.genes), unknown_genes="drop",
                                         feature_cache=self.memory, **self.kwargs)
        self.missing_genes_ = list(model.dropped_genes_)
        self.columns_ = np.asarray([list(fold.genes).index(g) for g in model.genes_], dtype=int)
        self.mean_ = np.asarray(fold.y_train, np.float64).mean(0)
        if self.mode != "zero-shot":
            (model.calibrate if self.mode == "calibrate" else model.adapt)(fold.train, **self._where(fold))

    def _outputs(self, fold: Fold, level: float | None):
        raw = self.model_.raw_outputs(fold.test, **self._where(fold))
        return self.model_.calibrated(raw, level)

    def predict(self, fold: Fold) -> np.ndarray:
        point, _ = self._outputs(fold, None)
        out = np.tile(self.mean_, (fold.test.n_obs, 1))
        out[:, self.columns_] = point
        return out

    def reliability_metrics(self, fold: Fold, pred: np.ndarray, truth: np.ndarray) -> dict | None:
        """The reliability columns of a calibrated row on the genes it outputs (``None`` zero-shot): per-gene coverage
        of the 80 % and 90 % intervals and their width, the Spearman correlation across genes of the calibration's
        reliability with the PCC achieved on the held-out section, and the reliable genes' count and PCC."""
        if not self.model_.is_calibrated:
            return None
        from ._reliability_metrics import interval_columns, reliability_columns

        cols, truth = self.columns_, np.asarray(truth)[:, self.columns_]
        single = np.asarray(pred)[:, cols]
        bounds = {level: self._outputs(fold, level)[1] for level in (0.8, 0.9)}
        rel = self.model_.gene_reliability_
        out = {"n_genes_scored": len(cols)}
        out.update(reliability_columns(rel["reliability"].to_numpy(float), rel["reliable"].to_numpy(bool), single,
                                       truth))
        out.update(interval_columns(bounds, single, truth))
        return out


def pretrained_methods(keys: Sequence[str] = PREDICTORS, modes: Sequence[str] = tuple(MODES),
                       options: Mapping[str, Mapping] | None = None) -> dict[str, Callable[[], PretrainedMethod]]:
    """``name -> factory`` of the pretrained rows: for each predictor ``key`` one row per mode (``"path2space
    zero-shot"``, ``"path2space calibrated"``, ``"path2space adapted"``). ``options[key]`` are that predictor's
    :class:`~st_predict.Pretrained` arguments (its weights, encoder...). The rows of one call share their features."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise InputError(f"Unknown modes {unknown}: choose among {list(MODES)}.")
    memory: dict = {}
    options = {k: dict(v) for k, v in (options or {}).items()}
    out = {}
    for key in keys:
        for mode in modes:
            out[f"{key} {MODES[mode]}"] = (lambda key=key, mode=mode: PretrainedMethod(key, mode, memory,
                                                                                       **options.get(key, {})))
    return out
