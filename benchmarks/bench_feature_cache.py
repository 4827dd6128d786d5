"""A frozen ResNet18 trunk's feature cache: train() with a cold cache against a warm one (CPU).

Four synthetic sections of 20 x 20 spots (1,600 spots), patches resampled to ``--image-size`` px
(default 224, the paper's), trunk frozen with the 8 dihedral views (the default recipe augments), 2
epochs. Three runs in one process, each a new model with the same (random) trunk weights:
``no cache`` (maps in memory only), ``cold`` (computed and written to a fresh folder) and ``warm``
(read back). Random weights: this measures time and disk, not accuracy.

Usage:  python benchmarks/bench_feature_cache.py [--image-size 224] [--epochs 2]
Writes benchmarks/results/feature_cache.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from st_predict import NH2ST
from st_predict.data import synthetic_tissue


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()

    adata = synthetic_tissue(n_sections=4, n_rows=20, n_cols=20, n_genes=50, spot_spacing=32, seed=0)
    NH2ST.setup_anndata(adata, library_key="section", patch_size=32)
    results = {"spots": adata.n_obs, "sections": 4, "image_size": args.image_size, "epochs": args.epochs,
               "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as folder:
        for run, cache in (("no_cache", None), ("cold", folder), ("warm", folder)):
            torch.manual_seed(0)
            model = NH2ST(adata, trunk="frozen", image_size=args.image_size, weights="random", n_genes=50)
            start = time.perf_counter()
            model.train(max_epochs=args.epochs, progress=False, feature_cache=cache)
            results[f"train_s_{run}"] = round(time.perf_counter() - start, 2)
            print(run, results[f"train_s_{run}"], "s", flush=True)
        results["cache_mb"] = round(sum(p.stat().st_size for p in Path(folder).rglob("*.pt")) / 2**20, 2)
    results["warm_over_cold"] = round(results["train_s_warm"] / results["train_s_cold"], 3)
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out = Path(__file__).parent / "results" / "feature_cache.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
