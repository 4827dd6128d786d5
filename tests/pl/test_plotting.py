import numpy as np
import pandas as pd
import pytest
import squidpy as sq

from st_predict.pl import predicted_vs_measured, predictions_to_anndata


@pytest.fixture
def predicted(tissue):
    sec = tissue[tissue.obs["section"] == "S1"].copy()
    sec.uns["spatial"] = {"S1": sec.uns["spatial"]["S1"]}
    genes = list(sec.var_names[:3])
    rng = np.random.default_rng(0)
    sec.obsm["nh2st"] = pd.DataFrame(rng.random((sec.n_obs, 3)), index=sec.obs_names, columns=genes)
    measured = pd.DataFrame(np.log1p(sec[:, genes].X), index=sec.obs_names, columns=genes)
    return sec, genes, measured


def test_predictions_to_anndata_is_plottable(predicted):
    sec, genes, measured = predicted
    out = predictions_to_anndata(sec, measured=measured)
    assert out.var_names.tolist() == [f"{g} predicted" for g in genes] + [f"{g} measured" for g in genes]
    np.testing.assert_array_equal(out[:, f"{genes[1]} predicted"].X.ravel(), sec.obsm["nh2st"][genes[1]].to_numpy(np.float32))
    np.testing.assert_array_equal(out.obsm["spatial"], sec.obsm["spatial"])
    assert out.uns["spatial"]["S1"]["images"]["hires"].shape == (352, 352, 3)
    only = predictions_to_anndata(sec, genes=[genes[2]])
    assert only.var_names.tolist() == [genes[2]]
    sq.pl.spatial_scatter(only, color=genes[2])  # any squidpy plot, with its default image key, takes predicted genes
    with pytest.raises(KeyError, match="run model.predict"):
        predictions_to_anndata(sec, key="other")


def test_predicted_vs_measured_figure(predicted, tmp_path):
    sec, genes, measured = predicted
    # the tissue's spots cover only part of the image: the figure crops to them
    keep = (sec.obsm["spatial"][:, 0] < 200) & (sec.obsm["spatial"][:, 1] < 200)
    sec, measured = sec[keep].copy(), measured.loc[keep]
    fig = predicted_vs_measured(sec, genes[:2], measured, title="two genes", save=str(tmp_path / "fig.png"))
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 4
    for gene in genes[:2]:
        pred_ax = next(ax for ax in panels if ax.get_title().startswith(f"{gene} predicted"))
        meas_ax = next(ax for ax in panels if ax.get_title() == f"{gene} measured")
        # one colour scale per gene, spanning both sides
        lo = min(sec.obsm["nh2st"][gene].min(), measured[gene].min())
        hi = max(sec.obsm["nh2st"][gene].max(), measured[gene].max())
        assert pred_ax.collections[0].get_clim() == meas_ax.collections[0].get_clim() == pytest.approx((lo, hi))
        r = np.corrcoef(sec.obsm["nh2st"][gene], measured[gene])[0, 1]
        assert f"PCC with measured: {r:.2f}" in pred_ax.get_title()
        # cropped to the spots (the image is 352 px wide; the spots reach x < 200)
        assert pred_ax.get_xlim()[1] < 260 and pred_ax.get_ylim()[0] < 260
        assert not pred_ax.get_xticks().size and not pred_ax.get_xlabel()
    bars = [ax for ax in fig.axes if ax.get_ylabel() == "log1p(counts per 10k)"]
    assert len(bars) == 2
    assert fig._suptitle.get_text() == "two genes"
    assert (tmp_path / "fig.png").stat().st_size > 10_000


def test_predicted_vs_measured_spots_stand_out_and_the_scale_starts_at_zero(predicted):
    sec, genes, measured = predicted
    gene = genes[0]
    sec.obsm["nh2st"][gene] = sec.obsm["nh2st"][gene] - 0.3  # some predictions below 0 (a regression head can)
    fig = predicted_vs_measured(sec, [gene], measured)
    pred_ax = next(ax for ax in fig.axes if ax.get_title().startswith(f"{gene} predicted"))
    lo, hi = pred_ax.collections[0].get_clim()
    assert lo == 0.0 and hi == pytest.approx(max(sec.obsm["nh2st"][gene].max(), measured[gene].max()))
    # the H&E faded under the spots, each spot edged in white against the purple tissue
    assert pred_ax.get_images()[0].get_alpha() == 0.5
    np.testing.assert_allclose(pred_ax.collections[0].get_edgecolors()[:, :3], 1.0)
