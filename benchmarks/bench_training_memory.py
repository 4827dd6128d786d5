"""Peak memory of end-to-end training against the number of training sections (issue 19).

Writes 40 synthetic sections (``st_predict.data.synthetic_tissue``, one seed each: 16 x 16 spots 64 px
apart, a 1088 px JPEG) in the HER2ST layout, then trains NH2ST at 224 px (batch 8, one epoch cut to 20
batches, so the network's work is the same for any number of sections) on the first 5 and on all 40, each
in its own process, in two ways:

  memory  the images decoded when read (``read_her2st(load_images=True)``) and the patches kept in memory
          (``train(feature_cache=False)``: in memory whatever their size)
  store   the images read lazily (``load_images="lazy"``) and the patches in the on-disk patch store
          (``train(feature_cache=DIR)``, a new folder, so every patch is cropped and written in the run)

Everything the run computes over all spots happens in every run (cropping every patch, the neighbour cache
of every spot); only the training batches are capped. Reported: each run's peak RSS, and the 40/5 ratio
of each way (goal for the store: within 15 %).

Usage:  python benchmarks/bench_training_memory.py [--sections 5 40] [--keep DIR]
Writes benchmarks/results/training_memory.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS, SPACING, GENES = 16, 64, 60


def write_sections(root: Path, n: int) -> None:
    """``n`` synthetic sections in the HER2ST layout (counts/, spots/, images/)."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from st_predict.data import synthetic_tissue

    for d in ("counts", "spots", "images"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = f"S{i:02d}"
        t = synthetic_tissue(n_sections=1, n_rows=ROWS, n_cols=ROWS, n_genes=GENES, spot_spacing=SPACING, seed=i)
        lib = next(iter(t.uns["spatial"]))
        Image.fromarray(np.asarray(t.uns["spatial"][lib]["images"]["hires"])).save(root / "images" / f"{name}_HE.jpg",
                                                                                  quality=90)
        xy = t.obsm["spatial"]
        col = np.rint(xy[:, 0] / SPACING).astype(int)
        row = np.rint(xy[:, 1] / SPACING).astype(int)
        ids = [f"{c}x{r}" for c, r in zip(col, row, strict=True)]
        counts = np.asarray(t.X.toarray() if hasattr(t.X, "toarray") else t.X)
        pd.DataFrame(counts, index=ids, columns=t.var_names).to_csv(root / "counts" / f"{name}.tsv.gz", sep="\t")
        pd.DataFrame({"x": col, "y": row, "pixel_x": xy[:, 0], "pixel_y": xy[:, 1]}).to_csv(
            root / "spots" / f"{name}_selection.tsv", sep="\t", index=False)


def run(data: str, n: int, mode: str, cache: str) -> dict:
    import scvi
    import torch

    from st_predict import NH2ST
    from st_predict.data import read_her2st

    scvi.settings.seed = 0
    t0 = time.perf_counter()
    sections = [f"S{i:02d}" for i in range(n)]
    adata = read_her2st(data, sections=sections, load_images="lazy" if mode == "store" else True)
    NH2ST.setup_anndata(adata, library_key="section", patch_size=SPACING)
    model = NH2ST(adata, encoder_weights="random", image_size=224, n_genes=50)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model.train(max_epochs=1, batch_size=8, limit_train_batches=20, progress=False,
                feature_cache=cache if mode == "store" else False)  # False: in memory whatever their size
    patches = model._data.patches
    return {
        "sections": n, "spots": int(adata.n_obs), "mode": mode, "patches": type(patches).__name__,
        "peak_rss_mib_before_train": round(rss_before), "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", nargs="+", type=int, default=[5, 40])
    parser.add_argument("--modes", nargs="+", default=["memory", "store"])
    parser.add_argument("--keep", default=None, help="folder for the sections and the store (default: a temporary one)")
    parser.add_argument("--out", default="benchmarks/results/training_memory.json")
    parser.add_argument("--run", nargs=4, metavar=("DATA", "N", "MODE", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        data, n, mode, cache = args.run
        print("RESULT " + json.dumps(run(data, int(n), mode, cache)))
        return
    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    root = Path(args.keep or tmp.name)
    data = root / "sections"
    t = time.perf_counter()
    if not (data / "counts").is_dir() or len(list((data / "counts").glob("*.tsv.gz"))) < max(args.sections):
        write_sections(data, max(args.sections))
    res = {"machine": f"{platform.machine()}, 2 cores", "setup": {
        "sections": f"synthetic_tissue, {ROWS}x{ROWS} spots {SPACING} px apart, JPEG images", "image_size": 224,
        "batch_size": 8, "limit_train_batches": 20, "write_seconds": round(time.perf_counter() - t, 1)},
        "note": "each run in its own process, one after the other; nothing else heavy running", "runs": []}
    for mode in args.modes:
        for n in args.sections:
            cache = root / f"store-{n}-{time.time_ns()}"  # a new store: every patch cropped and written in the run
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--run", str(data), str(n), mode, str(cache)],
                                  capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"{mode} {n} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(lines[-1][len("RESULT "):])
            r["wall_seconds"] = round(time.perf_counter() - t, 1)
            res["runs"].append(r)
            print(json.dumps(r), flush=True)
    for mode in args.modes:
        by_n = {r["sections"]: r["peak_rss_mib"] for r in res["runs"] if r["mode"] == mode}
        if len(by_n) == 2:
            lo, hi = sorted(by_n)
            res[f"{mode}_peak_ratio_{hi}_over_{lo}"] = round(by_n[hi] / by_n[lo], 3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
