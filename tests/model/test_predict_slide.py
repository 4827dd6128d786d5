"""Whole-slide prediction on pyramidal TIFF slides that the tests write (tissue-like blobs on white)."""

import gc

import numpy as np
import pytest
import torch

pytest.importorskip("wsidata")
pytest.importorskip("lazyslide")

from helpers import BLOBS, SMALL, setup
from helpers import model_with_pixel_size as _model_with_pixel_size
from helpers import slide_tissue as _tissue
from helpers import write_slide as _write_slide

from st_predict import NH2ST


@pytest.fixture(scope="module")
def model(tissue):
    torch.manual_seed(0)
    adata = tissue[tissue.obs["section"] != "S2"].copy()
    setup(adata)
    # each tile predicted from its own pixels, so that a stand-in network can show which pixels a tile
    # holds (test_context.py predicts a slide with the default, neighbourhood model)
    m = NH2ST(adata, **SMALL, context="patch")
    m.train(max_epochs=1, progress=False)
    return m


def test_tiles_cover_tissue_and_skip_background(model, tmp_path):
    path = _write_slide(tmp_path / "slide.tif", _tissue(2048), mpp=0.5)
    sd = model.predict_slide(path, tile_size_um=32.0, pitch_um=40.0, progress=False)
    table = sd.tables["nh2st"]
    assert table.n_obs > 50 and list(table.var_names) == list(model.genes_)
    assert np.isfinite(table.X).all()
    # every tile centre lies on a blob, and both blobs get tiles
    centres = table.obsm["spatial"] / 2048
    d = np.stack([np.hypot(centres[:, 1] - cy, centres[:, 0] - cx) / r for cy, cx, r in BLOBS])
    assert (d.min(0) < 1.0).all()
    assert (d[0] < 1).sum() > (d[1] < 1).sum() > 5  # the larger blob has more tiles
    # on each piece of tissue the grid pitch is 40 um = 80 level-0 px
    assert set(table.obs["tissue_id"]) == {0, 1}
    for tid in (0, 1):
        xy = table.obsm["spatial"][table.obs["tissue_id"].to_numpy() == tid]
        for axis in (0, 1):
            steps = np.diff(np.unique(xy[:, axis]))
            np.testing.assert_allclose(steps, 80, atol=1)
    meta = table.uns["st_predict"]
    assert meta["slide_mpp"] == 0.5 and meta["patch_size_um"] == 32.0 and meta["pitch_um"] == 40.0
    # tissue was found at 2 um/px (16 px per tile side), averaged down from full resolution (the levels at 1 and 2 um/px
    # are not 4x finer), and its image never held the whole slide at full resolution
    assert meta["tissue_mpp"] == 2.0 and meta["tissue_level"] == 0


def _predict_colour_stats(model, monkeypatch):
    """Swap in a stand-in network whose "expression" is each tile's colour statistics, so that
    predictions show exactly which pixels were cropped."""
    n_genes = len(model.genes_)

    def colour_stats(batch, tta=False):
        x = batch["patches"].float()
        assert x.shape[-2:] == (model.module.image_size,) * 2
        stats = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
        return stats.repeat(1, n_genes // 6 + 1)[:, :n_genes]

    monkeypatch.setattr(model.module, "predict_expression", colour_stats)


def _paired(a, mpp_a, b, mpp_b, tol_um: float = 2.0):
    """Rows of two tables whose tile centres lie within ``tol_um`` micrometres of each other (tissue found
    on another pyramid level may shift the grid by a pixel or two)."""
    from scipy.spatial import cKDTree

    xa, xb = a.obsm["spatial"] * mpp_a, b.obsm["spatial"] * mpp_b
    dist, j = cKDTree(xb).query(xa)
    keep = dist <= tol_um
    return np.asarray(a.X)[keep], np.asarray(b.X)[j[keep]]


def test_two_scan_resolutions_give_the_same_physical_crops(model, tmp_path, monkeypatch):
    _predict_colour_stats(model, monkeypatch)
    img = _tissue(1024)
    coarse = _write_slide(tmp_path / "coarse.tif", img, mpp=0.5)
    fine = _write_slide(tmp_path / "fine.tif", np.repeat(np.repeat(img, 2, 0), 2, 1), mpp=0.25, levels=4)
    kw = {"tile_size_um": 32.0, "pitch_um": 40.0, "progress": False}
    a = model.predict_slide(coarse, **kw).tables["nh2st"]
    b = model.predict_slide(fine, **kw).tables["nh2st"]
    um_a = {tuple(np.round(xy * 0.5).astype(int)): i for i, xy in enumerate(a.obsm["spatial"])}
    um_b = {tuple(np.round(xy * 0.25).astype(int)): i for i, xy in enumerate(b.obsm["spatial"])}
    common = sorted(set(um_a) & set(um_b))
    assert len(common) >= 0.8 * max(len(um_a), len(um_b))
    pa = np.asarray(a.X)[[um_a[k] for k in common]]
    pb = np.asarray(b.X)[[um_b[k] for k in common]]
    np.testing.assert_allclose(pa, pb, atol=1.0)  # colour levels out of 255
    # the tiles are tissue, not background
    assert (pa[:, :3].mean(1) < 220).all()
    # each tile covers 32 um of tissue: 64 level-0 px at 0.5 um/px, 128 px at 0.25 um/px
    for sdata_mpp, path in ((0.5, coarse), (0.25, fine)):
        tiles = model.predict_slide(path, **kw).shapes["nh2st_tiles"]
        sides = tiles.geometry.bounds
        np.testing.assert_allclose(sides["maxx"] - sides["minx"], 32.0 / sdata_mpp)
        np.testing.assert_allclose(sides["maxy"] - sides["miny"], 32.0 / sdata_mpp)
    # and a crop of another physical size sees other pixels: 64 um tiles reach the background
    c = model.predict_slide(coarse, **{**kw, "tile_size_um": 64.0}).tables["nh2st"]
    assert np.asarray(c.X)[:, :3].mean() > pa[:, :3].mean() + 1.0


@pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")  # anndata's notice when writing the zarr
def test_slide_output_round_trips_through_zarr(model, tmp_path):
    import spatialdata as sd_

    path = _write_slide(tmp_path / "slide.tif", _tissue(1024), mpp=0.5)
    sdata = model.predict_slide(path, tile_size_um=32.0, pitch_um=40.0, progress=False)
    out = tmp_path / "pred.zarr"
    sd_.SpatialData(shapes=dict(sdata.shapes), tables=dict(sdata.tables)).write(out)
    back = sd_.read_zarr(out)
    np.testing.assert_allclose(back.tables["nh2st"].X, sdata.tables["nh2st"].X)
    np.testing.assert_allclose(back.tables["nh2st"].obsm["spatial"], sdata.tables["nh2st"].obsm["spatial"])
    assert len(back.shapes["nh2st_tiles"]) == sdata.tables["nh2st"].n_obs


def test_bad_slides_get_clear_errors(model, tmp_path):
    no_mpp = _write_slide(tmp_path / "no_mpp.tif", _tissue(1024), mpp=None)
    with pytest.raises(ValueError, match=r"records no micrometres per pixel; pass mpp="):
        model.predict_slide(no_mpp, tile_size_um=32.0, progress=False)
    assert model.predict_slide(no_mpp, mpp=0.5, tile_size_um=32.0, progress=False).tables["nh2st"].n_obs > 0
    with pytest.warns(FutureWarning, match="use tile_size_um="):  # the old name, kept for one release
        assert model.predict_slide(no_mpp, mpp=0.5, patch_size_um=32.0, progress=False).tables["nh2st"].n_obs > 0
    blank = _write_slide(tmp_path / "blank.tif", np.full((1024, 1024, 3), 242, np.uint8), mpp=0.5)
    with pytest.raises(ValueError, match="No tissue found"):
        model.predict_slide(blank, tile_size_um=32.0, progress=False)
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        model.predict_slide(tmp_path / "missing.tif", tile_size_um=32.0)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a tiff at all")
    with pytest.raises(ValueError, match="Could not open"):
        model.predict_slide(broken, tile_size_um=32.0)
    assert model.patch_size_um_ is None  # the synthetic tissue has no pixel size
    with pytest.raises(ValueError, match="tile_size_um="):
        model.predict_slide(no_mpp, mpp=0.5, progress=False)


def test_glass_or_black_background_with_sensor_noise_is_no_tissue(model, tmp_path):
    from st_predict.cli._main import main

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 4, size=(1024, 1024, 3))
    # lazyslide's detector can find "tissue" in the noise of glass or of a black background (on the pixels averaged
    # for detection it mostly does not); no pixel of it is stained, which the stain check says where it does
    from st_predict.tl._slide_checks import check_stained

    for name, img in (("glass", 240 + noise), ("black", 8 + noise)):
        path = _write_slide(tmp_path / f"{name}.tif", img.astype(np.uint8), mpp=0.5)
        with pytest.raises(ValueError, match=rf"No tissue found on the slide .*{name}\.tif"):
            model.predict_slide(path, tile_size_um=32.0, progress=False)
        with pytest.raises(ValueError, match=rf"No tissue found on the slide {name}: 0.00% of its pixels are stained"):
            check_stained(img.astype(np.uint8), name)
    model.save(tmp_path / "m")
    out = tmp_path / "o.zarr"
    assert main(["predict-slide", str(tmp_path / "m"), str(tmp_path / "glass.tif"), "--out", str(out),
                 "--tile-size-um", "32"]) == 2
    assert not out.exists()
    # the same slide with some tissue on it predicts
    img = (240 + noise).astype(np.uint8)
    img[300:700, 300:700] = _tissue(400)
    assert model.predict_slide(_write_slide(tmp_path / "some.tif", img, mpp=0.5), tile_size_um=32.0,
                               progress=False).tables["nh2st"].n_obs > 0


def test_a_truncated_slide_is_reported_as_truncated_not_as_missing_metadata(model, tmp_path):
    from st_predict.cli._main import main

    good = _write_slide(tmp_path / "slide.tif", _tissue(1024), mpp=0.5)
    from pathlib import Path

    data = Path(good).read_bytes()
    for name in ("cut.tif", "cut.svs"):  # a pyramidal TIFF, and the same bytes as an SVS-like file
        (tmp_path / name).write_bytes(data[: 2 * len(data) // 3])
        with pytest.raises(ValueError, match=rf"{name}' is truncated or corrupted: its image data runs to byte .* but "
                                             rf"the file has {2 * len(data) // 3:,} bytes"):
            model.predict_slide(tmp_path / name, tile_size_um=32.0, progress=False)
    model.save(tmp_path / "m")
    assert main(["predict-slide", str(tmp_path / "m"), str(tmp_path / "cut.svs"), "--out", str(tmp_path / "o.zarr"),
                 "--tile-size-um", "32"]) == 2
    assert model.predict_slide(good, tile_size_um=32.0, progress=False).tables["nh2st"].n_obs > 0  # the whole file


def test_a_loaded_model_tiles_at_its_training_patch_size_and_pitch(tissue, tmp_path):
    m = _model_with_pixel_size(tissue)
    m.save(tmp_path / "model")
    loaded = NH2ST.load(tmp_path / "model")
    assert loaded.patch_size_um_ == m.patch_size_um_ > 0 and loaded.spot_pitch_um_ == m.spot_pitch_um_ > 0
    path = _write_slide(tmp_path / "slide.tif", _tissue(1024), mpp=0.25)
    sdata = loaded.predict_slide(path, progress=False)
    meta = sdata.tables["nh2st"].uns["st_predict"]
    assert meta["patch_size_um"] == m.patch_size_um_ and meta["pitch_um"] == m.spot_pitch_um_
    sides = sdata.shapes["nh2st_tiles"].geometry.bounds
    np.testing.assert_allclose(sides["maxx"] - sides["minx"], m.patch_size_um_ / 0.25, atol=1)


@pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")
def test_predict_slide_command(tissue, model, tmp_path, capsys):
    import warnings

    import spatialdata as sd_

    from st_predict import InputWarning
    from st_predict.cli._main import main

    m = _model_with_pixel_size(tissue)
    m.save(tmp_path / "model")
    model.save(tmp_path / "no_um_model")  # trained without a pixel size
    slide = _write_slide(tmp_path / "slide.tif", _tissue(1024), mpp=0.5)
    out = tmp_path / "pred.zarr"
    assert main(["predict-slide", str(tmp_path / "model"), slide, "--out", str(out), "--quiet"]) == 0
    assert "tiles into table 'nh2st'" in capsys.readouterr().out
    back = sd_.read_zarr(out)
    assert back.tables["nh2st"].n_obs == len(back.shapes["nh2st_tiles"]) > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pred.zarr")]  # no staging left over

    def fails(argv, message):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err

    fails(["predict-slide", str(tmp_path / "model"), slide, "--out", str(out), "--quiet"], "exists; pass --overwrite")
    assert main(["predict-slide", str(tmp_path / "model"), slide, "--out", str(out), "--quiet", "--overwrite",
                 "--pitch-um", "20"]) == 0
    assert sd_.read_zarr(out).tables["nh2st"].uns["st_predict"]["pitch_um"] == 20.0
    no_mpp = _write_slide(tmp_path / "no_mpp.tif", _tissue(1024), mpp=None)
    fails(["predict-slide", str(tmp_path / "model"), no_mpp, "--out", str(tmp_path / "a.zarr")], "pass --mpp")
    blank = _write_slide(tmp_path / "blank.tif", np.full((1024, 1024, 3), 242, np.uint8), mpp=0.5)
    fails(["predict-slide", str(tmp_path / "model"), blank, "--out", str(tmp_path / "b.zarr")], "No tissue found")
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a tiff")
    fails(["predict-slide", str(tmp_path / "model"), str(broken), "--out", str(tmp_path / "c.zarr")], "Could not open")
    fails(["predict-slide", str(tmp_path / "no_um_model"), slide, "--out", str(tmp_path / "d.zarr")], "pass --tile-size-um")
    fails(["predict-slide", str(tmp_path / "model"), str(tmp_path / "nope.tif"), "--out", str(tmp_path / "e.zarr")],
          "does not exist")
    # a SpatialData store with an H&E image element: its um/px comes from --mpp
    _he_spatialdata(_tissue(1024)).write(tmp_path / "he.zarr")
    assert main(["predict-slide", str(tmp_path / "model"), str(tmp_path / "he.zarr"), "--out",
                 str(tmp_path / "f.zarr"), "--mpp", "0.5", "--image-element", "he", "--quiet"]) == 0
    assert sd_.read_zarr(tmp_path / "f.zarr").tables["nh2st"].n_obs > 0
    fails(["predict-slide", str(tmp_path / "model"), str(tmp_path / "he.zarr"), "--out", str(tmp_path / "g.zarr")],
          "pass --mpp")
    fails(["predict-slide", str(tmp_path / "model"), str(tmp_path / "he.zarr"), "--out", str(tmp_path / "h.zarr"),
           "--mpp", "0.5", "--image-element", "HE"], "has no image element 'HE' (it has: he)")
    assert not any((tmp_path / f"{x}.zarr").exists() for x in "abcdegh")
    # a slide scanned coarser than the model's tiles (1 um/px against 0.5) is predicted, with one line of warning
    coarse = _write_slide(tmp_path / "coarse.tif", _tissue(512), mpp=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("always", InputWarning)
        assert main(["predict-slide", str(tmp_path / "model"), coarse, "--out", str(tmp_path / "i.zarr"), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "InputWarning: The slide" in err[0] and "upsampled 2.00x" in err[0], err
    assert sd_.read_zarr(tmp_path / "i.zarr").tables["nh2st"].uns["st_predict"]["upsampling"] == 2.0
    fails(["predict-slide", str(tmp_path / "model"), coarse, "--out", str(tmp_path / "j.zarr"), "--mpp", "4"],
          "fewer than the 16 st_predict upsamples")


def _he_spatialdata(img: np.ndarray, multiscale: bool = False):
    import spatialdata as sd_
    from spatialdata.models import Image2DModel

    kw = {"scale_factors": [2, 2]} if multiscale else {}
    return sd_.SpatialData(images={"he": Image2DModel.parse(img.transpose(2, 0, 1), dims=("c", "y", "x"), **kw)})


def _he_anndata(img: np.ndarray, pixel_size_um: float, scale: float):
    """An AnnData with a Visium-style image downsampled by ``scale`` and no spots."""
    from anndata import AnnData

    step = round(1 / scale)
    return AnnData(uns={"spatial": {"slide": {
        "images": {"hires": np.ascontiguousarray(img[::step, ::step])},
        "scalefactors": {"tissue_hires_scalef": scale, "spot_diameter_fullres": 10.0},
        "metadata": {"pixel_size_um": pixel_size_um},
    }}})


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")
def test_spatialdata_anndata_and_zarr_inputs_tile_the_same_pixels(model, tmp_path, monkeypatch):
    import spatialdata as sd_

    _predict_colour_stats(model, monkeypatch)
    img = _tissue(2048)
    kw = {"tile_size_um": 32.0, "pitch_um": 40.0, "progress": False}
    ref = model.predict_slide(_write_slide(tmp_path / "slide.tif", img, mpp=0.5), **kw).tables["nh2st"]
    sdata = _he_spatialdata(img)
    sdata.write(tmp_path / "he.zarr")
    adata = _he_anndata(img, pixel_size_um=0.5, scale=1.0)
    half = _he_anndata(np.repeat(np.repeat(img, 2, 0), 2, 1), pixel_size_um=0.25, scale=0.5)
    uns_before = {k: dict(v) for k, v in adata.uns["spatial"].items()}
    results = {
        "spatialdata": model.predict_slide(sdata, mpp=0.5, **kw),
        "multiscale": model.predict_slide(_he_spatialdata(img, multiscale=True), mpp=0.5, **kw),
        "zarr": model.predict_slide(tmp_path / "he.zarr", mpp=0.5, **kw),
        "anndata": model.predict_slide(adata, **kw),  # um/px from metadata["pixel_size_um"]
        # a half-size image of a 0.25 um/px section: tiles in the AnnData's full-resolution pixels
        "anndata_hires": model.predict_slide(half, **kw),
    }
    for name, out in results.items():
        table = out.tables["nh2st"]
        mpp = 0.25 if name == "anndata_hires" else 0.5
        # nearly the same grid as the slide file (tissue outlines found on pyramid levels made another way
        # move it by a few pixels)
        assert abs(table.n_obs - ref.n_obs) <= 0.1 * ref.n_obs, name
        assert len(_paired(table, mpp, ref, 0.5, tol_um=3.0)[0]) >= 0.8 * ref.n_obs, name
        # each tile's mean colour is that of the image pixels under its shape (0.5 um/px frame)
        bounds = out.shapes["nh2st_tiles"].geometry.bounds.round().astype(int).to_numpy()
        want = np.stack([img[y0:y1, x0:x1].reshape(-1, 3).mean(0) for x0, y0, x1, y1 in bounds])
        np.testing.assert_allclose(np.asarray(table.X)[:, :3], want, atol=3.0 if name == "multiscale" else 1.0,
                                   err_msg=name)  # colour levels out of 255
    # the inputs are left as they were: no tiles, tissues or tables added to them
    assert list(sdata.images) == ["he"] and not sdata.shapes and not sdata.tables
    assert list(sd_.read_zarr(tmp_path / "he.zarr").images) == ["he"]
    assert {k: dict(v) for k, v in adata.uns["spatial"].items()}.keys() == uns_before.keys()
    assert set(adata.uns["spatial"]["slide"]) == set(uns_before["slide"]) and adata.n_obs == 0
    # the AnnData output carries the library's image, so scanpy draws the tiles over it
    table = results["anndata_hires"].tables["nh2st"]
    assert table.uns["spatial"]["slide"]["scalefactors"]["tissue_hires_scalef"] == 0.5
    assert table.uns["spatial"]["slide"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(32.0 / 0.25)


def test_bad_spatialdata_and_anndata_inputs_get_clear_errors(model, tmp_path):
    import spatialdata as sd_
    from spatialdata.models import Image2DModel

    img = _tissue(512)
    kw = {"tile_size_um": 32.0, "progress": False}
    sdata = _he_spatialdata(img)
    with pytest.raises(ValueError, match=r"image 'he'.* records no micrometres per pixel; pass mpp="):
        model.predict_slide(sdata, **kw)
    with pytest.raises(KeyError, match=r"no image element 'HE' \(it has: he\)"):
        model.predict_slide(sdata, image_element="HE", mpp=0.5, **kw)
    # the old name for a SpatialData's element still works, and says what replaced it
    with pytest.warns(FutureWarning, match="use image_element="), pytest.raises(KeyError, match="'HE'"):
        model.predict_slide(sdata, image_key="HE", mpp=0.5, **kw)
    two = sd_.SpatialData(images={"a": sdata.images["he"], "b": sdata.images["he"]})
    with pytest.raises(ValueError, match=r"2 image elements \(a, b\): pass image_element="):
        model.predict_slide(two, mpp=0.5, **kw)
    floats = sd_.SpatialData(images={"f": Image2DModel.parse(img.transpose(2, 0, 1).astype(np.float32) / 255,
                                                             dims=("c", "y", "x"))})
    with pytest.raises(ValueError, match=r"Image element 'f' .* cannot be read as an H&E slide"):
        model.predict_slide(floats, mpp=0.5, **kw)
    adata = _he_anndata(img, pixel_size_um=0.5, scale=1.0)
    del adata.uns["spatial"]["slide"]["metadata"]
    with pytest.raises(ValueError, match=r"the AnnData's 'slide'.* pass mpp="):
        model.predict_slide(adata, **kw)
    adata.uns["spatial"]["other"] = adata.uns["spatial"]["slide"]
    with pytest.raises(ValueError, match=r"2 libraries \(slide, other\): pass library_id="):
        model.predict_slide(adata, mpp=0.5, **kw)
    with pytest.raises(KeyError, match=r"no image .*\['lowres'\]"):
        model.predict_slide(adata, library_id="slide", image_key="lowres", mpp=0.5, **kw)
    from anndata import AnnData

    with pytest.raises(KeyError, match=r"uns\['spatial'\]"):
        model.predict_slide(AnnData(np.zeros((2, 2))), mpp=0.5, **kw)
    with pytest.raises(TypeError, match="slide must be a path"):
        model.predict_slide(img, mpp=0.5, **kw)


@pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")
def test_slide_predictions_plot_with_spatialdata_plot(model, tmp_path):
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    import spatialdata as sd_
    import spatialdata_plot  # noqa: F401  (registers the .pl accessor)

    path = _write_slide(tmp_path / "slide.tif", _tissue(1024), mpp=0.5)
    sdata = model.predict_slide(path, tile_size_um=32.0, pitch_um=40.0, progress=False)
    sd_.SpatialData(shapes=dict(sdata.shapes), tables=dict(sdata.tables)).write(tmp_path / "pred.zarr")
    back = sd_.read_zarr(tmp_path / "pred.zarr")
    table = back.tables["nh2st"]
    gene = table.var_names[int(np.argmax(np.asarray(table.X).var(0)))]
    fig, ax = plt.subplots()
    back.pl.render_shapes("nh2st_tiles", color=gene, table_name="nh2st").pl.show(ax=ax)
    tiles = [c for c in ax.collections if len(c.get_paths()) == table.n_obs]
    assert len(tiles) == 1
    values = np.asarray(table[:, gene].X).ravel()
    colours = tiles[0].get_facecolors()
    assert len(np.unique(colours.round(3), axis=0)) > 5  # coloured by the gene, not one flat colour
    lo, hi = tiles[0].get_clim()
    assert lo == pytest.approx(values.min(), rel=1e-4) and hi == pytest.approx(values.max(), rel=1e-4)
    # each tile's colour is its own prediction through the colour map
    np.testing.assert_allclose(colours[:, :3], tiles[0].cmap((values - lo) / (hi - lo))[:, :3], atol=0.01)
    plt.close(fig)


# wsidata's OpenSlide reader catches only TypeError when it closes an already closed slide on garbage
# collection (a copy of the reader made for LazySlide's tile dataset shares the handle): the tests below collect
# their slides themselves, so that this harmless ctypes error is raised and ignored inside them, not at exit
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_lazyslide_tile_prediction_gives_the_predict_slide_values(tissue, tmp_path):
    """zs.tl.tile_prediction with the model's tile-model wrapper, on the tiles predict_slide laid, writes
    the values predict_slide wrote into its table."""
    pytest.importorskip("lazyslide_models")
    import lazyslide as zs

    torch.manual_seed(0)
    model = _model_with_pixel_size(tissue, context="patch")  # 0.5 um/px: the patch is 16 um; LazySlide: no context

    path = _write_slide(tmp_path / "slide.tif", _tissue(1024), mpp=0.5)
    sd = model.predict_slide(path, pitch_um=40.0, progress=False)
    expected = sd.tables["nh2st"]
    tiles = model.as_tile_model()
    assert tiles.columns == tuple(model.genes_)
    zs.tl.tile_prediction(sd, tiles, tile_key="nh2st_tiles", pbar=False, device="cpu")
    table = sd.shapes["nh2st_tiles"].set_index("tile_id").loc[expected.obs["tile_id"].to_numpy()]
    got = table[list(model.genes_)].to_numpy(dtype=np.float32)
    np.testing.assert_allclose(got, expected.X, rtol=1e-5, atol=1e-5)
    assert got.std(0).max() > 0

    # tiles laid with the wrapper's tile_kwargs are the model's patch: same tiles, same values
    assert tiles.tile_kwargs == {"tile_px": 32, "mpp": 0.5}
    zs.pp.tile_tissues(sd, stride_px=round(40.0 / 0.5), tissue_key="nh2st_tissues",
                       key_added="own_tiles", **tiles.tile_kwargs)
    zs.tl.tile_prediction(sd, tiles, tile_key="own_tiles", pbar=False, device="cpu")
    own = sd.shapes["own_tiles"]
    assert len(own) == len(expected)
    np.testing.assert_allclose(own[list(model.genes_)].to_numpy(dtype=np.float32), got, rtol=1e-5, atol=1e-5)
    # a slide scanned coarser than the model's tiles (1 um/px against 0.5): tile_kwargs_for lays tiles of the slide's
    # own pixels, which the wrapper upsamples as predict_slide does (LazySlide alone refuses to upsample)
    from st_predict import InputWarning

    coarse_path = _write_slide(tmp_path / "coarse.tif", _tissue(512), mpp=1.0)
    with pytest.warns(InputWarning, match="upsampled 2.00x"):
        coarse = model.predict_slide(coarse_path, pitch_um=40.0, progress=False, image_mpp=None)
    with pytest.warns(InputWarning, match="coarser than the model's tiles"):
        kw = tiles.tile_kwargs_for(coarse)
    assert kw == {"tile_px": 16, "mpp": 1.0}
    assert tiles.tile_kwargs_for(sd) == tiles.tile_kwargs  # a fine enough slide: the model's own tiles
    zs.pp.tile_tissues(coarse, stride_px=40, tissue_key="nh2st_tissues", key_added="own_tiles", **kw)
    zs.tl.tile_prediction(coarse, tiles, tile_key="own_tiles", pbar=False, device="cpu")
    want = coarse.tables["nh2st"]
    own = coarse.shapes["own_tiles"]
    assert len(own) == want.n_obs > 5
    np.testing.assert_allclose(own[list(model.genes_)].to_numpy(dtype=np.float32), want.X, rtol=1e-5, atol=1e-5)
    del sd, expected, table, own, coarse, want
    gc.collect()


# wsidata's OpenSlide reader catches only TypeError when it closes an already closed slide on garbage
# collection (a copy of the reader made for LazySlide's tile dataset shares the handle): the tests below collect
# their slides themselves, so that this harmless ctypes error is raised and ignored inside them, not at exit
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_lazyslide_feature_extraction_feeds_predict_slide(tissue, tmp_path):
    """Features that zs.tl.feature_extraction wrote with the model's frozen encoder give predict_slide's values
    without encoding the tiles again; features of another width are refused."""
    pytest.importorskip("lazyslide_models")
    import lazyslide as zs

    adata = tissue[tissue.obs["section"] != "S2"].copy()
    for lib in adata.uns["spatial"]:
        adata.uns["spatial"][lib].setdefault("metadata", {})["pixel_size_um"] = 0.5
    setup(adata)
    torch.manual_seed(0)
    model = NH2ST(adata, trunk="frozen", context="patch", **SMALL)  # a tile model sees no neighbours
    model.train(max_epochs=1, progress=False)
    path = _write_slide(tmp_path / "slide.tif", _tissue(1024), mpp=0.5)
    sd = model.predict_slide(path, pitch_um=40.0, tta=False, progress=False)
    tiles = model.as_tile_model()
    encode = lambda x: model.module.trunk_features(x)[:, :, 0, 0]  # noqa: E731 - the model's encoder, as LazySlide calls it
    zs.tl.feature_extraction(sd, model=encode, transform=tiles.get_transform(), tile_key="nh2st_tiles",
                             key_added="encoder_nh2st_tiles", pbar=False, device="cpu")
    calls = []
    model.module.trunk.register_forward_hook(lambda *a: calls.append(1))
    out = model.predict_slide(sd, features_key="encoder_nh2st_tiles", key_added="from_features", progress=False)
    assert calls == []  # no tile encoded again
    got, expected = out.tables["from_features"], sd.tables["nh2st"]
    np.testing.assert_array_equal(got.obs["tile_id"].to_numpy(), expected.obs["tile_id"].to_numpy())
    np.testing.assert_allclose(got.X, expected.X, rtol=1e-5, atol=1e-5)
    meta = got.uns["st_predict"]
    assert meta["features_key"] == "encoder_nh2st_tiles" and meta["patch_size_um"] == pytest.approx(16.0)
    assert meta["pitch_um"] == pytest.approx(40.0, abs=1.0)

    zs.tl.feature_extraction(sd, model=lambda x: encode(x)[:, :7], transform=tiles.get_transform(),
                             tile_key="nh2st_tiles", key_added="narrow", pbar=False, device="cpu")
    with pytest.raises(ValueError, match="7 columns but the model's encoder 'resnet18' gives 512"):
        model.predict_slide(sd, features_key="narrow", key_added="x", progress=False)
    del sd, out, got, expected
    gc.collect()


def _with_smear(img: np.ndarray, seed: int = 1) -> np.ndarray:
    """A smooth pale pink haze on the glass in the upper right corner, as eosin leaves beside a section, away from
    the two blobs. Its colour and grain are HER2ST C2's haze: RGB ~ (241, 222, 232) against a (243, 240, 240)
    background, with a standard deviation of ~0.65 grey levels within 16 px blocks (tissue: 24-34)."""
    rng = np.random.default_rng(seed)
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    weight = np.clip(1 - np.hypot(yy - 0.12, xx - 0.88) / 0.14, 0, 1)[..., None]  # 1 at the centre, 0 at 0.14
    haze = np.array([240, 218, 230], np.float32) + rng.normal(0, 0.65, img.shape)
    out = img.astype(np.float32) * (1 - weight) + haze * weight
    return out.clip(0, 255).astype(np.uint8)


def test_tiles_on_a_pale_smear_are_dropped_and_tissue_tiles_stay(model, tmp_path):
    img = _with_smear(_tissue(2048))
    path = _write_slide(tmp_path / "smear.tif", img, mpp=0.5)
    kw = {"tile_size_um": 32.0, "pitch_um": 40.0, "progress": False}
    centres = lambda t: t.obsm["spatial"] / 2048  # noqa: E731 - (x, y) as fractions of the side
    on_smear = lambda t: np.hypot(centres(t)[:, 1] - 0.12, centres(t)[:, 0] - 0.88) < 0.12  # noqa: E731

    otsu = model.predict_slide(path, tissue_method="otsu", **kw).tables["nh2st"]
    assert on_smear(otsu).sum() >= 5  # brightness thresholding takes the haze for tissue: the problem

    table = model.predict_slide(path, **kw).tables["nh2st"]  # the default: entropy
    assert on_smear(table).sum() == 0
    d = np.stack([np.hypot(centres(table)[:, 1] - cy, centres(table)[:, 0] - cx) / r for cy, cx, r in BLOBS])
    assert (d.min(0) < 1.0).all()  # every tile is on a blob ...
    inner = [(d[i] < 0.8).sum() for i in range(2)]
    plain = model.predict_slide(_write_slide(tmp_path / "plain.tif", _tissue(2048), mpp=0.5), **kw).tables["nh2st"]
    assert table.n_obs == plain.n_obs and min(inner) > 5  # ... and the blobs keep every tile they had
    frac = table.obs["tissue_fraction"].to_numpy()
    assert frac.min() >= 0.7 - 1e-6 and frac.max() <= 1.0 + 1e-6
    assert table.uns["st_predict"]["tissue_method"] == "entropy"
    fewer = model.predict_slide(path, min_tissue_fraction=1.0, **kw).tables["nh2st"]
    assert fewer.n_obs < table.n_obs and (fewer.obs["tissue_fraction"].to_numpy() >= 1 - 1e-6).all()


def test_tissue_on_a_black_background_gets_tiles_on_tissue_only(model, tmp_path):
    """Tissue on black (as some exported images are), with sensor noise in the black: no tile on the background."""
    rng = np.random.default_rng(3)
    img = _tissue(2048)
    background = (img == 242).all(-1)
    img[background] = rng.integers(0, 6, (int(background.sum()), 3))
    table = model.predict_slide(_write_slide(tmp_path / "black.tif", img, mpp=0.5, levels=4), tile_size_um=32.0,
                                pitch_um=40.0, progress=False, image_mpp=None).tables["nh2st"]
    centres = table.obsm["spatial"] / 2048
    d = np.stack([np.hypot(centres[:, 1] - cy, centres[:, 0] - cx) / r for cy, cx, r in BLOBS])
    assert table.n_obs > 50 and (d.min(0) < 1.0).all()
    assert (d[0] < 0.8).sum() > 20 and (d[1] < 0.8).sum() > 5  # both blobs keep their inner tiles


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")
def test_output_zarr_holds_the_slide_image_and_tiles_draw_over_it(tissue, tmp_path):
    import matplotlib

    matplotlib.use("agg")
    import dask.array as da
    import matplotlib.pyplot as plt
    import spatialdata as sd_
    import spatialdata_plot  # noqa: F401  (registers the .pl accessor)
    from spatialdata.transformations import get_transformation

    from st_predict.cli._main import main

    _model_with_pixel_size(tissue).save(tmp_path / "model")
    img = _tissue(2048)
    slide = _write_slide(tmp_path / "slide.tif", img, mpp=0.5)
    out = tmp_path / "pred.zarr"
    assert main(["predict-slide", str(tmp_path / "model"), slide, "--out", str(out), "--quiet"]) == 0
    back = sd_.read_zarr(out)
    assert list(back.images) == ["nh2st_image"]
    image = back.images["nh2st_image"]
    # 2 um/px by default: level 2 of the 0.5 um/px pyramid, a quarter of level 0, scaled onto level 0 (the
    # tiles' frame), with halvings below it
    assert list(image.keys()) == ["scale0", "scale1"]
    np.testing.assert_array_equal(np.asarray(image["scale0"]["image"]).transpose(1, 2, 0), img[::4, ::4])
    assert get_transformation(image["scale0"]["image"], "global").to_affine_matrix(("x", "y"), ("x", "y"))[0, 0] == 4
    # the element is lazy in the returned object: nothing read before it is written or drawn
    sdata = NH2ST.load(tmp_path / "model").predict_slide(slide, progress=False)
    assert isinstance(sdata.images["nh2st_image"]["scale0"]["image"].data, da.Array)
    assert "nh2st_image" not in NH2ST.load(tmp_path / "model").predict_slide(slide, progress=False,
                                                                             image_mpp=None).images

    table = back.tables["nh2st"]
    gene = table.var_names[int(np.argmax(np.asarray(table.X).var(0)))]
    fig, ax = plt.subplots()
    (back.pl.render_images("nh2st_image").pl.render_shapes("nh2st_tiles", color=gene, table_name="nh2st")
     .pl.show(ax=ax, coordinate_systems="global"))
    drawn = ax.get_images()
    assert len(drawn) == 1
    # the H&E lies under the tiles: it spans the slide's level-0 pixels and shows its colours
    x0, x1, y0, y1 = drawn[0].get_extent()
    to_data = drawn[0].get_transform() - ax.transData  # the image's own transformation (its scale onto level 0)
    (x0, y0), (x1, y1) = to_data.transform([[x0, y0], [x1, y1]])
    assert (min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)) == pytest.approx((0, 2048, 0, 2048), abs=8)
    centres = table.obsm["spatial"]
    assert (centres.min(0) > 0).all() and (centres.max(0) < 2048).all()
    rgb = np.asarray(drawn[0].get_array())[..., :3].astype(float)
    rgb = rgb * 255 if rgb.max() <= 1 else rgb
    np.testing.assert_allclose(rgb.reshape(-1, 3).mean(0), img.reshape(-1, 3).mean(0), atol=3)
    tiles = [c for c in ax.collections if len(c.get_paths()) == table.n_obs]
    assert len(tiles) == 1 and tiles[0].get_zorder() >= drawn[0].get_zorder()
    plt.close(fig)


def test_a_jpeg_with_mpp_predicts_the_tiles_of_the_same_image_as_a_pyramidal_tiff(model, tmp_path, monkeypatch):
    import tifffile
    from PIL import Image

    from st_predict.tl import _slide_image

    kw = {"tile_size_um": 32.0, "pitch_um": 40.0, "progress": False, "image_mpp": None}
    Image.fromarray(_tissue(2048)).save(tmp_path / "slide.jpg", quality=92)
    with Image.open(tmp_path / "slide.jpg") as im:
        pixels = np.asarray(im.convert("RGB"))  # the JPEG's own pixels, written as a pyramidal TIFF
    tiff = _write_slide(tmp_path / "slide.tif", pixels, mpp=0.5, levels=4, mean=True)  # as libvips would
    ref = model.predict_slide(tiff, **kw).tables["nh2st"]
    jpeg = model.predict_slide(tmp_path / "slide.jpg", mpp=0.5, **kw).tables["nh2st"]
    Image.fromarray(pixels).save(tmp_path / "slide.png")
    png = model.predict_slide(tmp_path / "slide.png", mpp=0.5, **kw).tables["nh2st"]
    tifffile.imwrite(tmp_path / "plain.tif", pixels, photometric="rgb")  # stripped, one level: no slide reader takes it
    plain = model.predict_slide(tmp_path / "plain.tif", mpp=0.5, **kw).tables["nh2st"]
    # the same pixels in pyramids whose levels are strided (x2, and x4 as in an SVS): tissue is found at one
    # physical resolution on pixels averaged down from a finer level, so their levels give the same tiles
    strided = model.predict_slide(_write_slide(tmp_path / "x2.tif", pixels, mpp=0.5, levels=4), **kw).tables["nh2st"]
    svs = model.predict_slide(_write_slide(tmp_path / "x4.tif", pixels, mpp=0.5, levels=3, step=4),
                              **kw).tables["nh2st"]
    for name, got in {"jpeg": jpeg, "png": png, "plain tiff": plain, "strided x2": strided, "strided x4": svs}.items():
        # the same tiles (within two at the edge), with the same predictions (the plain images are read from their
        # full resolution and resized, the mean pyramid from its level at the tiles' resolution: 1e-4 apart)
        a, b = _paired(got, 0.5, ref, 0.5, tol_um=0.5)
        assert abs(got.n_obs - ref.n_obs) <= 2 and len(a) >= ref.n_obs - 2, name
        np.testing.assert_allclose(a, b, atol=1e-3, err_msg=name)
        assert got.uns["st_predict"]["slide_mpp"] == 0.5 and got.uns["st_predict"]["tissue_mpp"] == 2.0
    with pytest.raises(ValueError, match=r"slide\.jpg records no micrometres per pixel; pass mpp="):
        model.predict_slide(tmp_path / "slide.jpg", **kw)
    monkeypatch.setattr(_slide_image, "PLAIN_IMAGE_MAX_BYTES", 2048 * 2048 * 3 - 1)
    with pytest.raises(ValueError, match=r"2048 x 2048 px: decoding it would take .* vips tiffsave"):
        model.predict_slide(tmp_path / "slide.jpg", mpp=0.5, **kw)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match=r"Could not open .*bad\.jpg.* as a whole-slide or a plain image"):
        model.predict_slide(tmp_path / "bad.jpg", mpp=0.5, **kw)


@pytest.mark.filterwarnings("ignore:No tiles are found")  # lazyslide's own warning, before st_predict's error
def test_tissue_without_a_whole_tile_is_a_clear_error(tissue, tmp_path):
    """Tissue found but no tile fully on it: lazyslide adds no tile element; the error says so (not a KeyError)."""
    from st_predict import InputError

    path = _write_slide(tmp_path / "slide.tif", _tissue(768), mpp=0.5)
    with pytest.raises(InputError, match="no tile of 300 um on tissue"):
        _model_with_pixel_size(tissue).predict_slide(path, tile_size_um=300, min_tissue_fraction=1.0, progress=False)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # wsidata's reader on collection, above
def test_a_slide_coarser_than_the_tiles_is_upsampled_as_spot_predict_does(model, tmp_path):
    """The model's tiles are 32 um over 32 px (1 um/px); a 2 um/px slide is tiled at 16 px and each tile upsampled,
    warned once, and its tiles predict what spot-level ``predict`` gives for spots at their centres."""
    import warnings as _warnings

    from anndata import AnnData

    from st_predict import InputError
    from st_predict.tl import _slide_checks

    img = _tissue(1024)
    path = _write_slide(tmp_path / "coarse.tif", img, mpp=2.0)
    with _warnings.catch_warnings(record=True) as said:
        _warnings.simplefilter("always")
        out = model.predict_slide(path, tile_size_um=32.0, pitch_um=40.0, progress=False, image_mpp=None)
    coarse = [str(w.message) for w in said if "coarser than the model's tiles" in str(w.message)]
    assert len(coarse) == 1 and "2 um/px" in coarse[0] and "1 um/px" in coarse[0] and "upsampled 2.00x" in coarse[0]
    table = out.tables["nh2st"]
    assert table.uns["st_predict"]["upsampling"] == pytest.approx(2.0)
    sides = out.shapes["nh2st_tiles"].geometry.bounds
    np.testing.assert_allclose(sides["maxx"] - sides["minx"], 16)  # 32 um of the slide's own 2 um pixels
    assert table.n_obs > 20
    # spot-level predict on the same image, spots at the tile centres (a Visium-style AnnData in level-0 pixels)
    spots = AnnData(obs={"section": ["coarse"] * table.n_obs}, obsm={"spatial": table.obsm["spatial"].copy()},
                    uns={"spatial": {"coarse": {"images": {"hires": img},
                                                "scalefactors": {"tissue_hires_scalef": 1.0,
                                                                 "spot_diameter_fullres": 8.0},
                                                "metadata": {"pixel_size_um": 2.0}}}})
    spots.obs_names = [f"s{i}" for i in range(table.n_obs)]
    # a 40 um grid is no platform's pitch: predict would take it for misplaced coordinates
    spot_pred = model.predict(spots, interval_level=None, allow_off_tissue=True).to_numpy()
    tile_pred = np.asarray(table.X)
    r = np.corrcoef(spot_pred.ravel(), tile_pred.ravel())[0, 1]
    assert r >= 0.95, r
    # a finer slide is read at the tiles' resolution and says nothing
    with _warnings.catch_warnings():
        _warnings.simplefilter("error", UserWarning)
        fine = model.predict_slide(_write_slide(tmp_path / "fine.tif", img, mpp=0.5), tile_size_um=32.0,
                                   pitch_um=40.0, progress=False, image_mpp=None).tables["nh2st"]
    assert fine.uns["st_predict"]["upsampling"] == 1.0
    # too coarse: fewer than MIN_TILE_PX slide pixels across a tile
    with pytest.raises(InputError, match=rf"would cover 8.0 px, fewer than the {_slide_checks.MIN_TILE_PX}"):
        model.predict_slide(path, mpp=4.0, tile_size_um=32.0, progress=False)
    del out, table, fine
    gc.collect()
