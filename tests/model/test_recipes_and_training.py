"""Issue 8: contrastive terms that only the image can solve, recipes, target scaling, augmentation,
validation by section."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from helpers import SMALL, setup

from st_predict import NH2ST
from st_predict.train import RECIPES, NH2STCollate, even_batches, split_validation

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")


def _constant_images(adata):
    out = adata.copy()
    for entry in out.uns["spatial"].values():
        img = entry["images"]["hires"]
        entry["images"]["hires"] = np.full_like(img, 0)
        entry["images"]["hires"][...] = np.array([200, 120, 170], dtype=img.dtype)  # one pink everywhere
    return out


def _nce_after_training(adata, epochs, **kwargs):
    torch.manual_seed(0)
    setup(adata)
    model = NH2ST(adata, **{**SMALL, **kwargs})
    model.train(max_epochs=epochs, batch_size=8, progress=False)
    hist = model.history
    return hist["train_nce_query"].iloc[-1, 0], hist["train_nce_neighbor"].iloc[-1, 0]


@pytest.mark.slow
def test_contrastive_terms_need_the_image(split):
    """A model that sees one constant colour cannot tell spots apart: both InfoNCE terms stay at
    log B. On the planted morphology -> expression signal they fall. The authors' residual form
    solves the query term without the image (the shortcut this test guards against)."""
    train, _ = split
    log_b = math.log(8)
    blind = _constant_images(train)
    q, n = _nce_after_training(blind, 8)
    assert q >= 0.8 * log_b and n >= 0.8 * log_b, (q, n)
    q_img, n_img = _nce_after_training(train.copy(), 8)
    assert q_img < 0.8 * log_b and n_img < 0.8 * log_b, (q_img, n_img)
    q_res, _ = _nce_after_training(blind, 8, cross_residual=True)
    assert q_res < 0.5 * log_b, q_res


def test_standardised_targets_round_trip_to_log1p(split, tmp_path):
    train, test = split
    torch.manual_seed(0)
    setup(train)
    model = NH2ST(train, **SMALL)
    model.train(max_epochs=2, progress=False)
    targets = model._training_data().targets
    torch.testing.assert_close(model.module.target_shift, targets.mean(0))
    torch.testing.assert_close(model.module.target_scale, targets.std(0))
    pred = model.get_predicted_expression(test)
    # predictions are on the log1p scale of the data, not on the standardised one
    assert abs(pred.to_numpy().mean() - targets.mean().item()) < 0.3 * targets.mean().item()
    np.testing.assert_allclose(pred.to_numpy().mean(0), targets.numpy().mean(0), atol=1.0)
    model.save(tmp_path / "m")
    loaded = NH2ST.load(tmp_path / "m")
    torch.testing.assert_close(loaded.module.target_scale, model.module.target_scale)
    np.testing.assert_allclose(loaded.get_predicted_expression(test).to_numpy(), pred.to_numpy(), rtol=1e-5, atol=1e-5)
    # retraining does not refit the scale: a retrained and a loaded model behave the same
    shift = model.module.target_shift.clone()
    model.train(max_epochs=1, progress=False)
    torch.testing.assert_close(model.module.target_shift, shift)


def test_frozen_path_augments_with_cached_views(split):
    train, _ = split
    torch.manual_seed(0)
    setup(train)
    model = NH2ST(train, **{**SMALL, "trunk": "frozen"})
    model.train(max_epochs=1, progress=False)  # recipe default: augment
    cache = model._training_data().fmaps
    assert cache.shape == (train.n_obs, 8, 512, 1, 1)
    # the 8 views are really different inputs to the network
    assert not torch.allclose(cache[:, 0], cache[:, 1]) and not torch.allclose(cache[:, 0], cache[:, 4])
    # batches draw random views (not always the identity) when augmenting, the identity otherwise
    aug = NH2STCollate(model._data.targets, model._data.neighbors, fmaps=cache, augment="dihedral", seed=0)
    plain = NH2STCollate(model._data.targets, model._data.neighbors, fmaps=cache, augment="none")
    idx = list(range(16))
    a, p = aug(idx), plain(idx)
    torch.testing.assert_close(p["fmaps"], cache[p["node_index"], 0])
    assert not torch.allclose(a["fmaps"], p["fmaps"])
    for row, spot in zip(a["fmaps"], a["node_index"], strict=True):
        assert any(torch.equal(row, cache[spot, v]) for v in range(8))
    # without augmentation the cache holds one view
    model2 = NH2ST(train, **{**SMALL, "trunk": "frozen"})
    model2.train(max_epochs=1, augment="none", progress=False)
    assert model2._training_data().fmaps.shape == (train.n_obs, 512, 1, 1)


def test_finetune_scaled_features_are_standard_in_training_mode(split):
    train, _ = split
    torch.manual_seed(0)
    setup(train)
    model = NH2ST(train, **{**SMALL, "trunk": "finetune"})
    module = model.module.train()
    patches = model.training_patches()[:64]
    fmaps = module.trunk_features(patches)
    scaled = module.path_head.scaled(fmaps).detach()
    # features the trunk does not use at all are constant (0) and stay 0; the others are standardised
    live = fmaps.mean((2, 3)).std(0) > 1e-6
    assert live.sum() > 100
    np.testing.assert_allclose(scaled[:, live].mean(0).numpy(), 0, atol=1e-3)
    np.testing.assert_allclose(scaled[:, live].std(0, unbiased=False).numpy(), 1, atol=0.05)


def test_size_one_remainder_of_the_validation_set_does_not_crash(split):
    train, _ = split
    n_val = int((train.obs["section"] == "S1").sum())
    batch_size = 33
    assert n_val % batch_size == 1  # the layout that left a one-spot batch before
    sizes = [len(b) for b in even_batches(np.arange(n_val), batch_size)]
    assert sum(sizes) == n_val and max(sizes) - min(sizes) <= 1 and min(sizes) >= 2
    torch.manual_seed(0)
    setup(train)
    model = NH2ST(train, **SMALL)
    model.train(max_epochs=1, batch_size=batch_size, validation="S1", progress=False)
    assert np.isfinite(model.history["validation_nce_query"].iloc[-1, 0])
    assert np.isfinite(model.history["validation_pcc"].iloc[-1, 0])


def test_section_validation_never_touches_the_held_out_section(split, monkeypatch):
    train, test = split  # S2 (test) is not even in the training AnnData
    torch.manual_seed(0)
    setup(train)
    model = NH2ST(train, **SMALL)
    seen = {"train": set(), "validation": set()}
    original = NH2STCollate.__call__

    def spy(self, indices):
        batch = original(self, indices)
        kind = "validation" if self.augment == "none" else "train"
        seen[kind].update(batch["node_index"].tolist())
        return batch

    monkeypatch.setattr(NH2STCollate, "__call__", spy)
    model.train(max_epochs=2, validation="section", best_epoch=True, progress=False)
    sections = train.obs["section"].astype(str).to_numpy()
    assert model.validation_ == {"kind": "section", "sections": ["S1"], "n_spots": int((sections == "S1").sum()),
                                 "leaky": False}
    assert set(sections[model.validation_indices]) == {"S1"}
    assert set(sections[model.train_indices]) == {"S0"}
    assert set(sections[sorted(seen["train"])]) == {"S0"}  # targets and their neighbours
    assert set(sections[sorted(seen["validation"])]) == {"S1"}
    assert len(model.history["validation_pcc"]) == 2 and model.best_epoch_ in (1, 2)
    assert "Validation: section(s) S1" in model.summary_string


def test_split_validation_rules():
    libs = np.array(["A"] * 5 + ["B"] * 4 + ["C"] * 3)
    tr, va, desc = split_validation(libs, "section")
    assert set(libs[va]) == {"C"} and set(libs[tr]) == {"A", "B"} and not desc["leaky"]
    tr, va, desc = split_validation(libs, ["A", "C"])
    assert set(libs[va]) == {"A", "C"} and desc["sections"] == ["A", "C"]
    tr, va, desc = split_validation(libs, None)
    assert len(tr) == 12 and len(va) == 0 and desc is None
    with pytest.raises(ValueError, match="leaky"):
        split_validation(libs, "random")
    with pytest.raises(ValueError, match="leaky"):
        split_validation(libs, None, train_size=0.8)  # random spots of several sections
    with pytest.raises(ValueError, match="not in the training data"):
        split_validation(libs, "D")
    with pytest.raises(ValueError, match="no section to train on"):
        split_validation(libs, ["A", "B", "C"])
    one = np.array(["A"] * 20)
    with pytest.raises(ValueError, match="at least two sections"):
        split_validation(one, "section")
    tr, va, desc = split_validation(one, "random", train_size=0.75, seed=1)
    assert len(va) == 5 and desc["leaky"] and desc["kind"] == "random"
    assert not set(tr) & set(va)


def test_paper_recipe_reads_back_as_the_paper(split):
    train, _ = split
    setup(train)
    model = NH2ST(train, recipe="paper", encoder_weights="random", n_genes=40)
    kw = model.module_kwargs
    assert kw["image_size"] == 224 and kw["trunk"] == "finetune" and kw["neighbor_trunk_grad"] is True
    assert kw["latent_dim"] == 512 and kw["n_neighbors"] == 8 and kw["n_hgnn_layers"] == 2
    assert kw["hyperedge_degree"] == 4 and kw["temperature"] == 0.05
    assert (kw["lambda_query"], kw["lambda_neighbor"]) == (1.0, 0.5)
    assert kw["standardize_targets"] is False and kw["cross_residual"] is False and kw["dropout"] == 0.0
    cfg = model.resolve_train_settings()
    assert cfg.optimizer == "adam" and cfg.lr == 1e-4 and cfg.weight_decay == 0.0
    assert cfg.schedule == "step" and (cfg.lr_step_size, cfg.lr_gamma) == (50, 0.9)
    assert cfg.batch_size == 8 and cfg.max_epochs == 20 and cfg.augment == "dihedral"
    assert cfg.validation is None and model.tta_ is False
    assert "recipe 'paper'" in model.summary_string
    # the optimiser Lightning really runs (one short epoch on a small network; same recipe otherwise)
    small = NH2ST(train, recipe="paper", encoder_weights="random", n_genes=40, image_size=32, latent_dim=64, n_heads=4)
    small.train(max_epochs=1, progress=False)
    opt = small.trainer.optimizers[0]
    assert type(opt) is torch.optim.Adam
    assert opt.defaults["lr"] == 1e-4 and opt.defaults["weight_decay"] == 0.0
    sched = small.trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR) and (sched.step_size, sched.gamma) == (50, 0.9)


def test_recipe_defaults_and_overrides(split):
    train, _ = split
    setup(train)
    model = NH2ST(train, **SMALL)
    assert model.recipe_.name == "default" and model.module_kwargs["image_size"] == 32  # override
    assert model.network_settings == RECIPES["default"].network.replace(image_size=32, latent_dim=64, n_heads=4)
    cfg = model.resolve_train_settings(lr=3e-4)
    assert cfg == dataclasses.replace(RECIPES["default"].training, lr=3e-4)
    with pytest.raises(TypeError, match="unknown keyword"):
        NH2ST(train, **SMALL, max_epochs=3)
    with pytest.raises(ValueError, match="recipe"):
        NH2ST(train, recipe="fast", **SMALL)
    with pytest.raises(TypeError, match="Unknown training settings"):
        model.resolve_train_settings(epochs=3)


def test_train_takes_the_epochs_first_and_a_none_clears_the_recipes_validation(split):
    """scvi-tools' ``model.train(max_epochs)``; every setting left out keeps the recipe's value, and one given
    is used as it is, so ``validation=None`` drops a recipe's validation section."""
    train, _ = split
    setup(train)
    base = RECIPES["default"]
    recipe = base.replace(name="held-out section", training=base.training.replace(validation="section"))
    model = NH2ST(train, recipe=recipe, **SMALL)
    assert model.resolve_train_settings().validation == "section"
    model.train(3, progress=False, validation=None)
    assert model.train_settings_["max_epochs"] == 3 and model.train_settings_["validation"] is None
    assert len(model.history["train_loss"]) == 3 and "validation_loss" not in model.history
    assert model.validation_ is None
    assert model.train_settings_["lr"] == base.training.lr  # left out: the recipe's
    with pytest.raises(ValueError, match="max_epochs must be a number of epochs"):
        model.train("3")
    with pytest.raises(ValueError, match="lr=None: this training setting needs a value"):
        model.train(1, lr=None)
