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
    assert out.uns["spatial"]["S1"]["images"]["lowres"].shape == (352, 352, 3)
    only = predictions_to_anndata(sec, genes=[genes[2]])
    assert only.var_names.tolist() == [genes[2]]
    sq.pl.spatial_scatter(only, color=genes[2], img_res_key="lowres")  # any squidpy plot takes predicted genes
    with pytest.raises(KeyError, match="run model.predict"):
        predictions_to_anndata(sec, key="other")


def test_predicted_vs_measured_figure(predicted, tmp_path):
    sec, genes, measured = predicted
    fig = predicted_vs_measured(sec, genes[:2], measured, save=str(tmp_path / "fig.png"))
    assert len([ax for ax in fig.axes if ax.get_title()]) == 4
    assert (tmp_path / "fig.png").stat().st_size > 10_000
