"""A HER2ST section predicted as a whole slide, against spot-level prediction (CPU).

Trains NH2ST (default recipe) on C3-C6, writes C2's H&E as a tiled pyramidal TIFF with its pixel size
in the resolution tags (the way a scanner's slide looks), treats it as H&E-only and predicts it with
``model.predict_slide``. Each measured spot gets the tile whose centre is nearest; the per-gene PCC of
those tiles against the measured expression is compared with the spot-level ``model.predict`` on the
same spots. Also reports tiles, tiles/s of the slide path (tiles read in this process and by the default
DataLoader workers) and of the bare trunk forward in the same run, their ratio, the time this gives for a
20 x 15 mm slide at a 55 um pitch, and peak RSS.

Usage:  python benchmarks/her2st_slide.py [--data ../shared/data/her2st] [--test C2]
Writes benchmarks/results/her2st_slide.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from her2st_containers import write_pyramid  # benchmarks/ is on sys.path when a script there runs


def _throughput(model, path: Path, pitch: float) -> dict:
    """Tiles/s of predict_slide without test-time augmentation (tiles read in this process, and by the
    default DataLoader workers where that is not 0) and of the bare trunk forward on as many uint8
    patches, in the same process with the same threads; the first call warms reader and network."""
    import torch

    from st_predict.tl import default_num_workers

    model.predict_slide(path, pitch_um=pitch, tta=False, progress=False, key_added="warm", num_workers=0)
    out: dict = {"image_size": model.module.image_size, "pitch_um": pitch}
    for workers in sorted({0, default_num_workers()}):
        t = time.perf_counter()
        n = model.predict_slide(path, pitch_um=pitch, tta=False, progress=False, key_added="fast",
                                num_workers=workers).tables["fast"].n_obs
        out["tiles"] = int(n)
        out[f"tiles_per_s_{workers}_workers"] = round(n / (time.perf_counter() - t), 1)
    module = model.module.eval()
    n = max(64, min(512, out["tiles"]))
    x = torch.randint(0, 255, (n, 3, module.image_size, module.image_size), dtype=torch.uint8)
    with torch.no_grad():
        module.trunk_features(x[:16])
        t = time.perf_counter()
        for i in range(0, n, 64):
            module.trunk_features(x[i:i + 64])
        out["bare_trunk_patches_per_s"] = round(n / (time.perf_counter() - t), 1)
    best = max(v for k, v in out.items() if k.startswith("tiles_per_s"))
    out["slide_vs_bare_trunk"] = round(best / out["bare_trunk_patches_per_s"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/her2st")
    parser.add_argument("--test", default="C2")
    parser.add_argument("--out", default="benchmarks/results/her2st_slide.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import scvi
    import torch
    from scipy.spatial import cKDTree

    from st_predict import NH2ST
    from st_predict.data import read_her2st, select_sections
    from st_predict.metrics import evaluate
    from st_predict.pp import normalize_expression

    scvi.settings.seed = 0
    adata = read_her2st(args.data)
    sections = list(adata.obs["section"].cat.categories)
    train = select_sections(adata, [s for s in sections if s != args.test])
    test = select_sections(adata, [args.test])
    NH2ST.setup_anndata(train, library_key="section", patch_size=224)
    model = NH2ST(train, encoder_weights="random")
    t = time.perf_counter()
    model.train(progress=False)
    res = {"train_seconds": round(time.perf_counter() - t, 1), "test": args.test,
           "patch_size_um": model.patch_size_um_, "spot_pitch_um": model.spot_pitch_um_}
    truth = normalize_expression(test.X, test.var_names.get_indexer(model.genes_))
    spot = model.get_predicted_expression(test)
    res["spot_level"] = {k: float(v) for k, v in evaluate(spot.to_numpy(), truth).items()}
    meta = test.uns["spatial"][args.test]
    mpp = float(meta["metadata"]["pixel_size_um"])
    img = np.asarray(meta["images"]["hires"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.test}.tif"
        write_pyramid(path, img, mpp, levels=4, step=2, mean=False)
        del img
        t = time.perf_counter()
        sdata = model.predict_slide(path, progress=False)
        seconds = time.perf_counter() - t
        table = sdata.tables["nh2st"]
        res["slide"] = {"mpp": mpp, "tiles": int(table.n_obs), "seconds": round(seconds, 2),
                        "tiles_per_s": round(table.n_obs / seconds, 1)}
        pitch = model.spot_pitch_um_ / 2  # a denser map: tiles nearer each spot
        dense = model.predict_slide(path, pitch_um=pitch, progress=False, key_added="dense").tables["dense"]
        res["throughput_64px"] = _throughput(model, path, pitch)
        # the same at the paper's 224 px input: a model trained for one epoch on one section, for speed only
        one = select_sections(train, [sections[1] if sections[0] == args.test else sections[0]])
        NH2ST.setup_anndata(one, library_key="section", patch_size=224)
        big = NH2ST(one, encoder_weights="random", image_size=224)
        big.train(max_epochs=1, progress=False)
        res["throughput_224px"] = _throughput(big, path, pitch)
    xy = np.asarray(test.obsm["spatial"], dtype=float)
    for name, tab in (("slide_tiles_at_spots", table), ("half_pitch_tiles_at_spots", dense)):
        dist, nearest = cKDTree(tab.obsm["spatial"]).query(xy)
        res[name] = {k: float(v) for k, v in evaluate(np.asarray(tab.X)[nearest], truth).items()}
        res[name]["nearest_tile_distance_um"] = {"median": round(float(np.median(dist)) * mpp, 1),
                                                 "max": round(float(dist.max()) * mpp, 1)}
    best = max(v for k, v in res["throughput_64px"].items() if k.startswith("tiles_per_s"))
    # a 20 x 15 mm slide at a 55 um pitch, all of it tissue (an upper bound): tiles and minutes at that speed
    n_big = int(20000 // 55) * int(15000 // 55)
    res["estimate_20x15mm_55um"] = {"tiles": n_big, "cpu_minutes_no_tta": round(n_big / best / 60, 1),
                                    "cpu_minutes_tta": round(n_big / res["slide"]["tiles_per_s"] / 60, 1)}
    res["tta"] = bool(model.tta_)
    res["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
    res["torch_threads"] = torch.get_num_threads()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
