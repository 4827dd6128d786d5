"""NH2ST as an scvi-tools model: training, learning, inference, save/load, ablations."""

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import SMALL, per_gene_pcc, setup

from st_predict import NH2ST
from st_predict.pp import normalize_expression

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")


def _targets(adata, genes):
    return normalize_expression(adata.X, adata.var_names.get_indexer(genes))


def _shuffle_patches(adata, seed=0):
    """Same patches, but each spot's expression row comes from a random other training spot (of any
    section), so no patch carries information about the expression it is paired with. (Shuffling
    within sections is not enough: the section-level mean expression would still follow the
    section's overall look.)"""
    out = adata.copy()
    out.X = out.X[np.random.default_rng(seed).permutation(out.n_obs)]
    return out


def _fit(adata, epochs=30, seed=0, **kwargs):
    torch.manual_seed(seed)
    setup(adata)
    model = NH2ST(adata, **{**SMALL, **kwargs})
    model.train(max_epochs=epochs, progress=False)
    return model


@pytest.mark.slow
def test_learns_planted_signal_that_shuffled_patches_cannot(split):
    train, test = split
    model = _fit(train)
    genes = model.genes_
    y = _targets(test, genes)
    mean_mse = ((_targets(train, genes).mean(0) - y) ** 2).mean()

    pred = model.get_predicted_expression(test)
    assert list(pred.columns) == genes and pred.index.equals(test.obs_names)
    mse = ((pred.to_numpy() - y) ** 2).mean()
    pcc = np.nanmean(per_gene_pcc(pred, y))

    control = _fit(_shuffle_patches(train))
    pred_c = control.get_predicted_expression(test).to_numpy()
    mse_c = ((pred_c - y) ** 2).mean()

    # the margin over the per-gene mean predictor is on MSE (PCC is undefined for a constant
    # predictor); the shuffled control must not reach it
    assert mse < 0.75 * mean_mse, (mse, mean_mse)
    assert mse_c > 0.9 * mean_mse, (mse_c, mean_mse)
    assert pcc > 0.4, pcc
    # history holds each loss term per epoch
    for key in ("train_loss", "train_mse", "train_nce_query", "train_nce_neighbor"):
        assert len(model.history[key]) == 30
    assert model.history["train_mse"].iloc[-1, 0] < model.history["train_mse"].iloc[0, 0]


def test_predict_on_image_only_adata(split):
    train, test = split
    model = _fit(train, epochs=2)
    image_only = ad.AnnData(obs=test.obs[["section"]].copy())
    image_only.obsm["spatial"] = test.obsm["spatial"].copy()
    image_only.uns["spatial"] = {"S2": test.uns["spatial"]["S2"]}
    assert image_only.n_vars == 0
    df = model.predict(image_only, key_added="pred")
    assert image_only.obsm["pred"] is df or image_only.obsm["pred"].equals(df)
    assert df.shape == (test.n_obs, len(model.genes_))
    np.testing.assert_allclose(df.to_numpy(), model.get_predicted_expression(test).to_numpy(), rtol=1e-5, atol=1e-6)
    # without the library column: the single section in uns is used
    del image_only.obs["section"]
    np.testing.assert_allclose(
        model.get_predicted_expression(image_only).to_numpy(), df.to_numpy(), rtol=1e-5, atol=1e-6
    )


def test_user_adata_only_gains_documented_keys(split):
    train, test = split
    before_train, before_test = train.copy(), test.copy()
    model = _fit(train, epochs=1)
    model.predict()
    model.predict(test, key_added="nh2st_test")

    def same(a, b, new_obsm=(), new_uns=(), new_obs=()):
        np.testing.assert_array_equal(a.X, b.X)
        assert set(a.obs) == set(b.obs) | set(new_obs)
        pd.testing.assert_frame_equal(a.obs[list(b.obs)], b.obs)
        pd.testing.assert_frame_equal(a.var, b.var)
        assert set(a.obsm) == set(b.obsm) | set(new_obsm)
        for k in b.obsm:
            np.testing.assert_array_equal(a.obsm[k], b.obsm[k])
        assert set(a.uns) == set(b.uns) | set(new_uns)
        for lib, entry in b.uns["spatial"].items():
            np.testing.assert_array_equal(a.uns["spatial"][lib]["images"]["hires"], entry["images"]["hires"])
            assert a.uns["spatial"][lib]["scalefactors"] == entry["scalefactors"]
        assert set(a.layers) == set(b.layers) and set(a.obsp) == set(b.obsp)

    # setup_anndata registers the sections (scvi-tools' codes) and the spots' neighbours, as documented
    same(train, before_train, new_obsm={"nh2st", "spatial_neighbors_indices", "spatial_neighbors_distances"},
         new_uns={"_scvi_uuid", "_scvi_manager_uuid", "st_predict"}, new_obs={"_scvi_library"})
    same(test, before_test, new_obsm={"nh2st_test"}, new_uns={"st_predict"})
    assert train.obsm["nh2st"].columns.tolist() == model.genes_
    # what predict records beside the predictions: the sections the model trained on
    assert test.uns["st_predict"]["nh2st_test"]["training_sections"] == model.train_sections_ == ["S0", "S1"]


def test_save_load_roundtrip(split, tmp_path):
    train, test = split
    model = _fit(train, epochs=2)
    expected = model.get_predicted_expression(test)
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match="already exists"):
        model.save(tmp_path / "m")
    model.save(tmp_path / "m", overwrite=True)

    loaded = NH2ST.load(tmp_path / "m")  # no adata saved: registry only
    assert loaded.adata is None and loaded.is_trained
    assert loaded.genes_ == model.genes_
    assert loaded.weights_source_ == model.weights_source_
    pd.testing.assert_frame_equal(loaded.get_predicted_expression(test), expected, atol=1e-5, rtol=1e-5)

    with_adata = NH2ST.load(tmp_path / "m", adata=train.copy())
    np.testing.assert_allclose(
        with_adata.get_predicted_expression(test).to_numpy(), expected.to_numpy(), rtol=1e-5, atol=1e-5
    )
    image_only = ad.AnnData(obs=pd.DataFrame(index=test.obs_names))
    image_only.obsm["spatial"] = test.obsm["spatial"]
    image_only.uns["spatial"] = {"S2": test.uns["spatial"]["S2"]}
    predicting = NH2ST.load(tmp_path / "m", adata=image_only)
    np.testing.assert_allclose(predicting.predict().to_numpy(), expected.to_numpy(), rtol=1e-5, atol=1e-5)
    assert "nh2st" in image_only.obsm

    other = train[:, ::-1].copy()
    with pytest.raises(ValueError, match="genes differ"):
        NH2ST.load(tmp_path / "m", adata=other)
    fewer = train[:, :30].copy()
    with pytest.raises(ValueError, match="are absent"):
        NH2ST.load(tmp_path / "m", adata=fewer)


ABLATIONS = [
    {"use_neighbor_branch": False},
    {"attention": "self"},
    {"attention": "none"},
    {"contrastive": False},
    {"graph": "graph"},
    {"attention_mode": "tokens"},
    {"n_neighbors": 4, "hyperedge_degree": 3},
    {"n_neighbors": 16},
    {"n_hgnn_layers": 1},
    {"n_hgnn_layers": 4},
    {"lambda_query": 0.0, "lambda_neighbor": 1.0},
    {"temperature": 0.2, "symmetric_nce": True},
    {"pooling": "avg", "share_attention": True, "hypergraph_norm": "sym", "activation": "none"},
]


@pytest.mark.parametrize("switch", ABLATIONS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_every_ablation_constructs_and_trains(split, switch):
    train, test = split
    model = _fit(train, epochs=1, **switch)
    for key, value in switch.items():
        assert model.module_kwargs[key] == value
    assert np.isfinite(model.history["train_loss"].iloc[-1, 0])
    if switch.get("contrastive") is False or switch.get("use_neighbor_branch") is False:
        assert model.history["train_nce_neighbor"].iloc[-1, 0] == 0
    else:
        assert model.history["train_nce_neighbor"].iloc[-1, 0] > 0
    assert np.isfinite(model.get_predicted_expression(test).to_numpy()).all()


class _BatchSizes(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(batch["node_map"].shape[0])


def test_batch_size_is_a_training_switch(split):
    train, _ = split
    model = _fit(train, epochs=0)
    sizes = _BatchSizes()
    model.train(max_epochs=1, batch_size=4, progress=False, callbacks=[sizes])
    assert sizes.seen == [4] * (train.n_obs // 4)  # every batch had 4 target spots (the recipe's is 32)
    assert model.train_settings_["batch_size"] == 4


def test_finetune_trains_the_trunk_end_to_end(split):
    train, test = split
    torch.manual_seed(0)
    setup(train)
    model = NH2ST(train, trunk="finetune", **SMALL)
    before = model.module.trunk[0].weight.detach().clone()
    model.train(max_epochs=1, progress=False)
    assert not torch.equal(before, model.module.trunk[0].weight.detach())
    assert model._data.fmaps is None  # no cache in end-to-end mode
    assert np.isfinite(model.get_predicted_expression(test).to_numpy()).all()


def test_frozen_trunk_is_cached_once_and_not_trained(split):
    train, test = split
    model = _fit(train, epochs=1, trunk="frozen")
    trunk = {k: v.clone() for k, v in model.module.trunk.state_dict().items()}
    cache = model._data.fmaps
    assert cache.shape == (train.n_obs, 8, 512, 1, 1)  # the 8 flips/rotations (augmentation)
    model.train(max_epochs=1, progress=False)
    assert model._data.fmaps is cache
    for k, v in model.module.trunk.state_dict().items():
        assert torch.equal(v, trunk[k]), k
    # the cache and the image path give the same predictions
    np.testing.assert_allclose(
        model.get_predicted_expression().to_numpy(), model.get_predicted_expression(train.copy()).to_numpy(),
        rtol=1e-4, atol=1e-5,
    )


def test_validation_split_logs_validation_losses(split):
    train, _ = split
    torch.manual_seed(0)
    setup(train)
    model = NH2ST(train, **SMALL)
    model.train(max_epochs=2, validation="section", progress=False)
    assert len(model.history["validation_loss"]) == 2
    assert len(model.history["validation_pcc"]) == 2
    assert len(model.train_indices) + len(model.validation_indices) == train.n_obs
    assert not set(model.train_indices) & set(model.validation_indices)


def test_summary_names_weights_and_switches(split):
    train, _ = split
    setup(train)
    model = NH2ST(train, **SMALL)
    text = model.summary_string
    assert "random init" in text and "finetune" in text and "K=8" in text and "Not Trained" in text
    assert "recipe 'default'" in text and "residual" not in text
    assert "solvable without the image" in NH2ST(train, **SMALL, cross_residual=True).summary_string


def test_explicit_gene_list_and_subset(split):
    train, _ = split
    setup(train)
    model = NH2ST(train, **{**SMALL, "genes": ["G005", "G001", "G030"]})
    assert model.genes_ == ["G005", "G001", "G030"]
    assert model.module.n_genes == 3
