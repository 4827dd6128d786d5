"""The HER2ST leave-one-section-out table: baselines, NH2ST and its ablations (CPU).

Usage:
  python benchmarks/her2st_table.py                    # every method of default_methods(), 2 processes
  python benchmarks/her2st_table.py --jobs 1           # one process (2 torch threads)
  python benchmarks/her2st_table.py --methods "per-gene mean" "ridge (PCA-256)" NH2ST
  python benchmarks/her2st_table.py --encoder uni2 --feature-cache ~/.cache/st_predict/features \
      --out benchmarks/results/her2st_uni2   # a foundation model: the frozen-feature methods and the HEST probe
Writes benchmarks/results/her2st_loso/results.{json,md}.

Inner splits (how the default recipe was chosen): ``--sections C3 C4 C5 C6`` reads only those sections
(C2, a test section of the table, is never loaded) and holds each of them out in turn; the
``recipe: ...`` methods each change one setting of NH2ST's default recipe:
  python benchmarks/her2st_table.py --sections C3 C4 C5 C6 --methods NH2ST "recipe: ..." \
      --out benchmarks/results/her2st_inner

With ``--jobs N`` the methods are dealt (longest first, to the least loaded) to N processes of one torch thread each (each
computes the shared trunk features itself) and the results are merged: on this 2-core machine two
single-threaded processes get ~1.8x the throughput of one two-threaded process, because the models
are small and their steps are dominated by memory-bound matrix products. Numbers do not depend on
``--jobs``: every method is seeded and trained alone in its process.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


def _run(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from st_predict.benchmark import run_benchmark
    from st_predict.data import read_her2st

    methods = all_methods(epochs=args.epochs, seed=args.seed, encoder=args.encoder)
    if args.methods:
        unknown = [m for m in args.methods if m not in methods]
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; choose from {list(methods)}")
        methods = {m: methods[m] for m in args.methods}
    else:
        methods = {m: f for m, f in methods.items() if not m.startswith("recipe:")}
    adata = read_her2st(args.data, sections=args.sections)
    # the frozen-feature baselines (ridge, ST-Net-style, BLEEP-style) on a 224 px trunk, as in the published table
    # a foundation-model encoder takes its own input size and normalisation
    return run_benchmark(adata, methods, folds=args.folds, image_size=224, weights=args.weights, seed=args.seed,
                         out_dir=args.out, encoder=args.encoder, encoder_weights=args.encoder_weights,
                         feature_cache=args.feature_cache)


#: NH2ST's candidates for the default context, fixed before the nested selection was run (the first wins a tie)
CONTEXT_CANDIDATES = {
    "NH2ST candidate: context patch": {"context": "patch"},  # the paper: each spot from its own patch
    "NH2ST candidate: context neighbors": {"context": "neighbors"},  # the hypergraph of its 8 nearest spots too
}
#: the row the nested selection adds (each fold: the candidate its inner splits chose)
NESTED = "NH2ST, context chosen by nested selection"
TITLE = ("HER2ST, five serial sections of ONE patient (C), leave one section out: a within-patient split, where "
         "sections of one tumour are not independent (mclSTExp#5); gains here may not carry to new patients")


def finish(result: dict) -> dict:
    """The table's title and, when both context candidates ran, the nested selection's row and choices."""
    from st_predict.benchmark import nested_selection

    result["title"] = TITLE  # this script reads HER2ST's sections of patient C
    have = {r["method"] for r in result["summary"]}
    if set(CONTEXT_CANDIDATES) <= have:
        nested_selection(result, list(CONTEXT_CANDIDATES), NESTED)
    return result


def all_methods(epochs=None, seed=0, encoder: str = "resnet18") -> dict:
    """The table's methods: with a foundation-model encoder, those that read its frozen features
    (:func:`st_predict.benchmark.frozen_methods`); with the ResNet18, every method and the recipe candidates."""
    if encoder != "resnet18":
        from st_predict.benchmark import frozen_methods

        return frozen_methods(epochs=epochs, seed=seed)
    return _resnet_methods(epochs, seed)


def _resnet_methods(epochs=None, seed=0) -> dict:
    """The table's methods and the recipe candidates (each changes one setting of the default)."""
    from st_predict.benchmark import NH2STMethod, default_methods

    def nh(train=None, **kw):
        return lambda: NH2STMethod(epochs=epochs, seed=seed, train_kwargs=train, **kw)

    nested = {name: nh(inner_loso=True, **kw) for name, kw in CONTEXT_CANDIDATES.items()}

    from st_predict.benchmark import SmallCNN

    candidates = {
        "recipe: raw log1p targets": nh(standardize_targets=False),
        "recipe: dihedral only (no stain jitter)": nh({"augment": "dihedral"}),
        "recipe: no augmentation": nh({"augment": "none"}),
        "recipe: paper optimiser (Adam 1e-4, StepLR, batch 8)": nh(
            {"optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0, "schedule": "step", "batch_size": 8}),
        "recipe: best epoch on a held-out training section": nh({"validation": "section", "best_epoch": True}),
        "recipe: no test-time augmentation": nh(tta=False),
        "recipe: float32 training": nh({"precision": "32-true"}),
        "recipe: 96 px": nh(image_size=96),
        "recipe: paper temperature 0.05": nh(temperature=0.05),
        "recipe: no gene dropout": nh(gene_dropout=0.0),
        "recipe: 40 epochs": nh({"max_epochs": 40}),
        "recipe: batches of one section": nh({"batches": "section"}),
        "recipe: no per-section standardisation": nh({"center_sections": False}),
        "recipe: 320 px patches (235 um)": nh(setup={"patch_size": 320}),
        "recipe: ST-Net-style end to end, 320 px patches": nh(setup={"patch_size": 320}, contrastive=False,
                                                               use_neighbor_branch=False, translator_hidden=0,
                                                               context="patch"),
        "recipe: small CNN, 320 px patches": lambda: SmallCNN(seed=seed, patch_size=320),
    }
    return {**default_methods(epochs=epochs, seed=seed), **nested, **candidates}


def _cost(name: str) -> float:
    """Relative wall time of a method (NH2ST = 1) on the HER2ST folds, measured on this CPU."""
    if name.startswith(("per-gene", "ridge", "HEST", "BLEEP", "ST-Net-style (frozen")):
        return 0.05
    if name.startswith("NH2ST candidate:"):  # 4 inner trainings on ~540 spots and the outer one, per fold
        return 4.2
    peers = {"TRIPLEX-style": 8.7, "His2ST-style": 2.4, "HisToGene-style": 1.5, "EGN-style": 2.5}
    if name in peers:  # from one-thread step timings at the real sizes
        return peers[name]
    for key, cost in (("96 px", 2.0), ("40 epochs", 2.0), ("batch 8", 1.3), ("float32", 1.5),
                      ("small CNN", 0.4), ("frozen", 0.5)):
        if key in name:
            return cost
    return 1.0


def _parallel(args) -> dict:
    from st_predict.benchmark import to_markdown

    names = args.methods or [m for m in all_methods(epochs=args.epochs, seed=args.seed, encoder=args.encoder)
                             if not m.startswith("recipe:")]
    # longest first onto the least loaded worker, with rough relative costs measured on this CPU
    groups, load = [[] for _ in range(args.jobs)], [0.0] * args.jobs
    for name in sorted(names, key=_cost, reverse=True):
        i = load.index(min(load))
        groups[i].append(name)
        load[i] += _cost(name)
    groups = [g for g in groups if g]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, group in enumerate(groups):
            cmd = [sys.executable, __file__, "--part", "--jobs", "1", "--threads", "1", "--data", args.data,
                   "--weights", args.weights, "--seed", str(args.seed), "--out", f"{tmp}/part{i}",
                   "--encoder", args.encoder, "--methods", *group]
            if args.encoder_weights:
                cmd += ["--encoder-weights", args.encoder_weights]
            if args.feature_cache:
                cmd += ["--feature-cache", args.feature_cache]
            if args.epochs is not None:
                cmd += ["--epochs", str(args.epochs)]
            if args.folds:
                cmd += ["--folds", *args.folds]
            if args.sections:
                cmd += ["--sections", *args.sections]
            procs.append(subprocess.Popen(cmd))
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"a worker failed (exit codes {codes})")
        parts = [json.loads(Path(f"{tmp}/part{i}/results.json").read_text()) for i in range(len(groups))]
    merged = dict(parts[0])
    order = {name: i for i, name in enumerate(names)}
    merged["rows"] = sorted((r for p in parts for r in p["rows"]),
                            key=lambda r: (merged["folds"].index(r["held_out"]), order[r["method"]]))
    merged["summary"] = sorted((r for p in parts for r in p["summary"]), key=lambda r: order[r["method"]])
    merged["seconds_features"] = max(p["seconds_features"] for p in parts)
    merged["seconds_total"] = round(time.perf_counter() - t0, 1)
    merged["parallel"] = (f"{len(groups)} processes x 1 torch thread on {platform.machine()}; "
                          "'seconds' per method are wall times inside its process")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(merged, indent=2))
    (out / "results.md").write_text(to_markdown(merged))
    return merged


def _merge(old: dict, new: dict) -> dict:
    """``old`` with the rows and summary entries of ``new``'s methods replaced (or appended)."""
    if old["folds"] != new["folds"] or old["n_genes"] != new["n_genes"] or old["weights"] != new["weights"]:
        raise SystemExit("--update: folds, genes or weights differ from the existing results; rerun them all")
    names = {r["method"] for r in new["summary"]}
    merged = dict(old)
    order = [r["method"] for r in old["summary"]] + [m for m in names if m not in {r["method"] for r in old["summary"]}]
    rows = [r for r in old["rows"] if r["method"] not in names] + new["rows"]
    merged["rows"] = sorted(rows, key=lambda r: (old["folds"].index(r["held_out"]), order.index(r["method"])))
    summary = {r["method"]: r for r in old["summary"]}
    summary.update({r["method"]: r for r in new["summary"]})
    merged["summary"] = [summary[m] for m in order]
    merged.setdefault("updates", []).append({"methods": sorted(names), "versions": new["versions"],
                                             "seconds_total": new["seconds_total"]})
    return merged


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/her2st")
    parser.add_argument("--methods", nargs="+", default=None, help="names from default_methods() (default: all)")
    parser.add_argument("--folds", nargs="+", default=None)
    parser.add_argument("--sections", nargs="+", default=None,
                        help="read only these sections (inner splits: a test section of the table is never loaded)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the NH2ST rows (default: the recipe's)")
    parser.add_argument("--weights", default="imagenet", help="ResNet18 weights")
    parser.add_argument("--encoder", default="resnet18",
                        help="image encoder (a lazyslide-models key, timm name or hf-hub id): the table then has "
                        "the methods on its frozen features, with the HEST probe")
    parser.add_argument("--encoder-weights", default=None, help="the encoder's weights file (default: published)")
    parser.add_argument("--feature-cache", default=None, help="folder to keep the encoder's features in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (1 torch thread each when > 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="benchmarks/results/her2st_loso")
    parser.add_argument("--update", action="store_true",
                        help="rerun only --methods and replace their rows in an existing OUT/results.json "
                        "(methods are independent: same folds, genes, trunk features and seeds)")
    parser.add_argument("--part", action="store_true", help=argparse.SUPPRESS)  # a worker of --jobs N: no finish()
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("lightning", "lightning.pytorch", "scvi", "st_predict.nn"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from st_predict.benchmark import to_markdown

    if args.update:
        if not args.methods:
            raise SystemExit("--update needs --methods")
        old = json.loads(Path(args.out, "results.json").read_text())
        final_out = args.out
        with tempfile.TemporaryDirectory() as tmp:
            args.out = tmp
            new = _parallel(args) if args.jobs > 1 else _run(args)
        args.out = final_out
        result = finish(_merge(old, new))
    elif args.part:
        result = _run(args)
    else:
        result = finish(_parallel(args) if args.jobs > 1 else _run(args))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "results.json").write_text(json.dumps(result, indent=2))
    Path(args.out, "results.md").write_text(to_markdown(result))
    print(to_markdown(result))
    print(f"{result['seconds_total']} s in all")


if __name__ == "__main__":
    main()
