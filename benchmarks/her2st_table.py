"""The HER2ST leave-one-section-out table: baselines, NH2ST and its ablations (frozen trunk, CPU).

Usage:
  python benchmarks/her2st_table.py                                  # every method of default_methods()
  python benchmarks/her2st_table.py --methods "per-gene mean" "ridge (PCA-256)" NH2ST
Writes benchmarks/results/her2st_loso/results.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import warnings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/her2st")
    parser.add_argument("--methods", nargs="+", default=None, help="names from default_methods() (default: all)")
    parser.add_argument("--folds", nargs="+", default=None)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/her2st_loso")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("lightning", "lightning.pytorch", "scvi", "st_predict.nn"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from st_predict.benchmark import default_methods, run_benchmark, to_markdown
    from st_predict.data import read_her2st

    methods = default_methods(epochs=args.epochs, seed=args.seed)
    if args.methods:
        unknown = [m for m in args.methods if m not in methods]
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; choose from {list(methods)}")
        methods = {m: methods[m] for m in args.methods}
    adata = read_her2st(args.data)
    result = run_benchmark(adata, methods, folds=args.folds, weights=args.weights, seed=args.seed, out_dir=args.out)
    print(to_markdown(result))


if __name__ == "__main__":
    main()
