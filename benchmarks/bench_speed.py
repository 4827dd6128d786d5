"""Speed and memory of NH2ST training on this machine (CPU), on the real HER2ST sections.

Every measurement trains on the 723 spots of C3-C6 (the authors' yardstick: C2 held out) and runs in
its own subprocess, so each peak RSS is that run's own; all of them run in one go, one after the other,
so the numbers compare as ratios:

  cnn64       the small CNN baseline (benchmark.SmallCNN) at 64 px: seconds per epoch
  nh2st64     NH2ST, default recipe (end to end at 64 px, cached neighbours): seconds per epoch
  nh2st224    NH2ST at 224 px (``image_size=224``, default recipe otherwise): one full epoch
  nh2st224b8  the same at the authors' batch of 8 spots (their 5.2 GiB was measured at batch 8)
  nh2st224b8store  the same with the images read lazily (``load_images="lazy"``) and the patches in the
              on-disk patch store (``feature_cache=`` a new folder: every patch cropped and written in the run)
  paper224    NH2ST with ``recipe="paper"``: 224 px, the full-gradient neighbour branch (every node's
              patch through the trunk with gradient), batch 8, float32, as the authors' code: 12 batches,
              extrapolated to an epoch
  predict64   prediction throughput of the default model (spots/s, with and without test-time augmentation)
  default5    ``NH2ST(adata); model.train()`` exactly as a new user runs it, on all five sections (~900
              spots): wall time of the whole train() call (the recipe's 20 epochs)
  default5patch  the same with ``context="patch"`` (the paper's patch-only translator, the default before
              the context was chosen by nested selection): run beside default5 to compare the two as a ratio

Usage:  python benchmarks/bench_speed.py [--data ../shared/data/her2st] [--out benchmarks/results/speed.json]
        python benchmarks/bench_speed.py --part nh2st224        # one part, printed as JSON
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

SECTIONS = ["C3", "C4", "C5", "C6"]
PARTS = ("cnn64", "nh2st64", "nh2st224", "nh2st224b8", "nh2st224b8store", "paper224", "predict64", "default5",
         "default5patch")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _timer():
    import lightning.pytorch as pl

    class Timer(pl.Callback):
        """Wall time of every training epoch and batch."""

        def __init__(self):
            self.epochs, self.batches, self.patches = [], [], []

        def on_train_epoch_start(self, trainer, pl_module):
            self._epoch = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.epochs.append(time.perf_counter() - self._epoch)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._batch = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.batches.append(time.perf_counter() - self._batch)
            self.patches.append(int(batch["patches"].shape[0]))

    return Timer()


def _train_data(data: str, sections=SECTIONS, load_images=True):
    from st_predict import NH2ST
    from st_predict.data import read_her2st

    adata = read_her2st(data, sections=sections, load_images=load_images)
    NH2ST.setup_anndata(adata, library_key="section", patch_size=224)
    return adata


def _part(name: str, data: str) -> dict:
    import scvi
    import torch

    from st_predict import NH2ST

    scvi.settings.seed = 0
    res: dict = {}
    t = time.perf_counter()
    adata = _train_data(data, None if name.startswith("default5") else SECTIONS,
                        "lazy" if name.endswith("store") else True)
    res["read_seconds"] = round(time.perf_counter() - t, 1)
    res["n_spots"] = int(adata.n_obs)
    if name == "cnn64":
        from st_predict.benchmark import Fold, SmallCNN
        from st_predict.pp import normalize_expression, select_genes

        libs = adata.obs["section"].astype(str).to_numpy()
        genes = select_genes(adata.X, adata.var_names, libs)
        y = normalize_expression(adata.X, adata.var_names.get_indexer(genes))
        setup = {"library_key": "section", "image_key": "hires", "spatial_key": "spatial", "patch_size": 224}
        fold = Fold("none", adata, adata, genes, y, libs, np.zeros((adata.n_obs, 1)), np.zeros((adata.n_obs, 1)),
                    {"setup": setup})
        times = {}
        for epochs in (1, 6):  # the difference leaves out cropping the patches and the set-up
            t = time.perf_counter()
            SmallCNN(epochs=epochs).fit(fold)
            times[epochs] = time.perf_counter() - t
        res["seconds_per_epoch"] = round((times[6] - times[1]) / 5, 2)
        res["setup_seconds"] = round(times[1] - res["seconds_per_epoch"], 1)
        res["note"] = "(fit of 6 epochs - fit of 1 epoch) / 5: training epochs only, as for NH2ST"
    elif name in ("nh2st64", "nh2st224", "nh2st224b8", "nh2st224b8store", "paper224"):
        kwargs = {"image_size": 224} if name.startswith("nh2st224") else {}
        train = {"batch_size": 8} if name.startswith("nh2st224b8") else {}
        if name.endswith("store"):
            import tempfile

            train["feature_cache"] = tempfile.mkdtemp(prefix="st-predict-patch-store-")
        if name == "paper224":
            kwargs = {"recipe": "paper"}  # 224 px, every node's patch with gradient, batch 8, float32
            train.update(limit_train_batches=12)
        res["peak_rss_gib_before_train"] = round(_peak_rss_gib(), 2)
        model = NH2ST(adata, encoder_weights="random", **kwargs)
        timer = _timer()
        epochs = 3 if name == "nh2st64" else 1
        t = time.perf_counter()
        model.train(max_epochs=epochs, progress=False, callbacks=[timer], **train)
        res["seconds_train_call"] = round(time.perf_counter() - t, 1)
        if "feature_cache" in train:
            import shutil

            res["patches"] = type(model._data.patches).__name__
            shutil.rmtree(train["feature_cache"], ignore_errors=True)
        res["precision"] = model.train_settings_["precision"]
        res["batch_size"] = model.train_settings_["batch_size"]
        if name == "paper224":
            b = np.array(timer.batches[1:])  # the first batch warms up
            p = np.array(timer.patches[1:])
            per_batch = float(b.mean())
            n_batches = res["n_spots"] // res["batch_size"]
            res["patches_per_s_fwd_bwd"] = round(float(p.sum() / b.sum()), 1)
            res["patches_per_batch"] = round(float(p.mean()), 1)
            res["seconds_per_epoch_estimated"] = round(per_batch * n_batches, 0)
        else:
            res["seconds_per_epoch"] = round(float(np.median(timer.epochs)), 2)
            res["epochs_seconds"] = [round(e, 2) for e in timer.epochs]
            res["target_patches_per_s_fwd_bwd"] = round(res["n_spots"] // res["batch_size"] * res["batch_size"]
                                                        / res["seconds_per_epoch"], 1)
        res["setup_seconds"] = round(res["seconds_train_call"] - sum(timer.epochs), 1)
    elif name == "predict64":
        model = NH2ST(adata, encoder_weights="random")
        model.train(max_epochs=1, progress=False)
        for tta in (False, True):
            t = time.perf_counter()
            model.get_predicted_expression(adata, tta=tta)
            res[f"spots_per_s_tta_{tta}".lower()] = round(adata.n_obs / (time.perf_counter() - t), 1)
    elif name in ("default5", "default5patch"):
        model = NH2ST(adata, encoder_weights="random", **({"context": "patch"} if name == "default5patch" else {}))
        res["context"] = model.module.context
        t = time.perf_counter()
        model.train(progress=False)
        res["seconds_train_call"] = round(time.perf_counter() - t, 1)
        res["max_epochs"] = model.train_settings_["max_epochs"]
        res["precision"] = model.train_settings_["precision"]
    else:
        raise SystemExit(f"unknown part {name!r}; choose from {PARTS}")
    res["peak_rss_gib"] = round(_peak_rss_gib(), 2)
    res["torch_threads"] = torch.get_num_threads()
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/her2st")
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    parser.add_argument("--part", default=None, choices=PARTS, help="run one part here and print its JSON")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.part:
        import logging

        logging.disable(logging.WARNING)
        print("RESULT " + json.dumps(_part(args.part, args.data)))
        return
    import torch

    import st_predict

    out = Path(args.out)
    res: dict = json.loads(out.read_text()) if out.exists() and set(args.parts) != set(PARTS) else {}
    res.update({
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "st_predict": st_predict.__version__,
        "spots": f"HER2ST {'+'.join(SECTIONS)}",
        "note": "each part in its own process, one after the other; nothing else running",
    })
    for part in args.parts:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--part", part, "--data", args.data],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"part {part} failed:\n{proc.stderr[-3000:]}")
        res[part] = json.loads(lines[-1][len("RESULT "):])
        res[part]["wall_seconds"] = round(time.perf_counter() - t, 1)
        print(part, json.dumps(res[part]), flush=True)
    if "cnn64" in res and "nh2st64" in res:
        res["nh2st64_epoch_over_cnn64_epoch"] = round(res["nh2st64"]["seconds_per_epoch"] / res["cnn64"]["seconds_per_epoch"], 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
