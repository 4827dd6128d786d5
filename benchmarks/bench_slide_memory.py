"""Peak memory of whole-slide prediction: a large synthetic slide against a small one (CPU).

Writes two tiled, zlib-compressed pyramidal TIFFs tile by tile (never the whole image in memory):
round tissue-like blobs with a texture on a white background, the same physical layout at 0.5 um/px,
one ``--large`` px on a side (default 60000: 30 x 30 mm), one ``--small`` px (default 6000). Each slide
is predicted by ``NH2ST.predict_slide`` in its own process with a small model, and the peak RSS of the
two processes are compared (their difference is what the slide's size costs).

Usage:  python benchmarks/bench_slide_memory.py [--large 60000] [--small 6000] [--keep DIR]
Writes benchmarks/results/slide_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MPP = 0.5
TILE = 512
# blobs as (centre y, centre x, radius), fractions of the side
BLOBS = ((0.3, 0.3, 0.12), (0.62, 0.55, 0.16), (0.3, 0.75, 0.08))


def _tiles(size: int, down: int, blobs=BLOBS):
    """Tiles (row-major) of the level with downsample ``down`` of a ``size``-px slide."""
    side = -(-size // down)
    for y0 in range(0, side, TILE):
        for x0 in range(0, side, TILE):
            yy, xx = np.mgrid[y0:y0 + TILE, x0:x0 + TILE].astype(np.float32) * down / size
            tile = np.full((TILE, TILE, 3), 242, np.uint8)
            inside = np.zeros((TILE, TILE), bool)
            for cy, cx, r in blobs:
                inside |= ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
            if inside.any():
                stripes = (np.sin(xx * size / 16 * 2 * np.pi) * 40).astype(np.int16)
                tex = np.array([150, 80, 160], np.int16) + stripes[..., None]
                tile[inside] = tex[inside].clip(0, 255).astype(np.uint8)
            yield tile


def write_slide(path: Path, size: int, blobs=BLOBS) -> None:
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        down = 1
        while True:
            side = -(-size // down)
            tw.write(_tiles(size, down, blobs), shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE),
                     compression="zlib", photometric="rgb", subfiletype=0 if down == 1 else 1,
                     resolution=(1e4 / (MPP * down),) * 2, resolutionunit="CENTIMETER")
            if side <= 2048:
                break
            down *= 2


def _predict(path: str, model_dir: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from st_predict import NH2ST

    model = NH2ST.load(model_dir)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    t = time.perf_counter()
    sdata = model.predict_slide(path, tile_size_um=160.0, pitch_um=200.0, tta=False, progress=False)
    seconds = time.perf_counter() - t
    n = sdata.tables["nh2st"].n_obs
    return {"tiles": int(n), "seconds": round(seconds, 1), "tiles_per_s": round(n / seconds, 1),
            "peak_rss_gib_before": round(before, 2),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)}


def _train(model_dir: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from st_predict import NH2ST
    from st_predict.data import synthetic_tissue

    adata = synthetic_tissue(n_sections=2, n_rows=8, n_cols=8, n_genes=60, seed=0)
    NH2ST.setup_anndata(adata, library_key="section", patch_size=32)
    model = NH2ST(adata, image_size=32, encoder_weights="random", n_genes=50)
    model.train(max_epochs=1, progress=False)
    model.save(model_dir, overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large", type=int, default=60000)
    parser.add_argument("--small", type=int, default=6000)
    parser.add_argument("--keep", default=None, help="folder for the slides (default: a temporary one)")
    parser.add_argument("--out", default="benchmarks/results/slide_memory.json")
    parser.add_argument("--predict", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.predict:
        print("RESULT " + json.dumps(_predict(*args.predict)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        _train(str(folder / "model"))
        res: dict = {"mpp": MPP, "patch_size_um": 160.0, "pitch_um": 200.0, "image_size": 32, "tta": False}
        for name, size in (("small", args.small), ("large", args.large)):
            path = folder / f"{name}.tif"
            t = time.perf_counter()
            write_slide(path, size)
            write_s = time.perf_counter() - t
            proc = subprocess.run([sys.executable, __file__, "--predict", str(path), str(folder / "model")],
                                  capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            res[name] = {"side_px": size, "file_mib": round(path.stat().st_size / 2**20, 1),
                         "write_seconds": round(write_s, 1), **json.loads(lines[-1][len("RESULT "):])}
            print(name, json.dumps(res[name]), flush=True)
        res["peak_rss_large_over_small"] = round(res["large"]["peak_rss_gib"] / res["small"]["peak_rss_gib"], 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
