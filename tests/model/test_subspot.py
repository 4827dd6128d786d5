"""Below the spot (issue 30): a head fitted to spot totals recovers a planted sub-spot pattern, its bins add up to
the spots, and predict_bins lays them out in the section's pixels."""

import numpy as np
import pandas as pd
import pytest
from helpers import SMALL, setup

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _bin_truth(bins, tissue, section):
    """The planted hot fraction of each bin (of the section's ``uns["subspot"]["hot"]`` mask)."""
    hot = tissue.uns["subspot"]["hot"][section]
    side = bins.uns["st_predict"]["bins"]["bin_px"][section]
    out = []
    for r, c in zip(bins.obs["bin_row"], bins.obs["bin_col"], strict=True):
        y0, x0 = int(round(r * side)), int(round(c * side))
        out.append(hot[y0: y0 + int(round(side)), x0: x0 + int(round(side))].mean())
    return np.asarray(out)


@pytest.fixture(scope="module")
def subspot():
    """A small model trained on S0-S2 of a tissue with a planted sub-spot gene, then its sub-spot head."""
    import scvi

    from st_predict import NH2ST
    from st_predict.data import synthetic_subspot_tissue

    scvi.settings.seed = 0
    tissue = synthetic_subspot_tissue(4, 10, 10, seed=0)
    train = tissue[tissue.obs["section"] != "S3"].copy()
    test = tissue[tissue.obs["section"] == "S3"].copy()
    setup(train)
    genes = list(train.var_names[:39]) + ["G_HOT"]
    model = NH2ST(train, **{**{k: v for k, v in SMALL.items() if k != "n_genes"}, "genes": genes})
    model.train(max_epochs=10, batch_size=16, progress=False)
    model.train_bins(max_epochs=30, batch_size=16)
    return model, tissue, test


@pytest.mark.slow
def test_bins_recover_subspot_pattern(subspot):
    """The planted gene sits in 8-px squares, some hot and some not within every spot: the head, trained on
    spot totals only, finds them (r >= 0.5 against the planted truth), where the spot model copied to its bins
    cannot (its bins only know their spot)."""
    model, tissue, test = subspot
    bins = model.predict_bins(test, bin_um=8)
    truth = _bin_truth(bins, tissue, "S3")
    gene = bins.var_names.get_loc("G_HOT")
    r_bins = np.corrcoef(bins.layers["share"][:, gene], truth)[0, 1]
    spot = model.get_predicted_expression(test)
    r_spot = np.corrcoef(spot.loc[bins.obs["spot"], "G_HOT"].to_numpy(), truth)[0, 1]
    raw = model.predict_bins(test, bin_um=8, reconcile=False)
    r_raw = np.corrcoef(raw.layers["share"][:, gene], truth)[0, 1]
    assert r_bins >= 0.5, (r_bins, r_raw, r_spot)
    assert r_raw >= 0.4, (r_bins, r_raw, r_spot)
    assert r_spot < 0.4, (r_bins, r_raw, r_spot)
    # within a spot: the bins order its squares (the spot model gives them all one value)
    import pandas as pd

    df = pd.DataFrame({"p": bins.layers["share"][:, gene], "t": truth, "s": bins.obs["spot"].to_numpy()})
    centred = df.groupby("s")[["p", "t"]].transform(lambda v: v - v.mean())
    assert np.corrcoef(centred["p"], centred["t"])[0, 1] >= 0.4
    assert np.all(np.diff(model.bins_["history"][:5]) < 0.01)  # the loss fell at the start, and is recorded
    assert model.bins_["history"][-1] < model.bins_["history"][0]


def test_bins_add_up_to_the_spots(subspot):
    """Reconciled bins at the native cell, summed over each spot's disc as counts, give the spot model's
    prediction (exactly, up to float); at an unaligned bin size (12 um) approximately; the raw head agrees with
    the spot model's ordering of spots."""
    from st_predict.tl import aggregate_bins

    model, _, test = subspot
    spot = model.get_predicted_expression(test)
    bins = model.predict_bins(test)  # the native cell: 8 px here
    assert bins.uns["st_predict"]["bins"]["bin_px"]["S3"] == pytest.approx(8.0)
    agg = aggregate_bins(bins).loc[spot.index]
    assert np.abs(agg.to_numpy() - spot.to_numpy()).max() < 1e-3
    coarse = aggregate_bins(model.predict_bins(test, bin_um=12)).loc[spot.index]
    assert np.abs(coarse.to_numpy() - spot.to_numpy()).mean() < 0.05
    raw = aggregate_bins(model.predict_bins(test, reconcile=False)).loc[spot.index]
    assert np.abs(raw.to_numpy() - spot.to_numpy()).mean() > 1e-3  # the raw head is not the spot model ...
    r = [np.corrcoef(raw[g], spot[g])[0, 1] for g in ("G_HOT", "G000", "G005")]
    assert min(r) > 0.5, r  # ... but it learned the same spots


def test_predict_bins_layout(subspot):
    """One bin per lattice square near the spots, in the section's full-resolution pixels; the bin's side is
    micrometres (twice the pixels at half the pixel size); each bin names its nearest spot."""
    from scipy.spatial import cKDTree

    model, _, test = subspot
    bins = model.predict_bins(test, bin_um=16)
    assert bins.obs_names.is_unique and list(bins.var_names) == list(model.genes_)
    assert set(bins.obs.columns) >= {"section", "spot", "spot_distance", "spot_weight", "bin_row", "bin_col"}
    np.testing.assert_allclose(bins.X, np.log1p(1e4 * bins.layers["share"]), rtol=1e-5, atol=1e-5)
    xy = bins.obsm["spatial"]
    np.testing.assert_allclose(xy[:, 0], (bins.obs["bin_col"] + 0.5) * 16)
    spots = test.obsm["spatial"]
    nearest = np.asarray(test.obs_names)[cKDTree(spots).query(xy)[1]]
    assert (nearest == bins.obs["spot"].to_numpy()).all()
    assert bins.obs["spot_distance"].max() <= 16 * np.sqrt(2) + 1e-6  # inside the spot's 32-px patch
    assert bins.n_obs == test.n_obs * 4  # the 32-px patch of every spot holds 2 x 2 bins of 16 px
    assert bins.uns["spatial"]["S3"]["scalefactors"]["spot_diameter_fullres"] == 16
    finer = test.copy()
    finer.obsm["spatial"] = finer.obsm["spatial"] * 2
    img = finer.uns["spatial"]["S3"]["images"]["hires"]
    finer.uns["spatial"]["S3"]["images"]["hires"] = np.repeat(np.repeat(img, 2, 0), 2, 1)
    finer.uns["spatial"]["S3"]["metadata"]["pixel_size_um"] = 0.5
    finer.uns["spatial"]["S3"]["scalefactors"]["spot_diameter_fullres"] *= 2
    fb = model.predict_bins(finer, bin_um=16)
    assert fb.uns["st_predict"]["bins"]["bin_px"]["S3"] == 32
    np.testing.assert_allclose(fb.obsm["spatial"], bins.obsm["spatial"] * 2)
    # the same tissue at twice the pixels: the same bins (the patches are resampled, so not bit for bit)
    assert np.corrcoef(fb.layers["share"].ravel(), bins.layers["share"].ravel())[0, 1] > 0.95


def test_bins_survive_save_and_load(subspot, tmp_path):
    from st_predict import NH2ST

    model, _, test = subspot
    model.save(str(tmp_path / "m"))
    loaded = NH2ST.load(str(tmp_path / "m"), adata=model.adata)
    assert loaded.has_bins
    np.testing.assert_allclose(loaded.predict_bins(test).layers["share"], model.predict_bins(test).layers["share"],
                               rtol=1e-5, atol=1e-8)


def test_bins_bad_input(subspot):
    from st_predict import NH2ST
    from st_predict._utils import InputError, MissingKeyError

    model, tissue, test = subspot
    no_diameter = test.copy()
    del no_diameter.uns["spatial"]["S3"]["scalefactors"]["spot_diameter_fullres"]
    with pytest.raises(MissingKeyError, match="'S3'.*spot_diameter_fullres"):
        model.predict_bins(no_diameter)
    no_mpp = test.copy()
    del no_mpp.uns["spatial"]["S3"]["metadata"]["pixel_size_um"]
    with pytest.raises(InputError, match="bin_um=8.*'S3'"):
        model.predict_bins(no_mpp, bin_um=8)
    fresh = NH2ST(model.adata, **{**{k: v for k, v in SMALL.items() if k != "n_genes"}, "genes": list(model.genes_)})
    with pytest.raises(InputError, match="train_bins"):
        fresh.predict_bins(test)
    with pytest.raises(InputError, match="max_epochs"):
        model.train_bins(max_epochs=0)


def test_pool_spots_sums_complete_blocks(subspot):
    import scipy.sparse as sp

    from st_predict._utils import InputError, MissingKeyError
    from st_predict.pp import pool_spots

    _, _, test = subspot
    pooled = pool_spots(test)
    assert pooled.n_obs == 25  # 10 x 10 spots: 5 x 5 complete blocks
    members = pooled.obs["members"].iloc[7].split(";")
    np.testing.assert_allclose(np.asarray(pooled.X[7]).ravel(), np.asarray(sp.csr_matrix(test[members].X).sum(0)).ravel())
    np.testing.assert_allclose(pooled.obsm["spatial"][7], test[members].obsm["spatial"].mean(0))
    np.testing.assert_allclose(np.abs(pooled.obsm["footprint"][7]), 16.0)  # the members at +-16 px in x and y
    assert set(pooled.obs["members"].str.split(";").explode()) <= set(test.obs_names)
    assert test.n_obs == 100 and "footprint" not in test.obsm  # the input is not changed
    odd = test[test.obs["array_row"] < 9].copy()  # 9 rows: the last row has no complete block
    assert pool_spots(odd).n_obs == 20
    with pytest.raises(MissingKeyError, match="array"):
        pool_spots(test, grid_keys=("nope", "array_col"))
    bad = test.copy()
    bad.X = bad.X * 0.5
    with pytest.raises(InputError, match="integer counts"):
        pool_spots(bad)


def test_footprint_key_and_bins_at_other_spots(subspot):
    """A pooled footprint must fit the patch (named in the error); bins summed over other spots' discs give the
    bins' own spots back when those are the spots."""
    from st_predict._utils import InputError
    from st_predict.pp import pool_spots
    from st_predict.tl import aggregate_bins

    model, _, test = subspot
    with pytest.raises(InputError, match="beyond the 32-px patch"):
        model.predict_bins(pool_spots(test), footprint_key="footprint")
    bins = model.predict_bins(test)
    at = aggregate_bins(bins, at=test)
    np.testing.assert_allclose(at.to_numpy(), aggregate_bins(bins).loc[test.obs_names].to_numpy(), rtol=1e-6, atol=1e-6)
    shifted = test.copy()
    shifted.obsm["spatial"] = shifted.obsm["spatial"] + 8.0  # discs over four spots' bins: not the same values
    assert np.abs(aggregate_bins(bins, at=shifted).to_numpy() - at.to_numpy()).mean() > 1e-3


@pytest.mark.slow
def test_predict_slide_bins_over_a_whole_slide(subspot, tmp_path):
    """A slide of the held-out section on glass: squares of 8 um over the tissue, each owned by one tile,
    summing back to that tile's prediction, and finding the planted squares."""
    pytest.importorskip("lazyslide")
    from helpers import write_slide

    from st_predict._utils import InputError
    from st_predict.tl import aggregate_bins

    model, tissue, test = subspot
    img = test.uns["spatial"]["S3"]["images"]["hires"]
    canvas = np.full((img.shape[0] + 96, img.shape[1] + 96, 3), 242, np.uint8)
    canvas[48: 48 + img.shape[0], 48: 48 + img.shape[1]] = img
    path = write_slide(tmp_path / "slide.tif", canvas, mpp=1.0)
    sd = model.predict_slide(path, bin_um=8, progress=False)
    tiles, bins = sd.tables["nh2st"], sd.tables["nh2st_bins"]
    assert len(sd.shapes["nh2st_bin_shapes"]) == bins.n_obs > 4 * tiles.n_obs
    np.testing.assert_allclose(bins.X, np.log1p(1e4 * bins.layers["share"]), rtol=1e-5, atol=1e-5)
    sides = sd.shapes["nh2st_bin_shapes"].geometry.bounds
    np.testing.assert_allclose(sides["maxx"] - sides["minx"], 8.0)
    assert not bins.obs[["bin_row", "bin_col"]].duplicated().any()  # no square written twice
    # on the glass margin: no bins
    xy = bins.obsm["spatial"]
    assert (xy.min(0) > 40).all() and (xy.max(0) < canvas.shape[0] - 40).all()
    # each tile's bins, summed over its disc, give its prediction back: up to the resampling of the head's cells onto
    # the lattice, which here is half a cell off the tiles (lazyslide lays them from the tissue's corner)
    agg = aggregate_bins(bins, by="tile_id", weight="tile_weight")
    tile_pred = pd.DataFrame(tiles.X, index=tiles.obs["tile_id"].astype(str).to_numpy(), columns=tiles.var_names)
    mine = tile_pred.loc[agg.index]
    assert np.abs(agg.to_numpy() - mine.to_numpy()).mean() < 0.02
    assert min(np.corrcoef(agg[g], mine[g])[0, 1] for g in ("G_HOT", "G000", "G005")) > 0.98
    # the planted squares, found over the slide
    hot = tissue.uns["subspot"]["hot"]["S3"]
    r, c = bins.obs["bin_row"].to_numpy() - 6, bins.obs["bin_col"].to_numpy() - 6  # 48 px of glass = 6 squares
    ok = (r >= 0) & (c >= 0) & (r < hot.shape[0] // 8) & (c < hot.shape[1] // 8)
    truth = np.array([hot[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8].mean() for i, j in zip(r[ok], c[ok], strict=True)])
    gene = bins.var_names.get_loc("G_HOT")
    r_bins = np.corrcoef(bins.layers["share"][ok, gene], truth)[0, 1]
    up = tile_pred.loc[bins.obs["tile_id"].astype(str).to_numpy()[ok], "G_HOT"].to_numpy()
    r_up = np.corrcoef(up, truth)[0, 1]
    # seen: 0.57 against 0.36, and on another machine (same seed, other float rounding) 0.53 against 0.35
    assert r_bins >= 0.4 and r_bins > r_up + 0.1, (r_bins, r_up)
    head, model.bins_ = model.bins_, None  # the same model without its head: refused before any tile is read
    try:
        with pytest.raises(InputError, match="train_bins"):
            model.predict_slide(path, bin_um=8)
    finally:
        model.bins_ = head
    with pytest.raises(InputError, match="bin_um must be a positive"):
        model.predict_slide(path, bin_um=-8)
