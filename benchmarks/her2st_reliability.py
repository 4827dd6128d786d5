"""Which predictions to trust, on HER2ST: per-gene reliability and conformal intervals on leave-one-section-out
folds (CPU).

For each held-out section, NH2ST (default recipe) is trained on the other four with ``reliability=True``: four
fold models (one per training section held out) give out-of-fold predictions, each gene's reliability and the
conformal calibration. The held-out section is used only to score; it is never seen by training, gene
selection or calibration. Reported per fold:

- per-gene coverage of the 80 % and 90 % intervals: mean, and mean absolute error against nominal;
- mean interval width (90 %);
- Spearman correlation, across genes, of predicted reliability with the PCC achieved on the held-out section;
- a risk-coverage curve: per-gene PCC and MSE on the spots kept after dropping the most uncertain ones (by the
  spot's mean 90 % width over genes);
- a proper score: the mean CRPS of a Gaussian per spot and gene with the interval's width, against the point
  model with a constant width per gene (the out-of-fold residual SD of that gene, from training sections only);
- PCC of the ensemble (mean of the full model and the fold models) against the single full model;
- wall time of the plain training and of the fold models.

Usage:  python benchmarks/her2st_reliability.py [--data ../shared/data/her2st] [--folds C2 C3 ...]
        python benchmarks/her2st_reliability.py --timing   # train() on all five sections, with vs without
Writes benchmarks/results/her2st_reliability.json (or her2st_reliability_timing.json).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

KEEP = (1.0, 0.9, 0.8, 0.7, 0.5)


def _crps_gaussian(y, mu, sigma):
    from scipy.stats import norm

    z = (y - mu) / sigma
    return sigma * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / np.sqrt(np.pi))


def _pcc_mean(pred, truth):
    from st_predict.metrics import pcc_per_gene

    r = pcc_per_gene(pred, truth)
    return float(np.nanmean(r)), r


def _fold(adata, held, sections, seed):
    import torch
    from scipy.stats import norm, spearmanr

    from st_predict import NH2ST
    from st_predict.data import select_sections
    from st_predict.metrics import measured_expression

    train = select_sections(adata, [s for s in sections if s != held])
    test = select_sections(adata, [held])
    torch.manual_seed(seed)
    NH2ST.setup_anndata(train, library_key="section", patch_size=224)
    model = NH2ST(train, encoder_weights="random")
    t = time.perf_counter()
    model.train(progress=False)
    t_plain = time.perf_counter() - t
    t = time.perf_counter()
    model._fit_reliability(model.resolve_train_settings(None), "auto", "auto", False)
    t_folds = time.perf_counter() - t
    genes = list(model.genes_)
    truth = measured_expression(test, genes).to_numpy()
    single = model.get_predicted_expression(test, return_numpy=True)
    folds = model.fold_predictions(lambda: model.get_predicted_expression(test, return_numpy=True))
    ensemble = (folds.sum(0) + single) / (len(folds) + 1)
    out = {"held_out": held, "n_spots": int(test.n_obs), "n_genes": len(genes),
           "seconds_plain_train": round(t_plain, 1), "seconds_fold_models": round(t_folds, 1)}
    out["pcc_single"], r_single = _pcc_mean(single, truth)
    out["pcc_ensemble"], _ = _pcc_mean(ensemble, truth)
    rel = model.gene_reliability_["reliability"].to_numpy()
    ok = np.isfinite(rel) & np.isfinite(r_single)
    out["spearman_reliability_vs_achieved_pcc"] = float(spearmanr(rel[ok], r_single[ok]).statistic)
    out["reliable_genes"] = int(model.gene_reliability_["reliable"].sum())
    out["achieved_pcc_reliable_genes"] = float(np.nanmean(r_single[model.gene_reliability_["reliable"].to_numpy()]))
    out["achieved_pcc_other_genes"] = float(np.nanmean(r_single[~model.gene_reliability_["reliable"].to_numpy()]))
    for point_name, point in (("single", single), ("ensemble", ensemble)):
        for level in (0.8, 0.9):
            lo, hi = model.intervals_from_folds(point, folds, level)
            cov = ((truth >= lo) & (truth <= hi)).mean(0)
            key = f"{point_name}_{int(level * 100)}"
            out[f"coverage_{key}"] = float(cov.mean())
            out[f"coverage_mae_{key}"] = float(np.abs(cov - level).mean())
            out[f"width_{key}"] = float((hi - lo).mean())
    # risk-coverage and CRPS on the single model's point prediction and 90 % intervals
    lo, hi = model.intervals_from_folds(single, folds, 0.9)
    z90 = norm.ppf(0.95)
    sigma = np.maximum((hi - lo) / (2 * z90), 1e-6)
    uncertainty = (hi - lo).mean(1)
    order = np.argsort(uncertainty)
    curve = []
    for keep in KEEP:
        sel = order[: max(3, int(round(keep * len(order))))]
        pcc, _ = _pcc_mean(single[sel], truth[sel])
        curve.append({"keep": keep, "pcc": pcc, "mse": float(((single[sel] - truth[sel]) ** 2).mean())})
    out["risk_coverage"] = curve
    data = model._training_data()
    oof = model.oof_predictions_.to_numpy()
    const_sd = np.maximum((data.targets.numpy() - oof).std(0), 1e-6)  # training sections only
    out["crps_adaptive"] = float(_crps_gaussian(truth, single, sigma).mean())
    out["crps_constant_width"] = float(_crps_gaussian(truth, single, const_sd[None, :]).mean())
    return out


def _timing(adata, sections, seed):
    import torch

    from st_predict import NH2ST

    torch.manual_seed(seed)
    NH2ST.setup_anndata(adata, library_key="section", patch_size=224)
    model = NH2ST(adata, encoder_weights="random")
    t = time.perf_counter()
    model.train(progress=False)
    plain = time.perf_counter() - t
    t = time.perf_counter()
    model.train(progress=False, reliability=True)
    both = time.perf_counter() - t
    return {"sections": sections, "n_spots": int(adata.n_obs), "seconds_train": round(plain, 1),
            "seconds_train_reliability": round(both, 1), "ratio": round(both / plain, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/her2st")
    parser.add_argument("--folds", nargs="+", default=None, help="held-out sections (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    import scvi

    from st_predict.data import read_her2st

    scvi.settings.seed = args.seed
    adata = read_her2st(args.data)
    sections = [str(s) for s in adata.obs["section"].cat.categories]
    results = Path("benchmarks/results")
    if args.timing:
        out = _timing(adata, sections, args.seed)
        print(json.dumps(out, indent=2))
        (results / "her2st_reliability_timing.json").write_text(json.dumps(out, indent=2))
        return
    rows = []
    for held in args.folds or sections:
        row = _fold(adata, held, sections, args.seed)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "risk_coverage"}), flush=True)
        (results / "her2st_reliability.json").write_text(json.dumps({"folds": rows}, indent=2))
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    summary = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    summary["risk_coverage"] = [{"keep": keep, "pcc": float(np.mean([r["risk_coverage"][i]["pcc"] for r in rows])),
                                 "mse": float(np.mean([r["risk_coverage"][i]["mse"] for r in rows]))}
                                for i, keep in enumerate(KEEP)]
    print(json.dumps(summary, indent=2))
    (results / "her2st_reliability.json").write_text(json.dumps({"folds": rows, "mean": summary}, indent=2))


if __name__ == "__main__":
    main()
