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


@pytest.fixture(scope="module")
def tissue():
    adata = synthetic_tissue(n_sections=5, n_rows=10, n_cols=10, n_genes=60, seed=3)
    x = np.asarray(adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X, dtype=np.float32).copy()
    j = list(adata.var_names).index(NOISE)
    rng = np.random.default_rng(0)
    x[:, j] = rng.poisson(max(float(x[:, j].mean()), 5.0), size=adata.n_obs)  # pure noise: not in the image
    adata.X = x
    return adata


@pytest.fixture(scope="module")
def fitted(tissue):
    torch.manual_seed(0)
    train = select_sections(tissue, ["S1", "S2", "S3", "S4"])
    setup(train)
    var = np.log1p(np.asarray(train.X)).var(0)
    driven = [g for g in train.var_names[np.argsort(-var)] if g != NOISE][:7]
    model = NH2ST(train, **{**SMALL, "n_genes": 8}, genes=[*driven, NOISE])
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
    # adaptive: within a gene, the width grows with the fold models' disagreement on the spot
    folds = model.fold_predictions(lambda: model.get_predicted_expression(test, return_numpy=True))
    width = (upper - lower).to_numpy()
    for g in range(width.shape[1]):
        order = np.argsort(folds[:, :, g].std(0))
        assert np.all(np.diff(width[order, g]) >= -1e-5) and width[order[-1], g] > 1.2 * width[order[0], g]
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
