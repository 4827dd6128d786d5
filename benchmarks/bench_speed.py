"""Speed and memory of st_predict on this machine (CPU), on the real HER2ST sections.

Measures, in one run (so numbers compare as ratios):
  1. patch embedding throughput at 224 px (crop from the full-resolution image + ResNet18 forward),
     and the trunk forward alone on the same patches;
  2. frozen-path training: 20 epochs on all ~900 spots after embedding (batch 8, K = 8);
  3. prediction from images (spots/s) on one section;
  4. end-to-end (finetune) training speed at 224 px: a few batches (8 targets + their 8 neighbours),
     patches/s through forward+backward, extrapolated to one epoch of 723 spots (the authors' code:
     660 s here), with and without gradient through the neighbours' patches;
  5. peak RSS.

Usage:  python benchmarks/bench_speed.py [--data ../shared/data/her2st] [--out benchmarks/results/speed.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/her2st")
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    parser.add_argument("--finetune-batches", type=int, default=4)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import scvi

    import st_predict
    from st_predict import NH2ST
    from st_predict.data import read_her2st

    scvi.settings.seed = 0
    res: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "st_predict": st_predict.__version__,
    }
    t = time.perf_counter()
    adata = read_her2st(args.data)
    res["read_seconds"] = round(time.perf_counter() - t, 2)
    res["n_spots"] = int(adata.n_obs)
    NH2ST.setup_anndata(adata, library_key="section", patch_size=224)
    model = NH2ST(adata, weights="random", trunk="frozen")
    reader = model._data.reader

    # 1. embedding throughput
    n = adata.n_obs
    t = time.perf_counter()
    patches = reader.read(np.arange(n))
    t_read = time.perf_counter() - t
    module = model.module.eval()
    with torch.inference_mode():
        t = time.perf_counter()
        for s in range(0, n, 16):
            module.trunk_features(patches[s : s + 16])
        t_fwd = time.perf_counter() - t
    res["crop_patches_per_s"] = round(n / t_read, 1)
    res["trunk_forward_patches_per_s"] = round(n / t_fwd, 1)
    del patches
    t = time.perf_counter()
    model._cached_fmaps(torch.device("cpu"), progress=False)  # crop + trunk forward of every spot
    t_embed = time.perf_counter() - t
    res["embedding_patches_per_s"] = round(n / t_embed, 1)

    # 2. frozen training, 20 epochs
    t = time.perf_counter()
    model.train(max_epochs=20, batch_size=8, progress=False)
    res["frozen_train_20_epochs_seconds"] = round(time.perf_counter() - t, 1)

    # 3. prediction from images (no cache)
    sec = adata[adata.obs["section"] == "C2"].copy()
    t = time.perf_counter()
    model.get_predicted_expression(sec)
    res["predict_spots_per_s"] = round(sec.n_obs / (time.perf_counter() - t), 1)

    # 4. end to end at 224 px, with (paper) and without gradient through the neighbours' patches
    from st_predict.train import NH2STCollate, NH2STTrainingPlan

    for grad in (True, False):
        ft = NH2ST(adata, weights="random", trunk="finetune", neighbor_trunk_grad=grad)
        data = ft._data
        collate = NH2STCollate(data.targets, data.neighbors, read_patches=data.reader.read, augment=True)
        opt = NH2STTrainingPlan(ft.module).configure_optimizers()["optimizer"]
        ft.module.train()
        rng = np.random.default_rng(0)
        n_patches, t_total = 0, 0.0
        for i in range(args.finetune_batches + 1):
            batch = collate(rng.choice(n, 8, replace=False).tolist())
            t = time.perf_counter()
            loss = ft.module.loss(batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:  # the first batch is a warm-up
                t_total += time.perf_counter() - t
                n_patches += batch["patches"].shape[0]
        tag = "finetune" if grad else "finetune_no_neighbor_grad"
        res[f"{tag}_patches_per_s"] = round(n_patches / t_total, 2)
        res[f"{tag}_unique_patches_per_batch"] = round(n_patches / args.finetune_batches, 1)
        res[f"{tag}_epoch_723_spots_seconds_est"] = round(t_total / args.finetune_batches * 723 / 8, 0)
        del ft, data, collate, opt
    res["peak_rss_gib"] = round(peak_rss_gib(), 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
