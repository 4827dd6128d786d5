"""A HER2ST section predicted as a whole slide, against spot-level prediction (CPU).

Trains NH2ST (default recipe) on C3-C6, writes C2's H&E as a tiled pyramidal TIFF with its pixel size
in the resolution tags (the way a scanner's slide looks), treats it as H&E-only and predicts it with
``model.predict_slide``. Each measured spot gets the tile whose centre is nearest; the per-gene PCC of
those tiles against the measured expression is compared with the spot-level ``model.predict`` on the
same spots. Also reports tiles, tiles/s of the slide path and of the bare trunk forward in the same run,
and peak RSS.

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


def _write_pyramid(path: Path, img: np.ndarray, mpp: float, levels: int = 4) -> None:
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        level = img
        for i in range(levels):
            tw.write(level, tile=(256, 256), compression="zlib", photometric="rgb", subfiletype=0 if i == 0 else 1,
                     resolution=(1e4 / (mpp * 2**i),) * 2, resolutionunit="CENTIMETER")
            level = level[::2, ::2]


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
    model = NH2ST(train, weights="random")
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
        _write_pyramid(path, img, mpp)
        del img
        t = time.perf_counter()
        sdata = model.predict_slide(path, progress=False)
        seconds = time.perf_counter() - t
        table = sdata.tables["nh2st"]
        res["slide"] = {"mpp": mpp, "tiles": int(table.n_obs), "seconds": round(seconds, 2),
                        "tiles_per_s": round(table.n_obs / seconds, 1)}
        pitch = model.spot_pitch_um_ / 2  # a denser map: tiles nearer each spot
        dense = model.predict_slide(path, pitch_um=pitch, progress=False, key_added="dense").tables["dense"]
        t = time.perf_counter()  # throughput: one pass per tile (no test-time augmentation)
        n = model.predict_slide(path, pitch_um=pitch, tta=False, progress=False, key_added="fast").tables["fast"].n_obs
        res["slide_half_pitch_no_tta"] = {"pitch_um": pitch, "tiles": int(n),
                                          "tiles_per_s": round(n / (time.perf_counter() - t), 1)}
    xy = np.asarray(test.obsm["spatial"], dtype=float)
    for name, tab in (("slide_tiles_at_spots", table), ("half_pitch_tiles_at_spots", dense)):
        dist, nearest = cKDTree(tab.obsm["spatial"]).query(xy)
        res[name] = {k: float(v) for k, v in evaluate(np.asarray(tab.X)[nearest], truth).items()}
        res[name]["nearest_tile_distance_um"] = {"median": round(float(np.median(dist)) * mpp, 1),
                                                 "max": round(float(dist.max()) * mpp, 1)}
    # the bare trunk forward on as many patches, same process, same threads
    module = model.module.eval()
    x = torch.randint(0, 255, (256, 3, module.image_size, module.image_size), dtype=torch.uint8)
    with torch.no_grad():
        module.predict_expression({"patches": x[:32]}, tta=False)
        t = time.perf_counter()
        for i in range(0, 256, 64):
            module.trunk_features(x[i:i + 64])
        res["bare_trunk_patches_per_s"] = round(256 / (time.perf_counter() - t), 1)
    res["tta"] = bool(model.tta_)
    res["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
    res["torch_threads"] = torch.get_num_threads()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
