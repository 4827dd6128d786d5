"""A ViT-S/16 foundation-model encoder at 224 px on this CPU: feature extraction against the bare encoder,
train() with a cold feature cache against a warm one, and peak memory.

The encoder is the lazyslide-models registry key ``gigapath-flash`` (Prov-GigaPath-Flash: a DINOv2 ViT-S/16
with SwiGLU, 21.7 M parameters) loaded through ``NH2ST(encoder="gigapath-flash", encoder_weights=FILE)``,
the path a user with the published weights takes. No weights can be downloaded here, so FILE holds random
weights of that architecture, written by this script: the numbers are speed, memory and cache behaviour,
not accuracy.

Data: synthetic sections (``--sections`` x ``--side`` x ``--side`` spots), patches resampled to 224 px.
In one process, one after the other (nothing else running):
1. bare encoder: ``trunk(x)`` on ready, normalised 224 px tensors, batches of ``--batch`` (measured before
   and after 2.; their mean is the reference);
2. feature extraction through st_predict: patches read from the images, resampled, normalised and
   encoded (``model.encoder_maps``), same batch size;
3. ``train()`` with the default recipe (8 dihedral views cached) into an empty cache folder (cold), then a
   new model on the same data and folder (warm), ``--epochs`` epochs each.

Usage:  python benchmarks/bench_foundation_encoder.py [--sections 4] [--side 8] [--epochs 5]
Writes benchmarks/results/foundation_encoder.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch


def _vit_s16_gigapath_flash():
    """Random weights in GigaPath-Flash's architecture (as lazyslide-models builds it)."""
    import timm
    from timm.layers import SwiGLUPacked

    return timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, img_size=224, patch_size=16, embed_dim=384,
        depth=12, num_heads=6, mlp_ratio=2048 / 384.0, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU,
        init_values=1e-5, global_pool="token", class_token=True, reg_tokens=0,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", type=int, default=4)
    ap.add_argument("--side", type=int, default=8, help="spots per section side")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    import numpy as np

    from st_predict import NH2ST
    from st_predict.data import synthetic_tissue

    adata = synthetic_tissue(n_sections=args.sections, n_rows=args.side, n_cols=args.side, n_genes=50, seed=0)
    NH2ST.setup_anndata(adata, library_key="section", patch_size=32)
    res = {"encoder": "lazyslide:gigapath-flash (ViT-S/16, random weights)", "spots": adata.n_obs,
           "sections": args.sections, "epochs": args.epochs, "batch": args.batch, "threads": torch.get_num_threads(),
           "machine": f"{platform.machine()} {platform.processor()}", "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "gigapath_flash_random.bin"
        torch.manual_seed(0)
        torch.save(_vit_s16_gigapath_flash().state_dict(), weights)
        t = time.perf_counter()
        model = NH2ST(adata, encoder="gigapath-flash", encoder_weights=weights, n_genes=50)
        res["model_setup_s"] = round(time.perf_counter() - t, 2)
        net, info = model.module.trunk, model.module.encoder_info
        res["image_size"], res["feature_dim"] = model.module.image_size, info.out_channels
        n = adata.n_obs

        # 1. bare encoder forward on ready tensors, before and after 2. (the mean of both is the reference)
        x = torch.randn(args.batch, 3, 224, 224)
        batches = max(1, n // args.batch)

        @torch.no_grad()
        def bare() -> float:
            t = time.perf_counter()
            for _ in range(batches):
                net(x)
            return batches * args.batch / (time.perf_counter() - t)

        with torch.no_grad():
            net(x)  # warm-up
        before = bare()
        print("bare", round(before, 2), flush=True)

        # 2. the same encoder through st_predict: read, resample, normalise, encode
        reader = model._training_data().reader
        t = time.perf_counter()
        maps = model.encoder_maps(reader, views=1, batch_size=args.batch)
        extract = n / (time.perf_counter() - t)
        assert maps.shape == (n, info.out_channels, 1, 1)
        after = bare()
        res["bare_forward_patches_per_s"] = [round(before, 2), round(after, 2)]
        res["extraction_patches_per_s"] = round(extract, 2)
        res["extraction_over_bare"] = round(extract / ((before + after) / 2), 3)
        print("extraction", res["extraction_patches_per_s"], "bare after", round(after, 2), flush=True)

        # 3. train(): cold cache, then warm, each a new model
        cache = Path(tmp) / "features"
        for run in ("cold", "warm"):
            torch.manual_seed(0)
            model = NH2ST(adata, encoder="gigapath-flash", encoder_weights=weights, n_genes=50)
            t = time.perf_counter()
            model.train(max_epochs=args.epochs, progress=False, feature_cache=cache)
            res[f"train_s_{run}"] = round(time.perf_counter() - t, 2)
            print(run, res[f"train_s_{run}"], flush=True)
        res["views_cached"] = int(model._data.fmaps.shape[1]) if model._data.fmaps.ndim == 5 else 1
        res["warm_over_cold"] = round(res["train_s_warm"] / res["train_s_cold"], 4)
        res["cache_mb"] = round(sum(p.stat().st_size for p in cache.rglob("*.pt")) / 2**20, 2)
        pred = model.get_predicted_expression(adata, tta=False)
        res["predictions_finite"] = bool(np.isfinite(pred.to_numpy()).all())
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out = Path(__file__).parent / "results" / "foundation_encoder.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
