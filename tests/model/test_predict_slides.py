"""Many slides in one call (issue 19): one dask task per slide on a LocalCluster, a manifest, a rerun that resumes."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("wsidata")
pytest.importorskip("lazyslide")
pytest.importorskip("distributed")

from helpers import model_with_pixel_size
from helpers import slide_tissue as _tissue
from helpers import write_slide as _write_slide

from st_predict import InputError
from st_predict.cli._main import main
from st_predict.tl._cohort import read_manifest, slide_table

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


@pytest.fixture(scope="module")
def saved(tissue, tmp_path_factory):
    """A small trained model whose training sections have a pixel size (0.5 um/px), saved."""
    torch.manual_seed(0)
    m = model_with_pixel_size(tissue)
    path = tmp_path_factory.mktemp("model") / "model"
    m.save(str(path))
    return m, str(path)


def _slides(folder, n: int, size: int = 768) -> list[str]:
    folder.mkdir(exist_ok=True)
    return [_write_slide(folder / f"slide{i}.tif", _tissue(size + 128 * i, seed=i), mpp=0.5) for i in range(n)]


def _table(path):
    import spatialdata

    return spatialdata.read_zarr(path).tables["nh2st"]


def test_three_slides_one_corrupt_on_two_workers(saved, tmp_path, capsys):
    model, model_dir = saved
    good = _slides(tmp_path / "in", 2)
    bad = tmp_path / "in" / "broken.tif"
    data = open(good[0], "rb").read()
    bad.write_bytes(data[: len(data) // 3])  # a truncated copy: the header reads, the tiles do not
    # scanned at 1 um/px, coarser than the model's 0.5 um/px tiles: predicted, its warning in the manifest
    coarse = _write_slide(tmp_path / "in" / "coarse.tif", _tissue(512, seed=5), mpp=1.0)
    out = tmp_path / "out"
    code = main(["predict-slides", model_dir, *good, str(bad), coarse, "--out", str(out), "--workers", "2",
                 "--quiet", "--pitch-um", "40"])
    assert code == 3  # some failed
    printed = capsys.readouterr().out
    assert "4 slides: 3 done (0 by an earlier run), 1 failed" in printed and "failed broken:" in printed
    manifest = read_manifest(out).set_index("slide_id")
    assert sorted(manifest.index) == ["broken", "coarse", "slide0", "slide1"]
    assert manifest.loc["coarse", "status"] == "done" and manifest.loc["coarse", "tiles"] > 0
    warned = manifest.loc["coarse", "warning"]
    assert "coarser than the model's tiles" in warned and "upsampled 2.00x" in warned and warned in printed
    assert (manifest.loc[["slide0", "slide1", "broken"], "warning"] == "").all()
    assert _table(out / "coarse.zarr").uns["st_predict"]["upsampling"] == 2.0
    assert manifest.loc["broken", "status"] == "failed" and "is truncated or corrupted" in manifest.loc["broken", "error"]
    assert manifest.loc["broken", "error"] in printed
    assert not (out / "broken.zarr").exists()
    for path in good:
        sid = os.path.basename(path)[:-4]
        assert manifest.loc[sid, "status"] == "done" and manifest.loc[sid, "seconds"] > 0
        # the worker's output equals predict_slide on the same slide in this process
        ref = model.predict_slide(path, pitch_um=40.0, progress=False).tables["nh2st"]
        got = _table(out / f"{sid}.zarr")
        assert manifest.loc[sid, "tiles"] == ref.n_obs == got.n_obs > 10
        np.testing.assert_array_equal(got.obs["tile_id"].to_numpy(), ref.obs["tile_id"].to_numpy())
        np.testing.assert_allclose(got.X, ref.X, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.obsm["spatial"], ref.obsm["spatial"])
    # each output is its own slide's (the slides differ in size)
    assert manifest.loc["slide0", "tiles"] < manifest.loc["slide1", "tiles"]
    # nothing half-written is left
    assert sorted(p.name for p in out.iterdir()) == ["coarse.zarr", "manifest.csv", "slide0.zarr", "slide1.zarr"]


def test_rerun_after_a_kill_skips_finished_slides(saved, tmp_path):
    _, model_dir = saved
    slides = _slides(tmp_path / "in", 3, size=896)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "st_predict", "predict-slides", model_dir, *slides, "--out", str(out), "--workers",
           "1", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done_before = []
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if (out / "manifest.csv").is_file():
                m = read_manifest(out)
                done_before = list(m.loc[m["status"] == "done", "slide_id"])
                if done_before:
                    break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its dask workers, with no chance to clean up
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    assert 1 <= len(done_before) < 3, done_before
    killed = read_manifest(out).set_index("slide_id")
    first = done_before[0]
    stamp = killed.loc[first, "finished"]
    mtime = os.stat(out / f"{first}.zarr" / "zarr.json").st_mtime_ns

    code = main(["predict-slides", model_dir, *slides, "--out", str(out), "--workers", "1", "--quiet"])
    assert code == 0
    manifest = read_manifest(out).set_index("slide_id")
    assert (manifest["status"] == "done").all() and len(manifest) == 3
    for sid in killed.index[killed["status"] == "done"]:  # skipped: neither predicted nor written again
        assert manifest.loc[sid, "finished"] == killed.loc[sid, "finished"]
    assert manifest.loc[first, "finished"] == stamp
    assert os.stat(out / f"{first}.zarr" / "zarr.json").st_mtime_ns == mtime
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    for sid in manifest.index:
        assert _table(out / f"{sid}.zarr").n_obs == manifest.loc[sid, "tiles"] > 0


@pytest.fixture
def client():
    """One local cluster of one worker process for a test's several calls (each call would start its own)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster) as c:
        yield c


def test_python_api_resumes_and_retries_failed(saved, tmp_path, capsys, client):
    model, _ = saved
    slides = _slides(tmp_path / "in", 2)
    missing = str(tmp_path / "in" / "gone.tif")
    csv = tmp_path / "in" / "slides.csv"
    pd.DataFrame({"slide": ["slide0.tif", "gone.tif"], "slide_id": ["A", "B"], "mpp": [0.5, np.nan]}).to_csv(csv, index=False)
    out = tmp_path / "out"
    rows = model.predict_slides(csv, out, client=client, progress=False, pitch_um=40.0, image_mpp=None)
    assert list(rows["status"]) == ["done", "failed"] and "does not exist" in rows["error"].iloc[1]
    # the missing slide appears: a rerun predicts it only
    os.replace(slides[1], missing)
    rows = model.predict_slides(csv, out, client=client, progress=False, pitch_um=40.0, image_mpp=None)
    assert list(rows["status"]) == ["done", "done"]
    assert "2 slides: 2 done (1 by an earlier run), 0 failed" in capsys.readouterr().out
    # another list into the same folder: its rows join the manifest, the others' are kept
    rows = model.predict_slides([slides[0]], out, client=client, progress=False, pitch_um=40.0, image_mpp=None)
    assert list(rows["slide_id"]) == ["slide0"] and list(rows["status"]) == ["done"]
    assert sorted(read_manifest(out)["slide_id"]) == ["A", "B", "slide0"]
    assert not list(out.glob(".model-*"))  # the model copy for the workers is removed


def test_slide_table_checks_ids(tmp_path):
    assert list(slide_table(["/a/TCGA-1.svs", "/b/x.ome.tif", "/c/s.zarr"])["slide_id"]) == ["TCGA-1", "x", "s"]
    with pytest.raises(InputError, match="unique.*'s1'"):
        slide_table(["/a/s1.svs", "/b/s1.tif"])
    with pytest.raises(InputError, match="'slide' column"):
        slide_table(pd.DataFrame({"path": ["a.svs"]}))
