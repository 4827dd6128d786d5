"""Trust beyond the training patient, made on one patient: NH2ST's intervals, reliability and shift detector on
leave-one-section-out folds of HER2ST, with the held-out section shifted as another patient's would be (CPU).

For each held-out section NH2ST (default recipe, random init) is trained on the other four with
``reliability=True``. The held-out section is then changed in ways fixed before anything was measured:

- ``thin2000`` / ``thin650``: its counts thinned binomially to a median of ~2,000 / ~650 UMI per spot
  (one draw, seed 0); the image is unchanged;
- ``hed_mild``: its image's haematoxylin x1.10, eosin x0.90 (twice the training jitter, 0.05);
- ``colour``: haematoxylin x1.30, eosin x0.75, then a scanner-like gamma 1.3 and a colour cast
  (R x0.90, B x1.08);
- ``colour_thin650``: both.

The held-out section is only scored: never seen by training, gene selection, calibration or the detector's
threshold. Per fold and shift:

- coverage at 80 / 90 % of the interval for a **measurement at the section's own depth** (each spot's UMI
  count), its mean width, its width against the per-gene central marginal interval of the measured values
  with the same per-gene coverage (an oracle that knows the held-out distribution), and its mean CRPS
  (a Gaussian of the interval's width) against one width per gene (the same mean width at every spot);
- coverage of the **expected-expression** interval against the full-depth measurement (~10,000 UMI: close to,
  not equal to, the expected value, so this coverage is a lower bound);
- the Spearman correlation, across genes, of ``gene_reliability(depth=the section's median UMI)`` with the PCC
  each gene reached against the (thinned) measurement;
- whether the shift detector fired (``uns[...]["intervals_trusted"]``) and its distance and threshold;
- ``today_*``: the same for the calibration before the counts model (the conformal quantile of
  ``|y - oof| / (spread + delta)`` at the training depth, and ``gene_reliability_``), rebuilt from the same
  trained models, so that only the calibration differs.

Usage:  python benchmarks/her2st_reliability_shift.py [--data ../shared/data/her2st] [--folds C2 ...] [--models DIR]
        (--models: save each fold's trained model there, and load it on a later run, so that a change to the
        calibration or the scoring is measured in minutes, on the same networks; ~225 MB per fold)
Writes benchmarks/results/her2st_reliability_shift.json (after every fold).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

LEVELS = (0.8, 0.9)
TARGET_UMI = {"thin2000": 2000, "thin650": 650}
# image shift: (haematoxylin factor, eosin factor, gamma, RGB cast)
IMAGE_SHIFTS = {"plain": None, "hed_mild": (1.10, 0.90, 1.0, (1.0, 1.0, 1.0)),
                "colour": (1.30, 0.75, 1.3, (0.90, 1.0, 1.08))}
SHIFTS = {"none": ("plain", None), "thin2000": ("plain", "thin2000"), "thin650": ("plain", "thin650"),
          "hed_mild": ("hed_mild", None), "colour": ("colour", None), "colour_thin650": ("colour", "thin650")}


def recolour(img: np.ndarray, h: float, e: float, gamma: float, cast, rows: int = 512) -> np.ndarray:
    """uint8 RGB ``img`` with its stain amounts (Ruifrok-Johnston HED) scaled by ``h`` and ``e``, then
    ``x ** gamma * cast`` on [0, 1]; processed in row blocks (a whole slide in float would not fit)."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    out = np.empty_like(img)
    scale = np.array([h, e, 1.0])
    cast = np.asarray(cast, np.float32)
    for r in range(0, img.shape[0], rows):
        x = img[r: r + rows].astype(np.float32)
        od = -np.log((x + 1.0) / 256.0)
        od = ((od @ hed_from_rgb.astype(np.float32)) * scale.astype(np.float32)) @ rgb_from_hed.astype(np.float32)
        rgb = np.clip((256.0 * np.exp(-od) - 1.0) / 255.0, 0, 1) ** gamma * cast
        out[r: r + rows] = np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)
    return out


def _shifted_image(test, spec):
    if spec is None:
        return test
    out = test.copy()
    for entry in out.uns["spatial"].values():
        for name, img in entry["images"].items():
            entry["images"][name] = recolour(img, *spec)
    return out


def _library(counts) -> np.ndarray:
    return np.asarray(counts.sum(1)).ravel().astype(np.float64)


def _weighted_conformal_quantile(scores: np.ndarray, weights: np.ndarray, level: float) -> np.ndarray:
    """Per gene, the weighted quantile of ``scores`` at ``level * (n + 1) / n`` (the calibration before the
    counts model; ``weights`` sum to 1)."""
    n = len(scores)
    order = np.argsort(scores, axis=0)
    cum = np.cumsum(weights[order], axis=0)
    idx = (cum < min(level * (n + 1) / n, 1.0) - 1e-12).sum(0)
    return np.take_along_axis(scores, order, axis=0)[np.minimum(idx, n - 1), np.arange(scores.shape[1])]


def _interval_scores(prefix, lo, hi, truth, level, point) -> dict:
    """:func:`st_predict.metrics.interval_scores` under this benchmark's keys (sharpness and CRPS at 90 % only)."""
    from st_predict.metrics import interval_scores

    tag = f"{prefix}_{int(round(level * 100))}"
    sc = interval_scores(lo, hi, truth, point, level)
    out = {f"coverage_{tag}": sc["coverage"], f"coverage_min_gene_{tag}": sc["coverage_min_gene"],
           f"width_{tag}": sc["width"]}
    if level == 0.9:
        out.update({f"width_ratio_marginal_{tag}": sc["width_ratio_marginal"], f"crps_{prefix}": sc["crps"],
                    f"crps_{prefix}_one_width_per_gene": sc["crps_one_width_per_gene"]})
    return out


def _fold(adata, held, sections, seed, models: Path | None = None) -> dict:
    import torch
    from scipy.stats import spearmanr

    from st_predict import NH2ST, InputWarning
    from st_predict.data import select_sections
    from st_predict.metrics import measured_expression, pcc_per_gene
    from st_predict.model import expected_bounds, measurement_bounds, thin_counts

    train = select_sections(adata, [s for s in sections if s != held])
    test = select_sections(adata, [held])
    torch.manual_seed(seed)
    NH2ST.setup_anndata(train, library_key="section", patch_size=224)
    saved = None if models is None else models / f"held_out_{held}"
    t = time.perf_counter()
    if saved is not None and (saved / "model.pt").is_file():  # trained by an earlier run: only the scoring reruns
        model = NH2ST.load(str(saved), adata=train)
    else:
        model = NH2ST(train, encoder_weights="random")
        model.train(progress=False, reliability=True)
        if saved is not None:
            model.save(str(saved), overwrite=True)
    seconds_train = time.perf_counter() - t
    genes = list(model.genes_)
    cal = model.conformal_
    cal_depth = model.calibration_depth
    # today's calibration, rebuilt from the same models: |y - oof| / (spread + delta) at the training depth
    t = time.perf_counter()
    train_folds = model.fold_predictions(lambda: model.get_predicted_expression(train, return_numpy=True))
    y_train = model._training_data().targets.numpy()
    old_scores = np.abs(y_train - model.oof_predictions_.to_numpy()) / (train_folds.std(0) + cal["delta"][None, :])
    q_old = {lv: _weighted_conformal_quantile(old_scores, cal["weights"], lv) for lv in LEVELS}
    seconds_today = time.perf_counter() - t
    # the held-out section's counts at each depth
    counts = test.X
    lib_full = _library(counts)
    depth_counts = {None: counts}
    for name, target in TARGET_UMI.items():
        depth_counts[name] = thin_counts(counts, min(1.0, target / float(np.median(lib_full))), seed=0)
    truth_full = measured_expression(test, genes).to_numpy()
    truths = {}
    for name, c in depth_counts.items():
        t_ad = test.copy()
        t_ad.X = c
        truths[name] = (measured_expression(t_ad, genes).to_numpy(), _library(c))
    # predictions of each image (full model, intervals' model part, detector) through predict()
    preds = {}
    for name, spec in IMAGE_SHIFTS.items():
        img = _shifted_image(test, spec)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", InputWarning)
            model.predict(img, key_added="nh2st")
        meta = img.uns["st_predict"]["nh2st"]
        preds[name] = {"point": img.obsm["nh2st"].to_numpy(np.float64),
                       "model_sd": img.obsm["nh2st_model_sd"].to_numpy(np.float64),
                       "quantiles": {lv: model.interval_quantiles(lv) for lv in LEVELS},
                       "trusted": bool(meta["intervals_trusted"][held]), "shift": dict(meta["shift"][held]),
                       "warned": any("unlike the calibration" in str(w.message) for w in caught)}
        del img
    out = {"held_out": held, "n_spots": int(test.n_obs), "n_genes": len(genes), "calibration_depth": cal_depth,
           "seconds_train_reliability": round(seconds_train, 1), "seconds_today_rebuild": round(seconds_today, 1),
           "shifts": {}}
    for shift, (image, depth_name) in SHIFTS.items():
        p = preds[image]
        truth, lib = truths[depth_name]
        point, model_sd = p["point"], p["model_sd"]
        row = {"median_umi": float(np.median(lib)), "detector_fired": not p["trusted"],
               "detector_warned": p["warned"], "detector_score": p["shift"]["score"],
               "detector_threshold": p["shift"]["threshold"]}
        r = pcc_per_gene(point, truth)
        row["pcc"] = float(np.nanmean(r))
        for lv in LEVELS:
            lo, hi = measurement_bounds(point, model_sd, p["quantiles"][lv], cal_depth, np.maximum(lib, 1.0))
            row.update(_interval_scores("depth", lo, hi, truth, lv, point))
            # the expected expression's interval, against the full-depth measurement
            q0 = p["quantiles"][lv].to_numpy()[0][None, :]
            elo, ehi = expected_bounds(point, model_sd, q0, cal_depth)
            row[f"coverage_expected_vs_full_depth_{int(lv * 100)}"] = float(((truth_full >= elo) & (truth_full <= ehi)).mean())
            row[f"width_expected_{int(lv * 100)}"] = float((ehi - elo).mean())
            # today's interval: point -+ q * (spread + delta), spread = model_sd / scale
            half = q_old[lv][None, :] * model_sd / np.maximum(cal["scale"][None, :], 1e-12)
            row.update(_interval_scores("today", point - half, point + half, truth, lv, point))
        rel_d = model.gene_reliability(depth=float(np.median(lib)))["reliability"].to_numpy(float)
        rel_0 = model.gene_reliability_["reliability"].to_numpy(float)
        for tag, rel in (("depth", rel_d), ("today", rel_0)):
            ok = np.isfinite(rel) & np.isfinite(r)
            row[f"spearman_reliability_{tag}"] = float(spearmanr(rel[ok], r[ok]).statistic)
        row["n_genes_scored"] = int(np.isfinite(r).sum())
        out["shifts"][shift] = row
        print(json.dumps({"held_out": held, "shift": shift, **{k: (round(v, 3) if isinstance(v, float) else v)
                                                               for k, v in row.items()}}), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/her2st")
    parser.add_argument("--folds", nargs="+", default=None, help="held-out sections (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/her2st_reliability_shift.json")
    parser.add_argument("--models", default=None, help="folder to save each fold's trained model in, and to load it "
                        "from on a later run (then only the calibration and scoring run again)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    import scvi

    from st_predict.data import read_her2st

    scvi.settings.seed = args.seed
    adata = read_her2st(args.data)
    sections = [str(s) for s in adata.obs["section"].cat.categories]
    rows = []
    for held in args.folds or sections:
        rows.append(_fold(adata, held, sections, args.seed, None if args.models is None else Path(args.models)))
        Path(args.out).write_text(json.dumps({"folds": rows}, indent=2))
    summary = {}
    for shift in SHIFTS:
        keys = [k for k, v in rows[0]["shifts"][shift].items() if isinstance(v, float | bool)]
        summary[shift] = {k: float(np.mean([r["shifts"][shift][k] for r in rows])) for k in keys}
    print(json.dumps(summary, indent=2))
    Path(args.out).write_text(json.dumps({"folds": rows, "mean": summary}, indent=2))


if __name__ == "__main__":
    main()
