"""Finer than the measurement, tested where a finer truth exists: pooled supervision on HER2ST (CPU).

No sub-spot truth exists for HER2ST, so the measurement is made coarser. For each held-out section, the other
four sections' spots are pooled into super-spots of 2 x 2 spots of the array grid (complete blocks only, counts
summed, footprint the union of the four discs: ``st_predict.pp.pool_spots``). Every model below trains on
super-spots only, except the ceiling, and every prediction is scored at the held-out section's **real** spots
(those in complete blocks, the same spots for every method): per-gene Pearson correlation across spots, mean
over genes.

- ``bins``: NH2ST trained on the super-spots, then ``train_bins(footprint_key="footprint")``: its head's
  densities, tied to each super-spot's counts through the union of its discs. Predicted on the held-out
  section's super-spots (``predict_bins(..., footprint_key="footprint")``, reconciled with the model's super-spot
  prediction) and summed into each real spot's disc (``tl.aggregate_bins(at=real spots)``);
- ``bins_raw``: the same without reconciling (the head's densities alone);
- ``a_pooled_model_at_spots``: the same super-spot NH2ST applied at the real spots (a patch centred on each);
- ``b_upsampled``: each real spot given its super-spot's prediction (plain upsampling);
- ``c_real_spots``: NH2ST trained on the real spots (the ceiling).

Everything was fixed before any measurement: the default recipe (random init: no pretrained weights offline),
``train_bins``' defaults (chosen on synthetic tissue), 250 genes selected on the training sections, and a
360-um patch at 64 px (the smallest patch holding a super-spot's footprint, ~331 um, with a margin) for every
model, the ceiling included. The held-out section is never seen by training or selection.

Usage:  python benchmarks/her2st_superres.py [--data ../shared/data/her2st] [--folds C2 ...] [--image-size 64]
Writes benchmarks/results/her2st_superres.json (after every fold).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

PATCH_UM = 360.0


def _score(pred, truth) -> float:
    from st_predict.metrics import pcc_per_gene

    return float(np.nanmean(pcc_per_gene(np.asarray(pred, np.float64), np.asarray(truth, np.float64))))


def _trained(data, net: dict, seed: int):
    """NH2ST set up on ``data`` (the fixed patch) and trained with the same seed, and its training seconds."""
    import scvi
    import torch

    from st_predict import NH2ST

    t = time.perf_counter()
    scvi.settings.seed = seed
    torch.manual_seed(seed)
    NH2ST.setup_anndata(data, library_key="section", patch_size_um=PATCH_UM)
    model = NH2ST(data, **net)
    model.train(progress=False)
    return model, round(time.perf_counter() - t, 1)


def _fold(adata, held, sections, image_size: int, seed: int) -> dict:

    from st_predict.data import select_sections
    from st_predict.metrics import measured_expression
    from st_predict.pp import pool_spots, select_genes
    from st_predict.tl import aggregate_bins

    train = select_sections(adata, [s for s in sections if s != held])
    test = select_sections(adata, [held])
    genes = select_genes(train.X, train.var_names, train.obs["section"].astype(str).to_numpy(), n_top=250)
    pooled, test_pooled = pool_spots(train), pool_spots(test)
    members = {m: p for p, ms in zip(test_pooled.obs_names, test_pooled.obs["members"], strict=True) for m in ms.split(";")}
    scored = test[list(members)].copy()
    truth = measured_expression(scored, genes).to_numpy()
    out = {"held_out": held, "n_genes": len(genes), "n_train_superspots": int(pooled.n_obs),
           "n_train_spots": int(train.n_obs), "n_scored_spots": int(scored.n_obs), "scores": {}, "seconds": {}}
    net = {"encoder_weights": "random", "genes": genes, "image_size": image_size}

    m_pool, out["seconds"]["train_pooled"] = _trained(pooled, net, seed)
    t = time.perf_counter()
    m_pool.train_bins(footprint_key="footprint")
    out["seconds"]["train_bins"] = round(time.perf_counter() - t, 1)
    out["bin_nll_first_last"] = [m_pool.bins_["history"][0], m_pool.bins_["history"][-1]]

    t = time.perf_counter()
    for name, rec in (("bins", True), ("bins_raw", False)):
        b = m_pool.predict_bins(test_pooled, footprint_key="footprint", reconcile=rec)
        pred = aggregate_bins(b, at=scored)
        out["scores"][name] = _score(pred.to_numpy(), truth)
    out["n_bins"] = int(b.n_obs)
    out["bin_um"] = float(b.uns["st_predict"]["bins"]["native_cell_px"][held] * test.uns["spatial"][held]["metadata"]["pixel_size_um"])
    out["seconds"]["predict_bins"] = round(time.perf_counter() - t, 1)
    out["scores"]["a_pooled_model_at_spots"] = _score(m_pool.get_predicted_expression(scored, return_numpy=True), truth)
    sup = m_pool.get_predicted_expression(test_pooled)
    out["scores"]["b_upsampled"] = _score(sup.loc[[members[s] for s in scored.obs_names]].to_numpy(), truth)

    m_real, out["seconds"]["train_real"] = _trained(train, net, seed)
    out["scores"]["c_real_spots"] = _score(m_real.get_predicted_expression(scored, return_numpy=True), truth)
    s = out["scores"]
    out["bins_over_b"] = s["bins"] / s["b_upsampled"] if s["b_upsampled"] > 0 else float("nan")
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/her2st")
    parser.add_argument("--folds", nargs="+", default=None)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/her2st_superres.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    from st_predict.data import read_her2st

    adata = read_her2st(args.data)
    sections = [str(s) for s in adata.obs["section"].cat.categories]
    rows = []
    for held in args.folds or sections:
        rows.append(_fold(adata, held, sections, args.image_size, args.seed))
        Path(args.out).write_text(json.dumps({"folds": rows}, indent=2))
    keys = list(rows[0]["scores"])
    mean = {k: float(np.mean([r["scores"][k] for r in rows])) for k in keys}
    mean["bins_over_b"] = float(np.mean([r["bins_over_b"] for r in rows]))
    print(json.dumps(mean, indent=2))
    Path(args.out).write_text(json.dumps({"folds": rows, "mean": mean, "image_size": args.image_size,
                                          "patch_um": PATCH_UM}, indent=2))


if __name__ == "__main__":
    main()
