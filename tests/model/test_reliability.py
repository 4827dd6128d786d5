"""train(reliability=True): per-gene reliability from section-wise cross-fitting, fold-model ensemble, conformal
intervals (synthetic tissue, where the image drives some genes and one gene is pure noise)."""

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import SMALL, setup

from st_predict import NH2ST
from st_predict.data import select_sections, synthetic_tissue

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")
NOISE = "G059"
LOW = "G000"  # an image-driven gene whose counts are thinned to ~3 %: low-expressed


@pytest.fixture(scope="module")
def tissue():
    adata = synthetic_tissue(n_sections=5, n_rows=10, n_cols=10, n_genes=60, seed=3)
    x = np.asarray(adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X, dtype=np.float32).copy()
    j = list(adata.var_names).index(NOISE)
    rng = np.random.default_rng(0)
    x[:, j] = rng.poisson(max(float(x[:, j].mean()), 5.0), size=adata.n_obs)  # pure noise: not in the image
    low = list(adata.var_names).index(LOW)
    x[:, low] = rng.binomial(x[:, low].astype(np.int64), 0.03)
    adata.X = x
    return adata


@pytest.fixture(scope="module")
def fitted(tissue):
    torch.manual_seed(0)
    train = select_sections(tissue, ["S1", "S2", "S3", "S4"])
    setup(train)
    var = np.log1p(np.asarray(train.X)).var(0)
    driven = [g for g in train.var_names[np.argsort(-var)] if g not in (NOISE, LOW)][:7]
    model = NH2ST(train, **{**SMALL, "n_genes": 9}, genes=[*driven, LOW, NOISE])
    model.train(max_epochs=8, reliability=True, progress=False)
    return model, driven


@pytest.mark.slow
def test_an_image_driven_gene_is_reliable_and_a_noise_gene_is_not(fitted):
    model, driven = fitted
    rel = model.gene_reliability_
    assert list(rel.index) == list(model.genes_) and set(rel["n_sections"]) == {4}
    assert {"reliability", "ci_low", "ci_high", "reliable", "pcc_S1"} <= set(rel.columns)
    assert rel.loc[driven, "reliability"].max() > 0.5 and rel.loc[driven, "reliable"].sum() >= 5
    assert abs(rel.loc[NOISE, "reliability"]) < 0.2 and not rel.loc[NOISE, "reliable"]
    # reliability is the mean over sections of the within-section out-of-fold PCC
    per = rel[[f"pcc_S{i}" for i in range(1, 5)]].to_numpy()
    np.testing.assert_allclose(rel["reliability"], per.mean(1), rtol=1e-6)
    assert len(model.fold_states_) == 4 and model.reliability_sections_ == ["S1", "S2", "S3", "S4"]


def test_intervals_cover_a_held_out_section_at_their_level_and_widen_where_the_folds_disagree(fitted, tissue):
    model, _ = fitted
    test = select_sections(tissue, ["S0"])
    before = model.conformal_["scores"].copy()
    pred = model.predict(test, key_added="nh2st")
    np.testing.assert_array_equal(model.conformal_["scores"], before)  # calibration never reads the predicted section
    lower, upper = test.obsm["nh2st_lower"], test.obsm["nh2st_upper"]
    assert list(lower.columns) == list(pred.columns) and (lower.index == test.obs_names).all()
    from st_predict.metrics import measured_expression

    truth = measured_expression(test, model.genes_)
    covered = ((truth >= lower) & (truth <= upper)).mean(0)
    assert 0.85 <= covered.mean() <= 0.95, covered
    assert (lower.to_numpy() <= pred.to_numpy()).all() and (pred.to_numpy() <= upper.to_numpy()).all()
    meta = test.uns["st_predict"]["nh2st"]
    assert meta["interval_level"] == 0.9 and isinstance(meta["gene_reliability"], pd.DataFrame)
    assert meta["interval_depth"] == meta["calibration_depth"] == model.calibration_depth > 2000
    # adaptive: within a gene, the expected interval's width grows with the fold models' disagreement on the spot
    folds = model.fold_predictions(lambda: model.get_predicted_expression(test, return_numpy=True))
    expected = (test.obsm["nh2st_expected_upper"] - test.obsm["nh2st_expected_lower"]).to_numpy()
    for g in range(expected.shape[1]):
        order = np.argsort(folds[:, :, g].std(0))
        kept = order[(test.obsm["nh2st_expected_lower"].to_numpy()[order, g] > 0)]  # not cut at 0
        assert np.all(np.diff(expected[kept, g]) >= -1e-5) and expected[kept[-1], g] > 1.2 * expected[kept[0], g]
    # the measurement's interval holds the expected one and the counts noise: never narrower
    width = (upper - lower).to_numpy()
    assert (width >= expected - 1e-5).all() and width.mean() > expected.mean()
    # a lower level gives narrower intervals; none at all with interval_level=None
    model.predict(test, key_added="p80", interval_level=0.8)
    assert ((test.obsm["p80_upper"] - test.obsm["p80_lower"]).to_numpy() <= width + 1e-6).all()
    other = test.copy()
    model.predict(other, key_added="none", interval_level=None)
    assert "none_lower" not in other.obsm


def test_reliability_survives_save_and_load(fitted, tissue, tmp_path):
    model, _ = fitted
    test = select_sections(tissue, ["S0"])
    model.predict(test)
    model.save(tmp_path / "m")
    back = NH2ST.load(tmp_path / "m")
    again = select_sections(tissue, ["S0"])
    back.predict(again)
    pd.testing.assert_frame_equal(back.gene_reliability_, model.gene_reliability_)
    np.testing.assert_allclose(again.obsm["nh2st_upper"], test.obsm["nh2st_upper"], atol=1e-5)


def test_reliability_needs_two_sections_and_no_validation(tissue):
    one = select_sections(tissue, ["S1"])
    setup(one)
    with pytest.raises(ValueError, match=r"at least 2 training sections \(it has 1"):
        NH2ST(one, **SMALL).train(max_epochs=1, reliability=True, progress=False)
    two = select_sections(tissue, ["S1", "S2"])
    setup(two)
    with pytest.raises(ValueError, match="train without validation="):
        NH2ST(two, **SMALL).train(max_epochs=1, reliability=True, validation="section", progress=False)


@pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")
@pytest.mark.filterwarnings("ignore:1 section\\(s\\) unlike the calibration:st_predict.InputWarning")
def test_predict_slide_writes_bounds_and_reliability_into_its_table(fitted, tmp_path):
    pytest.importorskip("lazyslide")
    from helpers import slide_tissue, write_slide

    model, _ = fitted
    slide = write_slide(tmp_path / "slide.tif", slide_tissue(1024), mpp=0.5)
    table = model.predict_slide(slide, tile_size_um=32.0, pitch_um=40.0, progress=False, image_mpp=None).tables["nh2st"]
    x, lo, hi = np.asarray(table.X), table.layers["lower"], table.layers["upper"]
    assert lo.shape == x.shape and (lo <= x + 1e-6).all() and (x <= hi + 1e-6).all() and (hi - lo).min() > 0
    pd.testing.assert_series_equal(table.var["reliability"], model.gene_reliability_["reliability"], check_names=False)
    assert table.uns["st_predict"]["interval_level"] == 0.9
    assert {"expected_lower", "expected_upper"} <= set(table.layers)
    # another synthetic tissue than the training sections': the shift detector flags it
    assert list(table.uns["st_predict"]["intervals_trusted"].values()) == [False]
    # the slide's name, not a name of the layers written next to it
    assert table.uns["st_predict"]["slide"] not in ("lower", "upper") and "slide" in table.uns["st_predict"]["slide"]
    plain = model.predict_slide(slide, tile_size_um=32.0, pitch_um=40.0, progress=False, image_mpp=None,
                                interval_level=None).tables["nh2st"]
    assert "lower" not in plain.layers
    np.testing.assert_allclose(np.asarray(plain.X), x, atol=1e-5)  # the single model's point either way


def test_reliability_plots(fitted, tissue):
    import matplotlib.pyplot as plt

    from st_predict.metrics import measured_expression, pcc_per_gene
    from st_predict.pl import gene_reliability, interval_map, reliability_vs_achieved

    model, _ = fitted
    ax = gene_reliability(model)
    crosses = [c for c in ax.collections if c.get_label().startswith("unreliable")][0]
    assert len(crosses.get_offsets()) == int((~model.gene_reliability_["reliable"]).sum()) >= 1
    assert NOISE in [t.get_text() for t in ax.get_yticklabels()]
    test = select_sections(tissue, ["S0"])
    pred = model.predict(test)
    achieved = pd.Series(pcc_per_gene(pred, measured_expression(test, model.genes_)), index=model.genes_)
    ax = reliability_vs_achieved(test, achieved)  # the table read back from the predictions' uns
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    assert len(points) == len(model.genes_) and "Spearman" in ax.get_title()
    assert any(line.get_label() == "identity" for line in ax.get_lines())
    fig = interval_map(test, [model.genes_[0]])
    assert sorted(a.get_title() for a in fig.axes if a.get_title()) == sorted(
        [f"{model.genes_[0]} predicted", f"{model.genes_[0]} interval width"])
    plt.close("all")


def _thinned(adata, fraction, seed=0):
    from st_predict.model import thin_counts

    out = adata.copy()
    out.X = thin_counts(adata.X, fraction, seed).toarray().astype(np.float32)
    return out


def test_depth_intervals_widen_as_depth_falls_and_keep_coverage_on_a_thinned_section(fitted, tissue):
    from st_predict.metrics import measured_expression

    model, _ = fitted
    test = select_sections(tissue, ["S0"])
    shallow = _thinned(test, 1 / 16)
    depth = float(np.median(np.asarray(shallow.X).sum(1)))
    assert 150 < depth < 250
    model.predict(shallow, key_added="deep")  # at the calibration depth: what a deep section would show
    model.predict(shallow, key_added="shallow", interval_depth=depth)
    meta = shallow.uns["st_predict"]["shallow"]
    assert meta["interval_depth"] == depth and meta["calibration_depth"] == model.calibration_depth
    truth = measured_expression(shallow, model.genes_)

    def coverage(key):
        lo, hi = shallow.obsm[f"{key}_lower"], shallow.obsm[f"{key}_upper"]
        return ((truth >= lo) & (truth <= hi)).to_numpy().mean(0)

    widths = {k: (shallow.obsm[f"{k}_upper"] - shallow.obsm[f"{k}_lower"]).to_numpy().mean() for k in ("deep", "shallow")}
    assert widths["shallow"] > 1.3 * widths["deep"], widths
    assert 0.85 <= coverage("shallow").mean() <= 0.96, coverage("shallow")
    assert coverage("deep").mean() < coverage("shallow").mean() - 0.05  # the deep interval misses shallow values
    # the expected interval does not depend on the depth asked for
    np.testing.assert_allclose(shallow.obsm["deep_expected_upper"], shallow.obsm["shallow_expected_upper"], atol=1e-6)
    with pytest.raises(ValueError, match="interval_depth must be a positive number"):
        model.predict(shallow, key_added="bad", interval_depth=-5)


def test_intervals_rebuilt_at_a_depth_from_what_predict_wrote(fitted, tissue, tmp_path):
    """metrics.intervals_at_depth (what st-predict evaluate scores) reproduces predict's bounds at the depth
    predict was asked for, after an h5ad round trip, and at each spot's own depth gives other bounds."""
    import anndata as ad

    from st_predict.metrics import interval_scores, intervals_at_depth, measured_expression

    model, _ = fitted
    shallow = _thinned(select_sections(tissue, ["S0"]), 1 / 16)
    model.predict(shallow, key_added="deep")  # for a measurement at the calibration depth
    shallow.write_h5ad(tmp_path / "p.h5ad")
    back = ad.read_h5ad(tmp_path / "p.h5ad")
    lo, hi = intervals_at_depth(back, "deep", depth=model.calibration_depth)
    np.testing.assert_allclose(lo, shallow.obsm["deep_lower"], atol=1e-5)
    np.testing.assert_allclose(hi, shallow.obsm["deep_upper"], atol=1e-5)
    own_lo, own_hi = intervals_at_depth(back, "deep")  # each spot's own UMI count: ~1/16 of the calibration's
    truth = measured_expression(back, model.genes_).to_numpy()
    own = interval_scores(own_lo, own_hi, truth, back.obsm["deep"], 0.9)
    written = interval_scores(lo, hi, truth, back.obsm["deep"], 0.9)
    assert own["width"] > 1.3 * written["width"] and 0.85 <= own["coverage"] <= 0.96, (own, written)
    assert own["crps"] < written["crps"]  # the right depth is the better forecast of a shallow measurement
    del back.uns["st_predict"]["deep"]["interval_quantiles"]
    with pytest.raises(KeyError, match="interval_quantiles"):
        intervals_at_depth(back, "deep")


def test_the_reliability_of_a_low_expressed_gene_drops_at_low_depth(fitted):
    model, driven = fitted
    deep = model.gene_reliability()
    pd.testing.assert_frame_equal(deep, model.gene_reliability_)
    shallow = model.gene_reliability(depth=model.calibration_depth / 32)
    assert shallow.attrs["depth"] == pytest.approx(model.calibration_depth / 32)
    drop = deep["reliability"] - shallow["reliability"]
    assert deep.loc[LOW, "reliability"] > 0.3, deep.loc[LOW]
    kept = shallow["reliability"] / deep["reliability"]
    assert drop[LOW] > 0.15 and kept[LOW] < kept[driven].median(), kept
    # between the calibrated depths it is interpolated, monotone here
    mid = model.gene_reliability(depth=model.calibration_depth / 5)
    assert shallow.loc[LOW, "reliability"] <= mid.loc[LOW, "reliability"] <= deep.loc[LOW, "reliability"]


def _recoloured(adata):
    out = adata.copy()
    for entry in out.uns["spatial"].values():
        img = entry["images"]["hires"].astype(np.float64) / 255
        img = img ** 1.6 * np.array([0.8, 1.0, 1.15])  # a scanner-like gamma and colour cast
        entry["images"]["hires"] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return out


def test_the_shift_detector_fires_on_a_recoloured_section_and_not_on_a_plain_one(fitted, tissue):
    import warnings

    from st_predict import InputWarning

    model, _ = fitted
    ref = model.shift_reference_
    assert set(ref["loso_scores"]) == {"S1", "S2", "S3", "S4"}
    assert ref["threshold"] == pytest.approx(1.5 * max(ref["loso_scores"].values()))
    plain = select_sections(tissue, ["S0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        model.predict(plain)
    meta = plain.uns["st_predict"]["nh2st"]
    assert meta["intervals_trusted"] == {"S0": True} and meta["shift"]["S0"]["score"] < ref["threshold"]
    shifted = _recoloured(plain)
    with pytest.warns(InputWarning, match=r"1 section\(s\) unlike the calibration sections.*'S0'") as record:
        model.predict(shifted)
    assert len([w for w in record if issubclass(w.category, InputWarning)]) == 1
    meta = shifted.uns["st_predict"]["nh2st"]
    assert meta["intervals_trusted"] == {"S0": False} and meta["shift"]["S0"]["unlike_calibration"]


@pytest.mark.slow
def test_group_key_folds_never_split_a_patient(tissue):
    torch.manual_seed(0)
    train = select_sections(tissue, ["S1", "S2", "S3", "S4"])
    train.obs["patient"] = train.obs["section"].map({"S1": "P1", "S2": "P2", "S3": "P1", "S4": "P2"}).astype(str)
    setup(train)
    model = NH2ST(train, **{**SMALL, "n_genes": 4})
    model.train(max_epochs=1, reliability=True, group_key="patient", progress=False)
    rel = model.gene_reliability_
    assert len(model.fold_states_) == 2 and rel.attrs["folds"] == ["P1", "P2"]
    assert "across patients" in rel.attrs["scope"] and "2 fold models" in model.summary_string
    # every spot's out-of-fold prediction is the fold model's that held its whole patient out
    folds = model.fold_predictions(lambda: model.get_predicted_expression(train, return_numpy=True))
    fold_of = train.obs["patient"].map({"P1": 0, "P2": 1}).to_numpy()
    np.testing.assert_allclose(model.oof_predictions_.to_numpy(), folds[fold_of, np.arange(train.n_obs)], atol=1e-5)
    # each patient weighs the same in the calibration
    w = pd.Series(model.conformal_["weights"]).groupby(train.obs["patient"].to_numpy()).sum()
    np.testing.assert_allclose(w.to_numpy(), [0.5, 0.5])
    one = select_sections(train, ["S1", "S3"])  # one patient: folds by section, said to be within-patient
    setup(one)
    single = NH2ST(one, **{**SMALL, "n_genes": 4})
    single.train(max_epochs=1, reliability=True, group_key="patient", progress=False)
    assert len(single.fold_states_) == 2 and "within-patient" in single.gene_reliability_.attrs["scope"]
    assert "within-patient" in single.summary_string
    split = train.copy()
    split.obs["patient"] = np.where(np.arange(split.n_obs) % 2, "P1", "P2")
    setup(split)
    with pytest.raises(ValueError, match="Section 'S1' has spots of 2 groups of obs\\['patient'\\]"):
        NH2ST(split, **{**SMALL, "n_genes": 4}).train(max_epochs=1, reliability=True, group_key="patient", progress=False)
