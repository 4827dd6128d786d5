"""A slide scanned coarser than the model's tiles (issue 28): HER2ST C2 at 3.44 um/px, a model whose tiles are
165 um at 224 px (0.74 um/px), through ``predict_slide``, ``st-predict predict-slide`` and ``predict-slides``.

C2's H&E (0.737 um/px) is averaged down 4.67x to 3.44 um/px and written as a pyramidal TIFF with that pixel size.
NH2ST (default recipe, 224 px, random-init trunk, one epoch on C3 + C4, no test-time augmentation: only the
agreement of two reading paths is measured, not accuracy) predicts it as a slide, at the training spot pitch. Its
tile predictions are compared with spot-level ``predict`` on the same 3.44 um/px image, with spots at the tile
centres (per-gene PCC across tiles, and PCC over all values), and the command line's outputs with the Python ones.

Usage:  python benchmarks/her2st_coarse_slide.py [--data ../shared/data/her2st]
Writes benchmarks/results/her2st_coarse_slide.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from her2st_containers import write_pyramid  # benchmarks/ is on sys.path when a script there runs


def _pcc(a: np.ndarray, b: np.ndarray) -> dict:
    a, b = np.asarray(a, float), np.asarray(b, float)
    ac, bc = a - a.mean(0), b - b.mean(0)
    per_gene = (ac * bc).sum(0) / np.sqrt((ac**2).sum(0) * (bc**2).sum(0))
    return {"per_gene_pcc_mean": float(np.nanmean(per_gene)), "per_gene_pcc_min": float(np.nanmin(per_gene)),
            "pcc_all_values": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]), "max_abs_diff": float(np.abs(a - b).max())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/her2st")
    parser.add_argument("--slide-mpp", type=float, default=3.44)
    parser.add_argument("--out", default="benchmarks/results/her2st_coarse_slide.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import cv2
    import scvi
    import spatialdata
    from anndata import AnnData

    from st_predict import NH2ST, InputWarning
    from st_predict.cli import main as cli
    from st_predict.data import read_her2st, select_sections

    scvi.settings.seed = 0
    adata = read_her2st(args.data, sections=["C2", "C3", "C4"])
    train, test = select_sections(adata, ["C3", "C4"]), select_sections(adata, ["C2"])
    NH2ST.setup_anndata(train, library_key="section", patch_size=224)
    model = NH2ST(train, encoder_weights="random", image_size=224, tta=False)
    t = time.perf_counter()
    model.train(max_epochs=1, progress=False)
    res: dict = {"train_seconds": round(time.perf_counter() - t, 1), "patch_size_um": model.patch_size_um_,
                 "tile_mpp": model.patch_size_um_ / 224, "context": model.module.context}
    meta = test.uns["spatial"]["C2"]
    mpp = float(meta["metadata"]["pixel_size_um"])
    img = np.asarray(meta["images"]["hires"])[..., :3]
    factor = args.slide_mpp / mpp
    small = cv2.resize(img, (round(img.shape[1] / factor), round(img.shape[0] / factor)), interpolation=cv2.INTER_AREA)
    slide_mpp = mpp * img.shape[1] / small.shape[1]
    res.update(slide_mpp=slide_mpp, slide_px=list(small.shape[:2]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = write_pyramid(tmp / "C2_coarse.tif", small, slide_mpp, levels=3, step=2, mean=True)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            t = time.perf_counter()
            table = model.predict_slide(path, progress=False, image_mpp=None).tables["nh2st"]
            res["predict_slide_seconds"] = round(time.perf_counter() - t, 1)
        ours = [str(w.message) for w in said if issubclass(w.category, InputWarning)]
        res["predict_slide"] = {"tiles": int(table.n_obs), "warnings": ours,
                                "upsampling": float(table.uns["st_predict"]["upsampling"])}
        spots = AnnData(obs={"section": ["C2"] * table.n_obs}, obsm={"spatial": table.obsm["spatial"].copy()},
                        uns={"spatial": {"C2": {"images": {"hires": small},
                                                "scalefactors": {"tissue_hires_scalef": 1.0,
                                                                 "spot_diameter_fullres": 100 / slide_mpp},
                                                "metadata": {"pixel_size_um": slide_mpp}}}})
        spots.obs_names = [f"t{i}" for i in range(table.n_obs)]
        spot_pred = model.predict(spots, interval_level=None).to_numpy()
        res["tiles_vs_spot_predict_at_tile_centres"] = _pcc(np.asarray(table.X), spot_pred)
        model.save(str(tmp / "model"))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli(["predict-slide", str(tmp / "model"), path, "--out", str(tmp / "one.zarr"), "--quiet"])
        one = spatialdata.read_zarr(tmp / "one.zarr").tables["nh2st"]
        res["predict_slide_command"] = {"exit": code, "stderr": err.getvalue().strip().splitlines(),
                                        "tiles": int(one.n_obs), "upsampling": float(one.uns["st_predict"]["upsampling"]),
                                        "vs_python": _pcc(np.asarray(one.X), np.asarray(table.X))}
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli(["predict-slides", str(tmp / "model"), path, "--out", str(tmp / "many"), "--workers", "1",
                        "--quiet"])
        manifest = pd.read_csv(tmp / "many" / "manifest.csv", keep_default_na=False)
        many = spatialdata.read_zarr(tmp / "many" / "C2_coarse.zarr").tables["nh2st"]
        res["predict_slides_command"] = {"exit": code, "stdout": out.getvalue().strip().splitlines(),
                                         "manifest_status": manifest["status"].tolist(),
                                         "manifest_warning": manifest["warning"].tolist(),
                                         "vs_python": _pcc(np.asarray(many.X), np.asarray(table.X))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
