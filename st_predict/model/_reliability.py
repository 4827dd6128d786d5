"""Which predictions to trust: each gene's reliability from models cross-fitted by section (or patient), the
fold models as an ensemble, split-conformal intervals per spot and gene calibrated on out-of-fold residuals (for
the expected expression, and for a measurement at a stated depth), and a flag for sections unlike the
calibration."""

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


def weighted_quantiles(scores: np.ndarray, weights: np.ndarray, level: float) -> np.ndarray:
    """:func:`conformal_quantile` of each depth's scores ``(n_depths, n, G)``: ``(n_depths, G)``."""
    return np.stack([conformal_quantile(s, weights, level) for s in scores])


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


def measurement_bounds(point, model_sd, q, calibration_depth: float, depth) -> tuple[np.ndarray, np.ndarray]:
    """Bounds for a measurement at ``depth`` (UMI per spot: a number, or one per spot): the counts model's mean
    of a measurement at that depth of the expected expression behind ``point`` (the network predicts the mean of
    a measurement at ``calibration_depth``), -+ ``q`` times the root of the model part (``model_sd``, propagated
    through that mean) squared plus the counts noise's variance at that depth. The lower bound is at least 0.

    ``q``: the calibrated quantile per gene, or the table of them per calibration depth that ``predict`` stores
    (``uns["st_predict"][key]["interval_quantiles"]``, a depth x gene DataFrame), interpolated in log depth at
    ``depth``. With ``point`` and ``model_sd`` from ``obsm`` this rebuilds ``predict``'s interval at any depth,
    e.g. each spot's own UMI count."""
    from ._depth import expected_from_measured, measured_moments, quantile_at_depth

    if isinstance(q, pd.DataFrame):
        q = quantile_at_depth(q.index.to_numpy(np.float64), q.to_numpy(np.float64), depth)
    mu = expected_from_measured(np.asarray(point, np.float64), calibration_depth)
    model_sd = np.asarray(model_sd, np.float64)
    d = np.asarray(depth, np.float64)
    mean, var, slope = measured_moments(mu, d[:, None] if d.ndim == 1 else d)
    half = q * np.sqrt((slope * model_sd) ** 2 + var)
    return np.maximum(mean - half, 0.0).astype(np.float32), (mean + half).astype(np.float32)


def expected_bounds(point, model_sd, q, calibration_depth: float) -> tuple[np.ndarray, np.ndarray]:
    """Bounds for the expected expression (``log1p`` of the expected counts per 10k, no counting noise):
    ``mu -+ q * model_sd``, ``q`` calibrated at the calibration depth with that depth's counts noise taken
    out of the residuals. The lower bound is at least 0."""
    from ._depth import expected_from_measured

    mu = expected_from_measured(point, calibration_depth)
    return np.maximum(mu - q * model_sd, 0.0).astype(np.float32), (mu + q * model_sd).astype(np.float32)


def _fold_units(obs, libraries: np.ndarray, group_key: str | None) -> tuple[list[list[str]], list[str], str]:
    """The sections each fold model holds out (one group of ``obs[group_key]`` per fold, or one section), the
    names of the folds, and what the estimates are: across groups, or within one patient."""
    from st_predict._utils import MissingKeyError

    sections = [str(s) for s in pd.unique(libraries)]
    if group_key is None:
        return ([[s] for s in sections], sections,
                "folds by section; the patients are not known (no group_key): if the sections come from one patient, "
                "reliability and intervals are within-patient estimates")
    if group_key not in obs:
        raise MissingKeyError(f"group_key={group_key!r} is not a column of adata.obs (it has: {list(obs.columns)}).")
    groups = obs[group_key].astype(str).to_numpy()
    of = {}
    for s in sections:
        found = sorted(set(groups[libraries == s]))
        if len(found) > 1:
            raise InputError(f"Section {s!r} has spots of {len(found)} groups of obs[{group_key!r}] ({found[:3]}): a "
                             "section must belong to one patient.")
        of[s] = found[0]
    names = list(dict.fromkeys(of[s] for s in sections))
    if len(names) == 1:
        return ([[s] for s in sections], sections,
                f"folds by section: every section is of one group of obs[{group_key!r}] ({names[0]!r}), so reliability "
                "and intervals are within-patient estimates")
    return ([[s for s in sections if of[s] == g] for g in names], names,
            f"folds by obs[{group_key!r}] ({len(names)} groups): each group held out once, across patients")


class ReliabilityMixin:
    """Cross-fitted gene reliability, the fold-model ensemble, conformal intervals for the expected expression and
    for a measurement at a depth, and the shift detector (``train(reliability=True)``)."""

    @property
    def has_reliability(self) -> bool:
        """Whether :meth:`train` ran with ``reliability=True`` (fold models, reliability, calibration)."""
        return getattr(self, "fold_states_", None) is not None

    def reliability_folds(self, group_key: str | None = None) -> tuple[list[list[str]], list[str], str]:
        """The training sections each fold model of ``train(reliability=True, group_key=)`` holds out, the folds'
        names and the estimates' scope (across patients or within one)."""
        return _fold_units(self.adata.obs, np.asarray(self._training_data().libraries).astype(str), group_key)

    def _fit_reliability(self, settings, accelerator, devices, progress, feature_cache=None, group_key=None) -> None:
        """Train one model per fold (a training section, or with ``group_key`` a group of them, held out; same
        genes, network, weights and settings), predict every training spot with each, and keep: each gene's
        out-of-fold reliability at the training depth and thinned to lower depths, the fold models' weights, the
        conformal scores of the out-of-fold residuals at each depth, and the shift detector's reference."""
        from st_predict.data import select_sections

        from . import _shift

        data = self._training_data()
        libraries = np.asarray(data.libraries).astype(str)
        units, unit_names, scope = self.reliability_folds(group_key)
        sections = [s for unit in units for s in unit]
        if len(units) < 2:
            raise InputError(
                f"reliability=True needs at least 2 training sections (it has {len(units)}: {unit_names}): each "
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
        # the shift detector's sample of every section's patches, read once
        rows = _shift.sample_rows(libraries)
        patches = {s: data.reader.read(rows[s]) for s in sections}
        colours = {s: _shift.colour_statistics(p) for s, p in patches.items()}
        preds = np.empty((len(units), n, len(genes)), dtype=np.float32)
        states, loso = [], {}
        for k, held in enumerate(units):
            others = [s for s in sections if s not in held]
            sub = select_sections(adata, others, library_key=setup["library_key"])
            # the full model's registry: its patch (the same micrometres and pixels), not one resolved again on the
            # fold's sections, which a fold model would train on and then not be shown at prediction
            type(self).setup_anndata(sub, source_registry=self.registry_, **setup_kw)
            fold = type(self)(sub, **{**init, "genes": genes})
            if progress is not False:
                progress_logger().info("Reliability: fold model %d/%d, %s held out", k + 1, len(units),
                                       unit_names[k] if group_key else f"section {held[0]}")
            fold.train(settings=settings, accelerator=accelerator, devices=devices, progress=progress,
                       feature_cache=feature_cache)
            preds[k] = fold.get_predicted_expression(adata, return_numpy=True)
            loso.update(_shift.loso_scores(fold.module, patches, colours, held))
            states.append({key: v.detach().cpu().clone() for key, v in fold.module.state_dict().items()})
            del fold, sub
        truth = data.targets.numpy() if isinstance(data.targets, torch.Tensor) else np.asarray(data.targets)
        fold_of = np.array([next(i for i, u in enumerate(units) if s in u) for s in libraries])
        oof = preds[fold_of, np.arange(n)]
        spread = preds.std(0)
        delta = np.maximum(np.median(spread, axis=0), 1e-6)
        # every fold unit counts the same, and within it every section
        per_section = pd.Series(libraries).value_counts()
        in_unit = {s: len(units[fold_of[np.flatnonzero(libraries == s)[0]]]) for s in sections}
        weights = np.array([1.0 / (len(units) * in_unit[s] * per_section[s]) for s in libraries])
        weights /= weights.sum()
        depth_cal = self._calibrate_depths(oof, truth, interval_scale(spread, delta), weights, libraries, genes)
        table = depth_cal.pop("table")
        table.attrs.update(folds=unit_names, scope=scope, depth=depth_cal["calibration_depth"])
        self.gene_reliability_ = table
        self.fold_states_ = states
        self.reliability_sections_ = sections
        self.reliability_scope_ = scope
        self.conformal_ = {**depth_cal, "weights": weights.astype(np.float64), "delta": delta.astype(np.float32),
                           # the out-of-fold residual SD per gene: a constant-width interval to compare against
                           "oof_residual_sd": (truth - oof).std(0).astype(np.float32)}
        self.shift_reference_ = _shift.reference(self.module, patches, colours, loso)
        self.oof_predictions_ = pd.DataFrame(oof, index=adata.obs_names, columns=genes)

    def _calibrate_depths(self, oof, truth, sig, weights, libraries, genes) -> dict:
        """The counts model's part of the calibration. With counts: the calibration depth (median UMI per spot),
        each gene's model-error scale (out-of-fold residual variance less the counts noise's, in units of
        ``sig``), and at the calibration depth and thinned to fractions of it the conformal scores and the
        reliability. Without counts (already normalised data): the scores at one depth, no counts model."""
        from st_predict._utils import REGISTRY_KEYS
        from st_predict.pp import normalize_expression

        from ._depth import THINNING_FRACTIONS, expected_from_measured, measured_moments, thin_counts

        table = reliability_table(oof, truth, libraries, genes)
        if not self.registry_["setup_args"]["is_count_data"]:
            return {"table": table, "scores": (np.abs(truth - oof) / sig)[None].astype(np.float32),
                    "depths": np.array([np.nan]), "calibration_depth": float("nan"), "scale": np.ones(len(genes), np.float32),
                    "reliability": table[["reliability", "ci_low", "ci_high"]].to_numpy().T[None], "counts_model": "none"}
        import scipy.sparse as sp

        counts = sp.csr_matrix(self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY))
        gene_idx = self.adata.var_names.get_indexer(genes)

        def library(x):
            return np.asarray((x[:, gene_idx] if self._library_size == "selected_genes" else x).sum(1)).ravel()

        lib = library(counts)
        depth = float(np.median(lib))
        mu = expected_from_measured(oof, depth)
        mean, var, slope = measured_moments(mu, lib[:, None])
        w = weights[:, None]
        excess = (w * ((truth - mean) ** 2 - var)).sum(0) / np.maximum((w * (slope * sig) ** 2).sum(0), 1e-12)
        scale = np.sqrt(np.clip(excess, 0.01, None))
        scores, rel = [], []
        for k, fraction in enumerate(THINNING_FRACTIONS):
            if fraction == 1:
                y, lib_f, t = truth, lib, table
            else:
                thinned = thin_counts(counts, fraction, seed=k)
                y = normalize_expression(thinned, gene_idx, True, self._library_size)
                lib_f, t = library(thinned), reliability_table(oof, y, libraries, genes)
            mean, var, slope = measured_moments(mu, np.maximum(lib_f, 1.0)[:, None])
            scores.append(np.abs(y - mean) / np.sqrt((slope * scale * sig) ** 2 + np.maximum(var, 1e-12)))
            rel.append(t[["reliability", "ci_low", "ci_high"]].to_numpy().T)
        return {"table": table, "scores": np.stack(scores).astype(np.float32),
                "depths": depth * np.asarray(THINNING_FRACTIONS), "calibration_depth": depth,
                "scale": scale.astype(np.float32), "reliability": np.stack(rel).astype(np.float32),
                "counts_model": "poisson"}

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

    @property
    def calibration_depth(self) -> float:
        """The median UMI per spot of the calibration (training) sections: the depth the intervals are for by
        default (NaN for a model trained on normalised data)."""
        return float(self.conformal_.get("calibration_depth", float("nan"))) if self.conformal_ else float("nan")

    def _legacy_calibration(self) -> bool:  # a model saved before the counts model: one depth, no scale
        return np.ndim(self.conformal_["scores"]) == 2

    def interval_quantiles(self, level: float = INTERVAL_LEVEL) -> pd.DataFrame:
        """The calibrated per-gene quantile at ``level`` at each calibration depth (rows: UMI per spot)."""
        cal = self.conformal_
        scores = cal["scores"][None] if self._legacy_calibration() else cal["scores"]
        depths = cal.get("depths", np.array([np.nan]))
        return pd.DataFrame(weighted_quantiles(scores, cal["weights"], level), index=pd.Index(depths, name="depth"),
                            columns=list(self.genes_))

    def intervals(self, point: np.ndarray, folds: np.ndarray, level: float = INTERVAL_LEVEL, depth=None) -> dict:
        """At ``level``: ``lower``/``upper`` for a measurement at ``depth`` (UMI per spot, a number or one per
        spot; ``None``: :attr:`calibration_depth`), ``expected_lower``/``expected_upper`` for the expected
        expression, and ``model_sd``, the model part of both, from the fold models' predictions ``folds``
        ``(K, n, G)`` and the point prediction ``point``."""
        from ._depth import check_depth, quantile_at_depth

        cal = self.conformal_
        sig = interval_scale(folds.std(0), cal["delta"])
        qs = self.interval_quantiles(level).to_numpy()
        if self._legacy_calibration() or cal.get("counts_model") == "none":
            if depth is not None:
                raise InputError("interval_depth needs a model calibrated on counts (this one has no counts model: it "
                                 "was trained on normalised data or saved by an older st_predict); pass interval_depth=None.")
            half = qs[0][None, :] * sig
            return {"lower": point - half, "upper": point + half, "expected_lower": point - half,
                    "expected_upper": point + half, "model_sd": sig, "depth": float("nan")}
        cal_depth = float(cal["calibration_depth"])
        if depth is None:
            depth = cal_depth
        elif np.ndim(depth) == 0:
            depth = check_depth(depth)
        else:
            depth = np.asarray(depth, np.float64)
            if depth.shape != (len(point),) or not np.all(np.isfinite(depth)) or np.any(depth <= 0):
                raise InputError(f"interval_depth per spot must be {len(point)} positive numbers, got shape {depth.shape}.")
        model_sd = cal["scale"][None, :] * sig
        lower, upper = measurement_bounds(point, model_sd, quantile_at_depth(cal["depths"], qs, depth), cal_depth, depth)
        e_lower, e_upper = expected_bounds(point, model_sd, qs[0][None, :], cal_depth)
        return {"lower": lower, "upper": upper, "expected_lower": e_lower, "expected_upper": e_upper,
                "model_sd": model_sd.astype(np.float32), "depth": depth}

    def intervals_from_folds(self, point: np.ndarray, folds: np.ndarray, level: float = INTERVAL_LEVEL, depth=None):
        """Lower and upper bounds for a measurement at ``depth`` (default: the calibration depth); see
        :meth:`intervals`."""
        out = self.intervals(point, folds, level, depth)
        return out["lower"], out["upper"]

    def with_reliability(self, point: np.ndarray, predict, level: float | None = INTERVAL_LEVEL,
                         ensemble: bool | None = None, depth=None) -> dict:
        """The point prediction (the full model's ``point``, or with ``ensemble`` the mean of it and the fold
        models'), and at ``level`` the bounds of :meth:`intervals`, from ``predict()`` run with each fold model."""
        folds = self.fold_predictions(predict)
        use = ENSEMBLE_DEFAULT if ensemble is None else bool(ensemble)
        if use:
            point = (folds.sum(0) + point) / (len(folds) + 1)
        out = {"point": point, "ensemble": use, "spread": folds.std(0)}
        if level is not None:
            out.update(self.intervals(point, folds, level, depth))
        return out

    def gene_reliability(self, depth: float | None = None) -> pd.DataFrame:
        """Each gene's reliability (out-of-fold PCC, its 95 % interval over sections, ``reliable``) for
        measurements at ``depth`` UMI per spot: from the calibration sections' counts thinned binomially to that
        depth (interpolated in log depth between 1 and 1/64 of :attr:`calibration_depth`; clamped outside).
        ``None``: at the calibration depth, :attr:`gene_reliability_`."""
        from ._depth import check_depth, quantile_at_depth

        if not self.has_reliability:
            raise InputError("This model has no reliability: train it with reliability=True.")
        table = self.gene_reliability_.copy()
        if depth is None:
            return table
        depth = check_depth(depth, "depth")
        cal = self.conformal_
        if self._legacy_calibration() or cal.get("counts_model") == "none":
            raise InputError("gene_reliability(depth=) needs a model calibrated on counts; this one has none.")
        rel = cal["reliability"]  # (n_depths, 3, G)
        for i, col in enumerate(("reliability", "ci_low", "ci_high")):
            table[col] = quantile_at_depth(cal["depths"], rel[:, i, :], depth)
        table["reliable"] = table["ci_low"] > RELIABLE_ABOVE
        table = table.drop(columns=[c for c in table.columns if c.startswith("pcc_")])
        table.attrs = {**self.gene_reliability_.attrs, "depth": depth}
        return table

    @staticmethod
    def shift_sample(libraries) -> dict[str, np.ndarray]:
        """The spots (positions) of each section of ``libraries`` that the shift detector reads: up to 128 per
        section, drawn with a fixed seed."""
        from . import _shift

        return _shift.sample_rows(np.asarray(libraries))

    def shift_flags(self, patches_of: dict) -> dict[str, dict]:
        """Per section (its sampled uint8 patches): the image-feature distance to the calibration sections, the
        threshold and whether it is past it (``unlike_calibration``); empty for a model without a reference."""
        from . import _shift

        ref = getattr(self, "shift_reference_", None)
        return {} if ref is None else _shift.section_flags(self.module, ref, patches_of)

    def reliability_summary(self) -> dict:
        """What ``predict`` stores beside the intervals: the per-gene reliability table and the fold sections."""
        return {"gene_reliability": self.gene_reliability_.copy(), "reliability_sections": list(self.reliability_sections_),
                "reliability_scope": str(getattr(self, "reliability_scope_", None) or "")}

    def reliability_description(self) -> str:
        """The model summary's line on reliability (empty without it)."""
        if not self.has_reliability:
            return ""
        depth = self.calibration_depth
        at = f"; intervals for a measurement at {depth:.0f} UMI per spot by default" if np.isfinite(depth) else ""
        return (f"\nReliability: {len(self.fold_states_)} fold models, "
                f"{getattr(self, 'reliability_scope_', None) or 'folds by section'}{at}.")

    def _reliability_into(self, target, point: pd.DataFrame, key_added: str, predict, level, ensemble, depth,
                          read_patches, libraries) -> tuple[pd.DataFrame, dict]:
        """``predict``'s part for a model with reliability: the point (ensemble or not), the bounds written into
        ``target.obsm`` and the ``uns`` entry's fields. ``read_patches(indices)`` reads ``target``'s patches and
        ``libraries`` are its spots' sections (both ``None``: the training AnnData, which is not scored for
        shift)."""

        out = self.with_reliability(point.to_numpy(), predict, level, ensemble, depth)
        df = pd.DataFrame(out["point"], index=point.index, columns=point.columns)
        frame = lambda a: pd.DataFrame(np.asarray(a, np.float32), index=point.index, columns=point.columns)  # noqa: E731
        for bound in ("lower", "upper", "expected_lower", "expected_upper"):
            if bound in out:
                target.obsm[f"{key_added}_{bound}"] = frame(out[bound])
        if "model_sd" in out:
            target.obsm[f"{key_added}_model_sd"] = frame(out["model_sd"])
        entry = {**self.reliability_summary(), "ensemble": out["ensemble"],
                 "interval_level": -1.0 if level is None else float(level)}
        if level is not None:
            d = out["depth"]
            entry.update(interval_depth=float(d) if np.ndim(d) == 0 else -1.0, calibration_depth=self.calibration_depth,
                         interval_quantiles=self.interval_quantiles(level), counts_model=str(self.conformal_.get(
                             "counts_model", "none")), library_size=str(self._library_size))
        flags = {}
        if read_patches is not None:
            rows = self.shift_sample(libraries)
            flags = self.shift_flags({s: read_patches(idx) for s, idx in rows.items()})
        entry.update(self.flag_sections(flags))
        return df, entry

    def flag_sections(self, flags: dict[str, dict]) -> dict:
        """The ``uns`` fields of the shift detector's ``flags`` (``shift``, ``intervals_trusted``), warning once
        for the sections past the threshold."""
        from st_predict._utils import InputWarning

        unlike = [s for s, f in flags.items() if f["unlike_calibration"]]
        if unlike:
            detail = ", ".join(f"{s!r} (distance {flags[s]['score']:.2f} > {flags[s]['threshold']:.2f})" for s in unlike)
            warnings.warn(
                f"{len(unlike)} section(s) unlike the calibration sections in their image features: {detail}. Their "
                "intervals and reliability are not calibrated for them: marked untrusted (uns['st_predict'][key]"
                "['intervals_trusted']). Another stain, scanner or tissue than the training sections' breaks them.",
                InputWarning, stacklevel=4)
        return {"shift": {s: dict(f) for s, f in flags.items()},
                "intervals_trusted": {s: not f["unlike_calibration"] for s, f in flags.items()}}
