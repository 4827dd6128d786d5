"""Synthetic tissue, the HER2ST reader and fetcher, and the SpatialData front end."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import SMALL, her2st_path, setup
from PIL import Image

from st_predict import NH2ST
from st_predict.data import (
    fetch_her2st,
    from_spatialdata,
    read_her2st,
    synthetic_spatialdata,
    synthetic_tissue,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")


def test_synthetic_tissue_layout_and_signal():
    a = synthetic_tissue(n_sections=2, n_rows=6, n_cols=5, n_genes=30, seed=3)
    assert a.shape == (60, 30)
    assert list(a.obs["section"].cat.categories) == ["S0", "S1"]
    np.testing.assert_array_equal(a.X, np.round(a.X))
    assert (a.X >= 0).all()
    img = a.uns["spatial"]["S0"]["images"]["hires"]
    assert img.dtype == np.uint8 and img.shape == (7 * 32, 6 * 32, 3)
    np.testing.assert_array_equal(a.X, synthetic_tissue(n_sections=2, n_rows=6, n_cols=5, n_genes=30, seed=3).X)
    # the planted signal: program-0 genes follow program 0; with signal=0 they do not
    frac = a.X / a.X.sum(1, keepdims=True)
    r = np.corrcoef(a.obsm["programs"][:, 0], frac[:, :5].sum(1))[0, 1]
    flat = synthetic_tissue(n_sections=2, n_rows=6, n_cols=5, n_genes=30, seed=3, signal=0.0)
    frac0 = flat.X / flat.X.sum(1, keepdims=True)
    r0 = np.corrcoef(flat.obsm["programs"][:, 0], frac0[:, :5].sum(1))[0, 1]
    assert r > 0.8 and abs(r0) < 0.4, (r, r0)


# -- HER2ST format, on files the test makes --------------------------------------------------------
def _write_section(root: Path, sec: str, counts: pd.DataFrame, spots: pd.DataFrame, img: np.ndarray):
    for sub in ("counts", "spots", "images"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "counts" / f"{sec}.tsv.gz", "wt") as fh:
        counts.to_csv(fh, sep="\t")
    spots.to_csv(root / "spots" / f"{sec}_selection.tsv", sep="\t", index=False)
    Image.fromarray(img).save(root / "images" / f"{sec}_scan.jpg", quality=95)


def _tiny_her2st(root: Path):
    rng = np.random.default_rng(0)
    ids = ["2x3", "3x3", "4x5"]
    counts = pd.DataFrame([[1, 0, 5], [2, 3, 0], [0, 1, 1]], index=ids, columns=["GA", "GB", "GC"])
    # spot file in another order, with one extra spot that has no counts, and float array coords
    spots = pd.DataFrame(
        {"x": [4.0, 9.0, 2.0, 3.0], "y": [5.0, 9.0, 3.0, 3.0], "new_x": 0, "new_y": 0,
         "pixel_x": [400.5, 900, 200, 300], "pixel_y": [500, 900, 300, 300.25], "selected": 1}
    )
    _write_section(root, "A", counts, spots, rng.integers(0, 255, (700, 600, 3), dtype=np.uint8))
    counts_b = pd.DataFrame([[7, 1, 0, 2]], index=["1x1"], columns=["GA", "GB", "GD", "GC"])
    spots_b = pd.DataFrame({"x": [1], "y": [1], "pixel_x": [50], "pixel_y": [60]})
    _write_section(root, "B", counts_b, spots_b, rng.integers(0, 255, (120, 100, 3), dtype=np.uint8))


def test_read_her2st_joins_by_spot_id(tmp_path):
    _tiny_her2st(tmp_path)
    a = read_her2st(tmp_path)
    assert a.obs_names.tolist() == ["A_2x3", "A_3x3", "A_4x5", "B_1x1"]
    assert a.var_names.tolist() == ["GA", "GB", "GC"]  # genes shared by all sections
    np.testing.assert_array_equal(a.X.toarray(), [[1, 0, 5], [2, 3, 0], [0, 1, 1], [7, 1, 2]])
    np.testing.assert_array_equal(a.obsm["spatial"], [[200, 300], [300, 300.25], [400.5, 500], [50, 60]])
    assert a.obs["section"].tolist() == ["A", "A", "A", "B"]
    assert a.uns["spatial"]["A"]["images"]["hires"].shape == (700, 600, 3)
    assert a.uns["spatial"]["B"]["scalefactors"]["tissue_hires_scalef"] == 1.0
    # section A: nearest-neighbour spacing (median) 100 px on the 200 um grid -> 2 um per pixel
    assert a.uns["spatial"]["A"]["metadata"]["pixel_size_um"] == pytest.approx(2.0, rel=0.02)
    assert "pixel_size_um" not in a.uns["spatial"]["B"]["metadata"]  # one spot: no spacing to measure
    only_b = read_her2st(tmp_path, sections=["B"], load_images=False)
    assert only_b.n_obs == 1 and only_b.uns["spatial"]["B"]["images"] == {}


def test_read_her2st_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no 'counts' folder"):
        read_her2st(tmp_path)
    _tiny_her2st(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Sections \['Z'\] not found"):
        read_her2st(tmp_path, sections=["Z"])
    spots = pd.read_csv(tmp_path / "spots" / "A_selection.tsv", sep="\t")
    spots = spots[spots["x"] != 4.0]
    spots.to_csv(tmp_path / "spots" / "A_selection.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match=r"Section 'A': 1 spots have counts but no position, e.g. \['4x5'\]"):
        read_her2st(tmp_path)


def test_fetch_her2st_offline_says_what_to_download(tmp_path, monkeypatch):
    import pooch

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(pooch.HTTPDownloader, "__call__", offline)
    with pytest.raises(RuntimeError, match=r"Could not fetch counts/C2.tsv.gz .*almaan/her2st"):
        fetch_her2st(tmp_path)


def test_fetch_her2st_verifies_local_copies(tmp_path, monkeypatch):
    src = Path(her2st_path())
    import pooch

    calls = []
    monkeypatch.setattr(pooch.HTTPDownloader, "__call__", lambda *a, **k: calls.append(a))
    for sub in ("counts", "spots", "images"):
        shutil.copytree(src / sub, tmp_path / sub)
    assert fetch_her2st(tmp_path) == tmp_path
    assert calls == []  # every file matched its md5: nothing to download
    # a corrupted file is not silently accepted
    (tmp_path / "spots" / "C3_selection.tsv").write_text("x\ty\n")
    with pytest.raises(RuntimeError, match="C3_selection.tsv"):
        fetch_her2st(tmp_path)


@pytest.mark.her2st
def test_read_real_her2st_sections():
    path = Path(her2st_path())
    table = pd.read_csv(path / "sections.tsv", sep="\t", index_col=0)
    a = read_her2st(path, sections=["C2", "C3"])
    for sec in ("C2", "C3"):
        assert (a.obs["section"] == sec).sum() == table.loc[sec, "n_spots_matched"]
        h, w = a.uns["spatial"][sec]["images"]["hires"].shape[:2]
        assert (w, h) == (table.loc[sec, "image_w"], table.loc[sec, "image_h"])
    # ~0.735 um per pixel (DESIGN.md), from the 200 um spot grid
    for sec in ("C2", "C3"):
        assert a.uns["spatial"][sec]["metadata"]["pixel_size_um"] == pytest.approx(0.735, abs=0.01)
    # every 224 px patch lies inside its image (as PROVENANCE.md says)
    setup(a, patch_size=224)
    assert a.n_vars > 14000


# -- SpatialData -------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")
def test_spatialdata_trains_and_predicts_lazily(tmp_path):
    import dask.array as da
    import spatialdata as sd

    kw = {"n_sections": 2, "n_rows": 8, "n_cols": 8, "n_genes": 50, "seed": 1}
    sd_mem = synthetic_spatialdata(chunk_size=64, **kw)
    sd_mem.write(tmp_path / "tissue.zarr")
    sdata = sd.read_zarr(tmp_path / "tissue.zarr")
    table_before = sdata.tables["table"].copy()

    adata = from_spatialdata(sdata)
    img = adata.uns["spatial"]["S0"]["images"]["hires"]
    assert isinstance(img, da.Array) and img.shape == (9 * 32, 9 * 32, 3)  # lazy, read from zarr
    assert adata.obs["region"].tolist() == table_before.obs["region"].tolist()

    setup(adata, library_key="region")
    torch.manual_seed(0)
    model = NH2ST(adata, **SMALL)
    model.train(max_epochs=2, progress=False)
    pred = model.predict(adata)
    assert isinstance(adata.uns["spatial"]["S0"]["images"]["hires"], da.Array)

    # the same tissue as a plain in-memory AnnData gives the same patches, hence the same predictions
    plain = synthetic_tissue(**kw)
    plain.obs["region"] = plain.obs["section"]  # the model's library_key
    np.testing.assert_allclose(adata.obsm["spatial"], plain.obsm["spatial"])
    np.testing.assert_allclose(
        model.get_predicted_expression(plain).to_numpy(), pred.to_numpy(), rtol=1e-4, atol=1e-5
    )
    # the SpatialData table was not modified
    after = sdata.tables["table"]
    assert set(after.obsm) == set(table_before.obsm) and set(after.uns) == set(table_before.uns)
    pd.testing.assert_frame_equal(after.obs, table_before.obs)


def test_spatialdata_scaled_image(tmp_path):
    """A half-resolution image with a Scale transformation maps spots correctly (scale factor 0.5)."""
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, set_transformation

    sdata = synthetic_spatialdata(n_sections=1, n_rows=6, n_cols=6, n_genes=20)
    full = sdata.images["S0_image"]
    half = Image2DModel.parse(np.asarray(full.data)[:, ::2, ::2], dims=("c", "y", "x"))
    set_transformation(half, Scale([2.0, 2.0], axes=("y", "x")), to_coordinate_system="S0")
    scaled = SpatialData(images={"S0_half": half}, shapes=dict(sdata.shapes), tables=dict(sdata.tables))
    adata = from_spatialdata(scaled)
    assert adata.uns["spatial"]["S0"]["scalefactors"]["tissue_hires_scalef"] == pytest.approx(0.5)
    plain = synthetic_tissue(n_sections=1, n_rows=6, n_cols=6, n_genes=20)
    np.testing.assert_allclose(adata.obsm["spatial"], plain.obsm["spatial"])
    # the circles' diameter, for squidpy's spot size
    assert adata.uns["spatial"]["S0"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(
        plain.uns["spatial"]["S0"]["scalefactors"]["spot_diameter_fullres"])
    with pytest.raises(KeyError, match="no table 'cells'"):
        from_spatialdata(scaled, table_key="cells")


def test_select_sections_shares_images(tissue):
    from st_predict.data import select_sections

    before = {k: v.copy() for k, v in tissue.obsm.items()}
    sub = select_sections(tissue, ["S2", "S0"])
    assert sub.n_obs == 200 and set(sub.obs["section"]) == {"S0", "S2"}
    assert list(sub.obs["section"].cat.categories) == ["S0", "S2"]
    assert set(sub.uns["spatial"]) == {"S2", "S0"}
    assert sub.uns["spatial"]["S0"]["images"]["hires"] is tissue.uns["spatial"]["S0"]["images"]["hires"]
    np.testing.assert_array_equal(sub.X, tissue[tissue.obs["section"] != "S1"].X)
    sub.obsm["spatial"][:] = -1  # a copy: the source is untouched
    np.testing.assert_array_equal(tissue.obsm["spatial"], before["spatial"])
    with pytest.raises(KeyError, match=r"Sections \['S7'\] are not in"):
        select_sections(tissue, ["S7"])


def test_her2st_jpeg_reader_gives_pils_pixels_for_rgb_and_greyscale(tmp_path):
    from PIL import Image

    from st_predict.data._images import _read_image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=90)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.jpg", quality=90)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    for name in ("rgb.jpg", "grey.jpg", "rgb.png"):
        got = _read_image(tmp_path / name)
        with Image.open(tmp_path / name) as im:
            want = np.asarray(im.convert("RGB"))
        assert got.shape == (37, 53, 3) and got.dtype == np.uint8 and got.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(got, want)
