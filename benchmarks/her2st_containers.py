"""The same H&E in five containers gives the same tiles (issue 28): HER2ST C2's image as a JPEG, a PNG, a stripped
TIFF, a pyramidal TIFF with 2 x 2-mean levels, one with strided x2 levels and an SVS-like one with strided x4
levels, each predicted by ``predict_slide`` at the default recipe's tile (165 um) and C2's spot pitch (200 um).

Reports, per container, the tiles, the tiles on glass (centre farther than 300 um from every measured spot) and
the tiles that the pyramidal mean TIFF has within 20 um. The network is a small one trained for one epoch on
synthetic data: only which pixels become tiles is measured here, not the predictions.

Usage:  python benchmarks/her2st_containers.py [--data ../shared/data/her2st] [--test C2]
Writes benchmarks/results/her2st_containers.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def write_pyramid(path: Path, img: np.ndarray, mpp: float, levels: int, step: int, mean: bool) -> str:
    """A tiled pyramidal TIFF whose levels are each ``step`` times coarser: ``step x step`` means, or every
    ``step``-th pixel (as many writers and scanners make them)."""
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        level = img
        for i in range(levels):
            tw.write(level, tile=(256, 256), compression="zlib", photometric="rgb", subfiletype=0 if i == 0 else 1,
                     resolution=(1e4 / (mpp * step**i),) * 2, resolutionunit="CENTIMETER")
            if mean:
                h, w = level.shape[0] // step * step, level.shape[1] // step * step
                level = level[:h, :w].reshape(h // step, step, w // step, step, -1).mean((1, 3)).round().astype(np.uint8)
            else:
                level = level[::step, ::step]
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/her2st")
    parser.add_argument("--test", default="C2")
    parser.add_argument("--out", default="benchmarks/results/her2st_containers.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import tifffile
    import torch
    from PIL import Image
    from scipy.spatial import cKDTree

    from st_predict import NH2ST
    from st_predict.data import read_her2st, select_sections, synthetic_tissue

    torch.manual_seed(0)
    syn = synthetic_tissue(n_sections=2, n_rows=8, n_cols=8, n_genes=40, seed=0)
    NH2ST.setup_anndata(syn, library_key="section", patch_size=32)
    model = NH2ST(syn, image_size=32, latent_dim=64, n_heads=4, encoder_weights="random", n_genes=30,
                  context="patch")
    model.train(max_epochs=1, progress=False)
    test = select_sections(read_her2st(args.data), [args.test])
    meta = test.uns["spatial"][args.test]
    mpp = float(meta["metadata"]["pixel_size_um"])
    img = np.ascontiguousarray(np.asarray(meta["images"]["hires"])[..., :3])
    spots_um = np.asarray(test.obsm["spatial"], dtype=float) * mpp
    kw = {"tile_size_um": 165.0, "pitch_um": 200.0, "progress": False, "image_mpp": None}
    res: dict = {"test": args.test, "mpp": mpp, "image_px": list(img.shape[:2]), **{k: kw[k] for k in ("tile_size_um",
                                                                                                      "pitch_um")}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        Image.fromarray(img).save(tmp / "c.jpg", quality=90)
        with Image.open(tmp / "c.jpg") as im:
            pixels = np.asarray(im.convert("RGB"))  # every container holds the JPEG's own pixels
        Image.fromarray(pixels).save(tmp / "c.png")
        tifffile.imwrite(tmp / "plain.tif", pixels, photometric="rgb")
        paths = {
            "jpeg": (str(tmp / "c.jpg"), mpp), "png": (str(tmp / "c.png"), mpp), "stripped tiff": (str(tmp / "plain.tif"), mpp),
            "pyramid 2x2 mean": (write_pyramid(tmp / "mean.tif", pixels, mpp, 5, 2, True), None),
            "pyramid x2 strided": (write_pyramid(tmp / "x2.tif", pixels, mpp, 5, 2, False), None),
            "svs-like x4 strided": (write_pyramid(tmp / "x4.tif", pixels, mpp, 3, 4, False), None),
        }
        tables = {}
        for name, (path, given) in paths.items():
            t = time.perf_counter()
            table = model.predict_slide(path, mpp=given, **kw).tables["nh2st"]
            xy = table.obsm["spatial"] * mpp
            far = cKDTree(spots_um).query(xy)[0] > 300
            tables[name] = xy
            res[name] = {"tiles": int(table.n_obs), "on_glass": int(far.sum()), "seconds": round(time.perf_counter() - t, 2),
                         "tissue_level": int(table.uns["st_predict"]["tissue_level"]),
                         "tissue_mpp": float(table.uns["st_predict"].get("tissue_mpp", np.nan))}
        ref = tables["pyramid 2x2 mean"]
        for name, xy in tables.items():
            d = cKDTree(ref).query(xy)[0] if len(xy) else np.array([])
            res[name]["matched_to_mean_pyramid"] = int((d <= 20).sum())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
