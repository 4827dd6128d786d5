"""Throughput of ``NH2ST.predict_slides`` on a cohort of synthetic slides: 1 worker x 2 torch threads
against 2 workers x 1 thread, on this machine (CPU), and what that gives for 1,000 slides on a cluster.

Writes ``--slides`` (default 20) tiled, zlib-compressed pyramidal TIFFs, ``--side`` px on a side (default
8000: 4 x 4 mm at 0.5 um/px), in the way of ``bench_slide_memory.py`` (textured round blobs on white, written
tile by tile), each slide's blobs shifted and resized a little by its own seed. The model is the package's
default network (ResNet18 trunk, the default ``image_size``, the default test-time augmentation) with random
weights (no internet here), trained for one epoch on ``st_predict.data.synthetic_tissue`` sections whose
pixel size is recorded (0.5 um/px, spots 200 px = 100 um apart, 224 px = 112 um patches), so it tiles a
slide every 100 um with 112 um tiles, as a Visium-trained model would.

Each configuration gets a fresh output folder and its own ``distributed.LocalCluster`` (one-thread worker
processes), passed to ``predict_slides(client=...)`` with ``threads_per_worker=``; afterwards each worker's
peak RSS is read with ``client.run``. Timed: the cluster's start-up, and ``predict_slides`` itself.

From the manifest's seconds and finish times: the most slides in flight at once (at most one per worker
since each task computes its slide's dask arrays itself; before that, a task waiting on the cluster let its
worker start the next slide). Also measured: one slide in this process with one torch thread (tissue
detection, the cost of a tile, writing), for the estimate by parts.

Usage:  python benchmarks/bench_cohort.py [--slides 20] [--side 8000] [--keep DIR]
Writes benchmarks/results/cohort.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_slide_memory import BLOBS, MPP, write_slide  # the same slides, one layout per seed

SPACING_PX, PATCH_PX = 200, 224  # training spots 100 um apart, 112 um patches, at MPP
# (workers, torch threads per worker)
CONFIGS = ((1, 2), (2, 1))
# the 1,000-slide estimate: what is assumed (not measured here)
N_SLIDES, N_NODES, CORES_PER_NODE = 1000, 10, 32
TCGA_TISSUE_MM2 = 150.0  # tissue of one diagnostic slide, assumed: a 15 x 10 mm section
TCGA_SCAN_MM, TCGA_DETECT_MPP = (25.0, 15.0), 4.0  # its scanned area, and the pyramid level tissue is found on
IMAGE_MPP = 2.0  # predict_slide's default output image resolution


def slide_blobs(seed: int) -> tuple:
    """``BLOBS`` with each centre shifted by up to 0.04 of the side and each radius scaled by 0.85-1.15."""
    rng = np.random.default_rng(seed)
    return tuple((cy + rng.uniform(-0.04, 0.04), cx + rng.uniform(-0.04, 0.04), r * rng.uniform(0.85, 1.15))
                 for cy, cx, r in BLOBS)


def train(model_dir: Path) -> dict:
    """The default NH2ST (random weights), one epoch on synthetic sections with a recorded pixel size; saved."""
    import torch

    from st_predict import NH2ST
    from st_predict.data import synthetic_tissue

    torch.manual_seed(0)
    adata = synthetic_tissue(n_sections=2, n_rows=10, n_cols=10, n_genes=300, spot_spacing=SPACING_PX, seed=0)
    for lib in adata.uns["spatial"]:
        adata.uns["spatial"][lib].setdefault("metadata", {})["pixel_size_um"] = MPP
    NH2ST.setup_anndata(adata, library_key="section", patch_size=PATCH_PX)
    t = time.perf_counter()
    model = NH2ST(adata, encoder_weights="random")
    model.train(max_epochs=1, progress=False)
    seconds = time.perf_counter() - t
    model.save(str(model_dir), overwrite=True)
    return {"train_seconds_1_epoch": round(seconds, 1), "image_size": int(model.module.image_size),
            "trunk": "ResNet18 (random weights)", "n_genes": len(model.genes_), "tta": bool(model.tta_),
            "patch_size_um": float(model.patch_size_um_), "pitch_um": float(model.spot_pitch_um_)}


def code_version() -> dict:
    """The commit measured, and whether st_predict/ differed from it."""
    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "st_predict"], capture_output=True, text=True).stdout
    return {"commit": head, "st_predict_modified": bool(dirty.strip())}


def machine() -> dict:
    from joblib import (
        cpu_count as available_cores,  # the cores this process may use, as st_predict counts them
    )

    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cores": available_cores(), "cpu": cpu, "python": platform.python_version()}


def others() -> dict:
    """The load average and the busiest processes that are not this one or its children."""
    ps = subprocess.run(["ps", "-eo", "pid,ppid,pcpu,etimes,args", "--sort=-pcpu"], capture_output=True, text=True)
    mine = {os.getpid()}
    rows = []
    for ln in ps.stdout.splitlines()[1:]:
        parts = ln.split(None, 4)
        if len(parts) < 5:
            continue
        pid, ppid = int(parts[0]), int(parts[1])
        if pid in mine or ppid in mine:
            mine.add(pid)
            continue
        if float(parts[2]) >= 5:
            rows.append(f"{parts[2]}% (lifetime) {parts[4][:120]}")
    return {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()], "busy_processes": rows[:5]}


def _peak_rss_kib() -> int:
    import resource as r

    return r.getrusage(r.RUSAGE_SELF).ru_maxrss


def _worker_threads() -> dict:
    import os as o
    import sys as s

    torch = s.modules.get("torch")
    return {"OMP_NUM_THREADS": o.environ.get("OMP_NUM_THREADS"),
            "torch_threads": torch.get_num_threads() if torch is not None else None}


def in_flight(manifest) -> int:
    """The most slides whose [finished - seconds, finished] intervals overlap (``finished`` has 1 s resolution)."""
    import pandas as pd

    end = pd.to_datetime(manifest["finished"]).astype("int64").to_numpy() / 1e9 + 0.5
    start = end - manifest["seconds"].to_numpy(float) + 1.0  # overlaps of less than the timestamps' 1 s do not count
    events = sorted([(s, 1) for s in start] + [(e, -1) for e in end], key=lambda x: (x[0], x[1]))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def run_config(model, slides: list[str], out: Path, workers: int, threads: int) -> dict:
    from distributed import Client, LocalCluster

    from st_predict.tl import read_manifest

    before = others()
    t = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.wait_for_workers(workers)
        startup = time.perf_counter() - t
        env = client.run(_worker_threads)
        t = time.perf_counter()
        rows = model.predict_slides(slides, out, client=client, threads_per_worker=threads, progress=False)
        wall = time.perf_counter() - t
        rss = client.run(_peak_rss_kib)
        after = client.run(_worker_threads)
    manifest = read_manifest(out)
    if (rows["status"] != "done").any():
        raise SystemExit(f"slides failed:\n{rows[rows['status'] != 'done'].to_string()}")
    tiles = int(manifest["tiles"].sum())
    secs = manifest["seconds"].to_numpy(float)
    res = {
        "workers": workers, "torch_threads_per_worker": threads, "before": before,
        "cluster_startup_s": round(startup, 2), "wall_s": round(wall, 1),
        "slides": len(manifest), "tiles": tiles,
        "slides_per_min": round(len(manifest) / wall * 60, 2), "tiles_per_s": round(tiles / wall, 1),
        "tiles_per_s_per_core": round(tiles / wall / (workers * threads), 1),
        "slide_seconds": {"first_per_worker": [round(x, 1) for x in secs[:workers]],
                          "mean_of_the_others": round(float(secs[workers:].mean()), 2) if len(secs) > workers
                          else float("nan"),
                          "min": round(float(secs.min()), 2), "max": round(float(secs.max()), 2),
                          "sum": round(float(secs.sum()), 1)},
        "worker_busy_fraction": round(float(secs.sum()) / (wall * workers), 3),
        "most_slides_in_flight": in_flight(manifest),
        "peak_rss_mib_per_worker": sorted(round(v / 1024, 0) for v in rss.values()),
        "worker_threads_before_run": sorted(map(str, env.values())),
        "worker_threads_after_run": sorted(map(str, after.values())),
        "output_mib": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 1),
    }
    return res


def parts(model, slide: str, folder: Path) -> dict:
    """One slide in this process with 1 torch thread, after one untimed pass: tissue detection alone (on the
    level predict_slide uses), predict_slide at the model's pitch and
    at half of it (the difference: the cost of a tile), and writing the output with and without its image."""
    import lazyslide as zs
    import torch
    import wsidata

    from st_predict.tl import write_prediction

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    res: dict = {}
    try:
        model.predict_slide(slide, progress=False, num_workers=0)
        wsi = wsidata.open_wsi(slide)
        level_mpp = [wsi.properties.mpp * d for d in wsi.properties.level_downsample]
        used = max((i for i, m in enumerate(level_mpp) if m <= model.patch_size_um_ / 4), key=lambda i: level_mpp[i])
        h, w = wsi.properties.level_shape[used]
        t = time.perf_counter()
        zs.pp.find_tissues(wsi, level=used, method="entropy", key_added="timed")
        sec = time.perf_counter() - t
        res["find_tissues"] = {"level_mpp": level_mpp[used], "px": [int(h), int(w)], "s": round(sec, 2),
                               "s_per_mpx": round(sec / (h * w / 1e6), 3)}
        t = time.perf_counter()
        sdata = model.predict_slide(slide, progress=False, num_workers=0)
        res["predict_slide_s"] = round(time.perf_counter() - t, 2)
        res["tiles"] = n = int(sdata.tables["nh2st"].n_obs)
        t = time.perf_counter()
        write_prediction(sdata, "nh2st", folder / "parts.zarr")
        res["write_s"] = round(time.perf_counter() - t, 2)
        del sdata.images["nh2st_image"]
        t = time.perf_counter()
        write_prediction(sdata, "nh2st", folder / "parts_noimage.zarr")
        res["write_without_image_s"] = round(time.perf_counter() - t, 2)
        h, w = wsi.properties.level_shape[0]
        res["image_mpx"] = round(h * w * (MPP / IMAGE_MPP) ** 2 / 1e6, 2)
        t = time.perf_counter()
        dense = model.predict_slide(slide, progress=False, num_workers=0, pitch_um=model.spot_pitch_um_ / 2,
                                    image_mpp=None)
        res["predict_slide_half_pitch_s"] = round(time.perf_counter() - t, 2)
        res["tiles_half_pitch"] = n2 = int(dense.tables["nh2st"].n_obs)
        res["s_per_tile"] = round((res["predict_slide_half_pitch_s"] - res["predict_slide_s"]) / (n2 - n), 5)
    finally:
        torch.set_num_threads(before)
    return res


def default_threads_on_a_cluster() -> dict:
    """What torch uses in a dask worker (nanny) when nobody sets its threads: the nanny's OMP_NUM_THREADS."""
    from distributed import Client, LocalCluster

    def probe():
        import os as o

        import torch

        return {"OMP_NUM_THREADS": o.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()}

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        return next(iter(client.run(probe).values()))


def estimate(runs: dict, part: dict, tiles_per_slide: float, pitch_um: float) -> dict:
    """1,000 slides on 10 nodes of 32 cores, one single-thread worker per core, from the rates measured here."""
    two = runs["2w1t"]  # 2 one-thread workers on 2 cores: the layout assumed for the nodes
    per_core = two["tiles_per_s_per_core"]
    workers = N_NODES * CORES_PER_NODE
    others = two["slide_seconds"]["mean_of_the_others"]
    start_s = np.mean(two["slide_seconds"]["first_per_worker"]) - others if np.isfinite(others) else 0.0
    tcga_tiles = TCGA_TISSUE_MM2 / (pitch_um / 1000) ** 2
    all_in = N_SLIDES * tcga_tiles / (workers * per_core)
    # by parts: the tiles at the marginal cost of a tile, and what grows with the scanned area, not the tissue
    detect_mpx = TCGA_SCAN_MM[0] * TCGA_SCAN_MM[1] / TCGA_DETECT_MPP**2
    image_mpx = TCGA_SCAN_MM[0] * TCGA_SCAN_MM[1] / IMAGE_MPP**2
    tiles_s = tcga_tiles * part["s_per_tile"]
    detect_s = detect_mpx * part["find_tissues"]["s_per_mpx"]
    image_s = image_mpx * max(0.0, part["write_s"] - part["write_without_image_s"]) / part["image_mpx"]
    per_slide = tiles_s + detect_s + image_s
    synth_per_slide = two["wall_s"] * two["workers"] / two["slides"]  # worker-seconds per slide, all in
    return {
        "assumptions": (
            f"{N_NODES} nodes of {CORES_PER_NODE} cores, one dask worker per core with 1 torch thread ({workers} "
            "workers), each core as fast as one of this machine's; a TCGA diagnostic slide with "
            f"{TCGA_TISSUE_MM2:g} mm^2 of tissue (assumed: a 15 x 10 mm section) tiled every {pitch_um:g} um (the "
            f"model's pitch), on a {TCGA_SCAN_MM[0]:g} x {TCGA_SCAN_MM[1]:g} mm scan whose tissue is found at "
            f"{TCGA_DETECT_MPP:g} um/px (a 40x scan's 16x pyramid level) and whose output image is written at "
            f"{IMAGE_MPP:g} um/px (predict_slide's default); the shared file system keeps up; no time in the queue. "
            "'all_in': the tiles at the all-in rate of the 2-worker run (these small slides' per-slide costs "
            "included, so pessimistic for slides with many tiles). 'by_parts': the tiles at the marginal cost of a "
            "tile, plus tissue detection and the output image at their rates per Mpx (one slide here, one process, "
            "1 torch thread), plus each worker's start-up (import and model load) once."),
        "workers": workers, "tiles_per_s_per_core_all_in": per_core, "s_per_tile_marginal": part["s_per_tile"],
        "worker_start_s": round(float(start_s), 1),
        "tcga_tiles_per_slide": round(tcga_tiles),
        "tcga_all_in": {"worker_s_per_slide": round(tcga_tiles / per_core, 1), "minutes": round(all_in / 60, 1)},
        "tcga_by_parts": {"worker_s_per_slide": round(per_slide, 1), "tiles_s": round(tiles_s, 1),
                          "find_tissues_s": round(detect_s, 1), "image_s": round(image_s, 1),
                          "minutes": round((N_SLIDES * per_slide / workers + start_s) / 60, 1)},
        "synthetic_tiles_per_slide": round(tiles_per_slide, 1),
        "synthetic_worker_s_per_slide": round(synth_per_slide, 2),
        "synthetic_like_minutes": round(N_SLIDES * synth_per_slide / workers / 60, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slides", type=int, default=20)
    parser.add_argument("--side", type=int, default=8000, help="slide side in px at 0.5 um/px")
    parser.add_argument("--keep", default=None, help="folder for the slides, model and outputs (default: temporary)")
    parser.add_argument("--out", default="benchmarks/results/cohort.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("distributed").setLevel(logging.ERROR)
    start = time.perf_counter()
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), **code_version(), "machine": machine(),
                 "before_start": others()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        (folder / "slides").mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        slides = []
        for i in range(args.slides):
            path = folder / "slides" / f"slide{i:02d}.tif"
            write_slide(path, args.side, slide_blobs(i))
            slides.append(str(path))
        res["slides"] = {"n": args.slides, "side_px": args.side, "mpp": MPP,
                         "side_mm": args.side * MPP / 1000, "write_s": round(time.perf_counter() - t, 1),
                         "file_mib_each": round(np.mean([os.path.getsize(p) for p in slides]) / 2**20, 1)}
        print("slides", json.dumps(res["slides"]), flush=True)
        res["model"] = train(folder / "model")
        print("model", json.dumps(res["model"]), flush=True)
        from st_predict import NH2ST
        from st_predict.tl import read_manifest

        model = NH2ST.load(str(folder / "model"), accelerator="cpu")
        runs = {}
        for workers, threads in CONFIGS:
            name = f"{workers}w{threads}t"
            runs[name] = run_config(model, slides, folder / f"out_{name}", workers, threads)
            print(name, json.dumps(runs[name]), flush=True)
        tiles = read_manifest(folder / "out_2w1t").set_index("slide_id")["tiles"]
        res["slides"]["tiles_per_slide"] = {"min": int(tiles.min()), "mean": round(float(tiles.mean()), 1),
                                            "max": int(tiles.max()), "each": {k: int(v) for k, v in tiles.items()}}
        res["runs"] = runs
        res["throughput_2_workers_over_1"] = round(runs["2w1t"]["tiles_per_s"] / runs["1w2t"]["tiles_per_s"], 3)
        res["one_slide_in_process"] = parts(model, slides[-1], folder)
        print("one slide", json.dumps(res["one_slide_in_process"]), flush=True)
        res["default_threads_in_a_dask_worker"] = default_threads_on_a_cluster()
        res["estimate_1000_slides"] = estimate(runs, res["one_slide_in_process"], float(tiles.mean()),
                                               res["model"]["pitch_um"])
    res["main_process_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    res["total_s"] = round(time.perf_counter() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
