"""Which predictions to trust: each gene's reliability from models cross-fitted by section, the fold models as
an ensemble, and split-conformal intervals per spot and gene calibrated on out-of-fold residuals."""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import warnings

import numpy as np
import pandas as pd
import torch

from st_predict._utils import InputError, progress_logger
from st_predict.metrics import pcc_per_gene

logger = logging.getLogger(__name__)

#: default coverage of the per-spot intervals
INTERVAL_LEVEL = 0.9
#: whether ``predict`` returns the mean of the fold models and the full model (``ensemble=None``), rather than the
#: full model alone. Measured on the five HER2ST leave-one-section-out folds (benchmarks/her2st_reliability.py):
#: ensemble PCC 0.287 against 0.286 for the model alone, better on 1 fold (C4, +0.011), worse on 3 (by up to
#: 0.004): no clear gain for K more forward passes, so the model alone stays the default.
ENSEMBLE_DEFAULT = False
#: a gene is flagged ``reliable`` when the lower end of its reliability's 95 % interval is above this
RELIABLE_ABOVE = 0.0


def reliability_table(oof: np.ndarray, truth: np.ndarray, libraries: np.ndarray, genes) -> pd.DataFrame:
    """Per gene: the out-of-fold PCC within each section, averaged over sections (``reliability``), with a 95 %
    t-interval over sections (``ci_low``, ``ci_high``), the number of sections it was defined on, and
    ``reliable`` (``ci_low`` above :data:`RELIABLE_ABOVE`)."""
    from scipy import stats

    sections = list(pd.unique(libraries))
    per = np.stack([pcc_per_gene(oof[libraries == s], truth[libraries == s]) for s in sections])  # (K, G)
    n = np.isfinite(per).sum(0)
    with warnings.catch_warnings():  # a gene constant in every section has no PCC: NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, sd = np.nanmean(per, axis=0), np.nanstd(per, axis=0, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = stats.t.ppf(0.975, np.maximum(n - 1, 1)) * sd / np.sqrt(np.maximum(n, 1))
    half = np.where(n > 1, half, np.nan)
    table = pd.DataFrame({"reliability": mean, "ci_low": mean - half, "ci_high": mean + half, "n_sections": n},
                         index=pd.Index([str(g) for g in genes], name="gene"))
    for s, row in zip(sections, per, strict=True):
        table[f"pcc_{s}"] = row
    table["reliable"] = table["ci_low"] > RELIABLE_ABOVE
    return table


def conformal_quantile(scores: np.ndarray, weights: np.ndarray, level: float) -> np.ndarray:
    """Per column of ``scores`` ``(n, G)``: the weighted split-conformal quantile at ``level``, with the
    finite-sample correction ``level * (n + 1) / n`` (``inf`` when it exceeds 1). ``weights`` (n,) sum to 1."""
    if not 0 < level < 1:
        raise InputError(f"level must be between 0 and 1 (exclusive), got {level!r}.")
    n = len(scores)
    target = level * (n + 1) / n
    if target > 1:
        return np.full(scores.shape[1], np.inf)
    order = np.argsort(scores, axis=0)
    sorted_scores = np.take_along_axis(scores, order, axis=0)
    cum = np.cumsum(weights[order], axis=0)
    idx = (cum < target - 1e-12).sum(0)
    return sorted_scores[np.minimum(idx, n - 1), np.arange(scores.shape[1])]


def interval_scale(spread: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """The width unit of a spot's interval: the fold models' spread plus the gene's typical spread ``delta``
    (which keeps intervals finite where the models happen to agree)."""
    return spread + delta[None, :]


@contextlib.contextmanager
def _using_module(model, module):
    """Run ``model``'s prediction code with another module (a fold model's) in place of its own."""
    own = model.module
    model.module = module
    try:
        yield
    finally:
        model.module = own


class ReliabilityMixin:
    """Cross-fitted gene reliability, the fold-model ensemble and conformal intervals (``train(reliability=True)``)."""

    @property
    def has_reliability(self) -> bool:
        """Whether :meth:`train` ran with ``reliability=True`` (fold models, reliability, calibration)."""
        return getattr(self, "fold_states_", None) is not None

    def _fit_reliability(self, settings, accelerator, devices, progress, feature_cache=None) -> None:
        """Train one model per training section with that section held out (same genes, network, weights and
        settings), predict every training spot with each, and keep: each gene's out-of-fold reliability, the
        fold models' weights, and the conformal scores of the out-of-fold residuals."""
        from st_predict.data import select_sections

        data = self._training_data()
        libraries = np.asarray(data.libraries).astype(str)
        sections = [str(s) for s in pd.unique(libraries)]
        if len(sections) < 2:
            raise InputError(
                f"reliability=True needs at least 2 training sections (it has {len(sections)}: {sections}): each "
                "section is held out once to see how well the genes are predicted on a section the model never saw; "
                "with one section there is nothing to hold out."
            )
        init = dict(self.init_params_["non_kwargs"])
        if init.get("weights") == "state dict":
            raise InputError("reliability=True retrains from the same starting weights: give weights by name or path, "
                             "not as a state dict.")
        setup = self.registry_["setup_args"]
        setup_names = set(inspect.signature(type(self).setup_anndata).parameters) - {"adata", "cls"}
        setup_kw = {k: v for k, v in setup.items() if k in setup_names}
        adata = self.adata
        n, genes = adata.n_obs, list(self.genes_)
        preds = np.empty((len(sections), n, len(genes)), dtype=np.float32)
        states = []
        for k, held in enumerate(sections):
            others = [s for s in sections if s != held]
            sub = select_sections(adata, others, library_key=setup["library_key"])
            # the full model's registry: its patch (the same micrometres and pixels), not one resolved again on the
            # fold's sections, which a fold model would train on and then not be shown at prediction
            type(self).setup_anndata(sub, source_registry=self.registry_, **setup_kw)
            fold = type(self)(sub, **{**init, "genes": genes})
            if progress is not False:
                progress_logger().info("Reliability: fold model %d/%d, section %s held out", k + 1, len(sections), held)
            fold.train(settings=settings, accelerator=accelerator, devices=devices, progress=progress,
                       feature_cache=feature_cache)
            preds[k] = fold.get_predicted_expression(adata, return_numpy=True)
            states.append({key: v.detach().cpu().clone() for key, v in fold.module.state_dict().items()})
            del fold, sub
        truth = data.targets.numpy() if isinstance(data.targets, torch.Tensor) else np.asarray(data.targets)
        fold_of = np.array([sections.index(s) for s in libraries])
        oof = preds[fold_of, np.arange(n)]
        spread = preds.std(0)
        delta = np.maximum(np.median(spread, axis=0), 1e-6)
        scores = np.abs(truth - oof) / interval_scale(spread, delta)
        counts = pd.Series(libraries).value_counts()
        weights = 1.0 / (len(sections) * counts.loc[libraries].to_numpy())  # every section counts the same
        self.gene_reliability_ = reliability_table(oof, truth, libraries, genes)
        self.fold_states_ = states
        self.reliability_sections_ = sections
        self.conformal_ = {"scores": scores.astype(np.float32), "weights": weights.astype(np.float64),
                           "delta": delta.astype(np.float32),
                           # the out-of-fold residual SD per gene: a constant-width interval to compare against
                           "oof_residual_sd": (truth - oof).std(0).astype(np.float32)}
        self.oof_predictions_ = pd.DataFrame(oof, index=adata.obs_names, columns=genes)

    def _fold_modules(self):
        for state in self.fold_states_:
            module = copy.deepcopy(self.module)
            module.load_state_dict(state)
            module.eval()
            yield module

    def fold_predictions(self, predict) -> np.ndarray:
        """``(K, ...)``: ``predict()`` (a function of no arguments that runs this model's prediction) with each
        fold model in place of the model."""
        if not self.has_reliability:
            raise InputError("This model has no fold models: train it with reliability=True.")
        out = []
        for module in self._fold_modules():
            with _using_module(self, module):
                out.append(np.asarray(predict(), dtype=np.float32))
        return np.stack(out)

    def intervals_from_folds(self, point: np.ndarray, folds: np.ndarray, level: float = INTERVAL_LEVEL):
        """Lower and upper bounds ``point -+ q_g * (spread + delta_g)`` at ``level``, from the fold models'
        predictions ``folds`` ``(K, n, G)`` and the calibrated per-gene quantile ``q_g``."""
        cal = self.conformal_
        q = conformal_quantile(cal["scores"], cal["weights"], level)
        half = q[None, :] * interval_scale(folds.std(0), cal["delta"])
        return point - half, point + half

    def with_reliability(self, point: np.ndarray, predict, level: float | None = INTERVAL_LEVEL,
                         ensemble: bool | None = None) -> dict:
        """The point prediction (the full model's ``point``, or with ``ensemble`` the mean of it and the fold
        models'), and at ``level`` the lower and upper bounds, from ``predict()`` run with each fold model."""
        folds = self.fold_predictions(predict)
        use = ENSEMBLE_DEFAULT if ensemble is None else bool(ensemble)
        if use:
            point = (folds.sum(0) + point) / (len(folds) + 1)
        out = {"point": point, "ensemble": use, "spread": folds.std(0)}
        if level is not None:
            out["lower"], out["upper"] = self.intervals_from_folds(point, folds, level)
        return out

    def reliability_summary(self) -> dict:
        """What ``predict`` stores beside the intervals: the level and the per-gene reliability table."""
        return {"gene_reliability": self.gene_reliability_.copy(), "reliability_sections": list(self.reliability_sections_)}
