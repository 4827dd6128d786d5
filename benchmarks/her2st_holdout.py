"""NH2ST on the real HER2ST sections: train on four, predict the held-out fifth (CPU).

Genes are chosen on the training sections only; nothing is tuned on the held-out section. Reports per
held-out section the per-gene PCC (mean over genes, NaN genes counted), MSE and MAE on the
log1p(counts per 10k) scale, next to the per-gene-mean predictor, with wall times.

Usage:
  python benchmarks/her2st_holdout.py                      # hold out C2, default recipe
  python benchmarks/her2st_holdout.py --folds C2 C3 C4 C5 C6
  python benchmarks/her2st_holdout.py --image-size 224     # paper-scale network (a GPU job)
  python benchmarks/her2st_holdout.py --recipe paper       # the paper's settings
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/her2st")
    parser.add_argument("--folds", nargs="+", default=["C2"])
    parser.add_argument("--recipe", default="default", choices=["default", "paper"])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--image-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--trunk", default=None, choices=["frozen", "finetune"], help="default: the recipe's")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/her2st_holdout.json")
    parser.add_argument("--model-kwargs", default="{}", help="JSON dict of extra NH2ST(...) arguments")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import scvi

    import st_predict
    from st_predict import NH2ST
    from st_predict.data import read_her2st, select_sections
    from st_predict.metrics import evaluate
    from st_predict.pp import normalize_expression

    t0 = time.perf_counter()
    adata = read_her2st(args.data)
    rows = []
    for fold in args.folds:
        scvi.settings.seed = args.seed
        torch.manual_seed(args.seed)
        t = time.perf_counter()
        train = select_sections(adata, [s for s in adata.obs["section"].cat.categories if s != fold])
        test = select_sections(adata, [fold])
        NH2ST.setup_anndata(train, library_key="section", patch_size=224)
        kwargs = {k: v for k, v in (("trunk", args.trunk), ("image_size", args.image_size)) if v is not None}
        model = NH2ST(train, recipe=args.recipe, encoder_weights=args.weights, **kwargs, **json.loads(args.model_kwargs))
        t_fit = time.perf_counter()
        model.train(max_epochs=args.epochs, progress=False)  # includes cropping patches / filling caches
        t_fit = time.perf_counter() - t_fit
        t_pred = time.perf_counter()
        pred = model.get_predicted_expression(test)
        t_pred = time.perf_counter() - t_pred
        genes = model.genes_
        truth = normalize_expression(test.X, test.var_names.get_indexer(genes))
        mean = normalize_expression(train.X, train.var_names.get_indexer(genes)).mean(0)
        m = evaluate(pred, truth)
        b = evaluate(np.tile(mean, (test.n_obs, 1)), truth)
        row = {
            "held_out": fold, "n_train_spots": int(train.n_obs), "n_test_spots": int(test.n_obs),
            "pcc": m["pcc"], "mse": m["mse"], "mae": m["mae"], "n_nan_genes": m["n_nan_genes"],
            "mean_predictor_mse": b["mse"], "mean_predictor_mae": b["mae"],
            "seconds_training": round(t_fit, 1), "train_settings": model.train_settings_,
            "seconds_predict": round(t_pred, 1), "seconds_fold": round(time.perf_counter() - t, 1),
            "weights": model.weights_source_,
        }
        rows.append(row)
        print(json.dumps(row))
    df = pd.DataFrame(rows)
    summary = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "versions": {"st_predict": st_predict.__version__, "torch": torch.__version__, "scvi-tools": scvi.__version__},
        "settings": vars(args),
        "folds": rows,
        "pcc_mean": float(df["pcc"].mean()), "pcc_std": float(df["pcc"].std(ddof=0)),
        "mse_mean": float(df["mse"].mean()), "mae_mean": float(df["mae"].mean()),
        "seconds_total": round(time.perf_counter() - t0, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "folds"}, indent=2))


if __name__ == "__main__":
    main()
