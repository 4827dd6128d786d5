"""Training at Visium HD scale on this CPU: 20 k against 200 k synthetic 16-um bins (one section each).

Each size runs in its own process (its own peak RSS), one after the other. A synthetic section
(``st_predict.data.synthetic_tissue``, 8-px bins at 2 um/px, i.e. 16-um bins, 60 genes) is set up with a
32-um patch (two bins across: the bin is the target, its surroundings the context; the synthetic image has a
margin of one bin). NH2ST at 64 px, batch 32 (``--mode patch``, the default here: each bin predicted from its
own patch, no neighbour branch; ``--mode default``: the default network, whose neighbour cache runs the trunk
over every unit before the first batch) trains one **sampled epoch** of ``--batches`` batches
(``train(max_epochs=1, limit_train_batches=...)``: the shuffled batches of the whole section, cut after that
many), and the script reports:

- the time of each up-front step: the synthetic data, ``setup_anndata`` (squidpy's neighbour graph), the model
  (gene selection), the patches (cropped once into the on-disk patch store, at both sizes);
- training units/s over the sampled epoch (forward + backward);
- the time a full epoch would take at that rate (extrapolated, labelled so);
- peak RSS (``VmHWM``, reset after the synthetic data is made: the generator's own float fields are not
  st_predict's), each step's own peak (reset after every step) and the ratio of the peaks between the sizes
  (goal: flat within 15 %).

Usage:  python benchmarks/bench_hd_scale.py [--sizes 142 450] [--batches 40]
Writes benchmarks/results/hd_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_gib(field: str = "VmHWM") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _step_peak() -> float:
    """The peak RSS since the last reset (``VmHWM``), then reset it to the current RSS: each step's own peak."""
    peak = _rss_gib()
    Path("/proc/self/clear_refs").write_text("5")
    return round(peak, 3)


def one(n_side: int, batches: int, mode: str = "patch") -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import scvi
    import torch

    from st_predict import NH2ST
    from st_predict.data import synthetic_tissue

    scvi.settings.seed = 0
    torch.manual_seed(0)
    out = {"n_side": n_side, "mode": mode, "seconds": {}}
    t = time.perf_counter()
    adata = synthetic_tissue(n_sections=1, n_rows=n_side, n_cols=n_side, n_genes=60, spot_spacing=8, seed=0)
    entry = adata.uns["spatial"]["S0"]
    entry["metadata"]["pixel_size_um"] = 2.0
    entry["scalefactors"]["spot_diameter_fullres"] = 8.0
    out["n_bins"] = int(adata.n_obs)
    out["seconds"]["data"] = round(time.perf_counter() - t, 1)
    out["rss_after_data_gib"] = round(_rss_gib("VmRSS"), 3)
    out["peak_rss_making_data_gib"] = round(_rss_gib(), 3)
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: setup and training, not the generator
    t = time.perf_counter()
    NH2ST.setup_anndata(adata, library_key="section", patch_size_um=32.0)
    out["seconds"]["setup_anndata"] = round(time.perf_counter() - t, 1)
    out["rss_gib"] = {"setup_anndata": round(_rss_gib("VmRSS"), 3)}
    out["step_peak_gib"] = {"setup_anndata": _step_peak()}
    t = time.perf_counter()
    net = {"context": "patch", "use_neighbor_branch": False} if mode == "patch" else {}
    model = NH2ST(adata, encoder_weights="random", n_genes=50, **net)
    out["seconds"]["model"] = round(time.perf_counter() - t, 1)
    out["rss_gib"]["model"] = round(_rss_gib("VmRSS"), 3)
    out["step_peak_gib"]["model"] = _step_peak()
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        # the on-disk patch store at both sizes (20 k would fit in memory: 245 MB), so that the sizes compare alike
        patches = model.training_patches(feature_cache=cache)
        out["patches"] = type(patches).__name__
        out["seconds"]["patches"] = round(time.perf_counter() - t, 1)
        out["rss_gib"]["patches"] = round(_rss_gib("VmRSS"), 3)
        out["step_peak_gib"]["patches"] = _step_peak()
        batch = 32
        t = time.perf_counter()
        model.train(max_epochs=1, batch_size=batch, limit_train_batches=batches, progress=False, validation=None)
        train_s = time.perf_counter() - t
    out["seconds"]["sampled_epoch"] = round(train_s, 1)
    out["rss_gib"]["after_training"] = round(_rss_gib("VmRSS"), 3)
    out["step_peak_gib"]["training"] = _step_peak()
    out["units_per_epoch"] = batches * batch
    out["units_per_s"] = round(batches * batch / train_s, 1)
    out["full_epoch_s_extrapolated"] = round(adata.n_obs / (batches * batch / train_s), 0)
    out["peak_rss_gib"] = max(out["step_peak_gib"].values())  # the peak after the data was made
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[142, 450], help="bins per side (142: 20,164; 450: 202,500)")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--mode", choices=("patch", "default"), default="patch",
                        help="patch: each bin from its own patch, no neighbour branch (no pass over every unit before "
                             "training); default: the default NH2ST, whose neighbour cache embeds every unit first")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/hd_scale.json")
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.batches, args.mode)), flush=True)
        return
    rows = []
    for n in args.sizes:
        res = subprocess.run([sys.executable, __file__, "--one", str(n), "--batches", str(args.batches), "--mode", args.mode],
                             capture_output=True, text=True, env={**os.environ})
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        if res.returncode or not line:
            sys.exit(f"size {n} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(line[-1]))
        print(json.dumps(rows[-1]), flush=True)
    summary = {"runs": rows}
    if len(rows) >= 2:
        summary["peak_rss_ratio_largest_over_smallest"] = round(rows[-1]["peak_rss_gib"] / rows[0]["peak_rss_gib"], 3)
        summary["units_per_s_ratio"] = round(rows[-1]["units_per_s"] / rows[0]["units_per_s"], 3)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
