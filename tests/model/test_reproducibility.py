"""One seed, one model: with ``scvi.settings.seed`` set, two trainings give bit-identical predictions on
CPU, for each trunk mode and through the whole-slide path."""

import numpy as np
import pytest
import scvi

from st_predict import NH2ST

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*")

TRUNKS = {
    "finetune, cached neighbours": {"trunk": "finetune"},
    "finetune, neighbours with gradient": {"trunk": "finetune", "neighbor_trunk_grad": True},
    "frozen": {"trunk": "frozen"},
}


def _with_pixel_size(adata):
    for lib in adata.uns["spatial"]:
        adata.uns["spatial"][lib].setdefault("metadata", {})["pixel_size_um"] = 0.5
    return adata


def _train(tissue, seed, **model_kwargs):
    from helpers import SMALL, setup

    scvi.settings.seed = seed
    adata = _with_pixel_size(tissue[tissue.obs["section"] != "S2"].copy())
    setup(adata)
    model = NH2ST(adata, **{**SMALL, **model_kwargs})
    model.train(max_epochs=2, progress=False, accelerator="cpu")
    return model


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", TRUNKS.values(), ids=TRUNKS.keys())
def test_one_seed_gives_bit_identical_predictions(tissue, kwargs):
    test = _with_pixel_size(tissue[tissue.obs["section"] == "S2"].copy())
    a = _train(tissue, 0, **kwargs).get_predicted_expression(test, tta=True)
    b = _train(tissue, 0, **kwargs).get_predicted_expression(test, tta=True)
    np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())
    c = _train(tissue, 1, **kwargs).get_predicted_expression(test, tta=True)
    assert not np.array_equal(a.to_numpy(), c.to_numpy())  # and the seed matters


@pytest.mark.slow
def test_one_seed_gives_bit_identical_slide_predictions(tissue, tmp_path):
    pytest.importorskip("wsidata")
    from helpers import slide_tissue, write_slide

    path = write_slide(tmp_path / "slide.tif", slide_tissue(1024), mpp=0.5)
    tables = [_train(tissue, 0).predict_slide(path, progress=False).tables["nh2st"] for _ in range(2)]
    assert tables[0].n_obs > 0
    np.testing.assert_array_equal(np.asarray(tables[0].X), np.asarray(tables[1].X))
    np.testing.assert_array_equal(tables[0].obsm["spatial"], tables[1].obsm["spatial"])
