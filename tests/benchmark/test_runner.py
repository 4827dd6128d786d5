"""The leave-one-section-out runner on synthetic data (two folds)."""

import json

import numpy as np
import pytest

from st_predict.benchmark import (
    BLEEPRetrieval,
    MeanBaseline,
    NH2STMethod,
    RidgeProbe,
    SmallCNN,
    STNetRegressor,
    default_methods,
    run_benchmark,
)
from st_predict.pp import select_genes

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")


@pytest.mark.slow
def test_two_fold_run_writes_tables_and_ranks_sensibly(tissue, tmp_path):
    methods = {
        "per-gene mean": MeanBaseline,
        "ridge (PCA-256)": lambda: RidgeProbe(n_components=32),
        "ST-Net-style": lambda: STNetRegressor(epochs=10, lr=1e-3),
        "BLEEP-style": lambda: BLEEPRetrieval(epochs=10, k=20),
        "NH2ST": lambda: NH2STMethod(epochs=10, latent_dim=64, n_heads=4, image_size=32),
        "NH2ST query only": lambda: NH2STMethod(epochs=2, latent_dim=64, n_heads=4, use_neighbor_branch=False,
                                                image_size=32),
        "NH2ST frozen": lambda: NH2STMethod(epochs=10, latent_dim=64, n_heads=4, trunk="frozen"),
        "small CNN": lambda: SmallCNN(image_size=32, epochs=10),
    }
    res = run_benchmark(tissue, methods, folds=["S0", "S1"], n_genes=40, patch_size=32, image_size=32,
                        weights="random", out_dir=tmp_path)
    assert [r["held_out"] for r in res["rows"]] == ["S0"] * 8 + ["S1"] * 8
    summary = {r["method"]: r for r in res["summary"]}
    assert set(summary) == set(methods)
    assert np.isnan(summary["per-gene mean"]["pcc_mean"])  # a constant predictor has no PCC
    assert summary["per-gene mean"]["n_nan_genes"] == 80
    for name in ("ridge (PCA-256)", "NH2ST", "ST-Net-style", "BLEEP-style", "NH2ST frozen", "small CNN"):
        assert summary[name]["pcc_mean"] > 0.3, (name, summary[name])
        assert summary[name]["mse"] < 1.0, (name, summary[name])  # no blow-up on the test spots
    for name in ("ridge (PCA-256)", "NH2ST"):
        assert summary[name]["mse"] < summary["per-gene mean"]["mse"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["weights"].startswith("random") and saved["versions"]["st_predict"]
    md = (tmp_path / "results.md").read_text()
    assert "| NH2ST |" in md and "± " in md


def test_genes_come_from_training_sections_only(tissue, monkeypatch):
    seen = []
    original = MeanBaseline.fit

    def spy(self, fold):
        seen.append((fold.test_section, list(fold.genes), set(fold.train.obs["section"])))
        return original(self, fold)

    monkeypatch.setattr(MeanBaseline, "fit", spy)
    run_benchmark(tissue, {"mean": MeanBaseline}, folds=["S2"], n_genes=20, patch_size=32, image_size=32,
                  weights="random")
    (section, genes, train_sections), = seen
    assert section == "S2" and train_sections == {"S0", "S1"}
    train = tissue[tissue.obs["section"] != "S2"]
    assert genes == select_genes(train.X, train.var_names, train.obs["section"].astype(str), n_top=20)


def test_default_methods_cover_the_paper_ablations():
    names = set(default_methods())
    for needed in ("per-gene mean", "ridge (PCA-256)", "ST-Net-style (frozen trunk)", "BLEEP-style",
                   "small CNN (from scratch)", "ST-Net-style end to end", "NH2ST",
                   "NH2ST residual cross-attention (authors' code)",
                   "NH2ST query branch only", "NH2ST no contrastive loss", "NH2ST self-attention",
                   "NH2ST graph instead of hypergraph", "NH2ST K=4", "NH2ST L=1"):
        assert needed in names


def test_optimistic_metrics_are_reported_and_labelled(tissue, tmp_path):
    res = run_benchmark(tissue, {"ridge": lambda: RidgeProbe(n_components=16)}, folds=["S0", "S1"], n_genes=30,
                        patch_size=32, image_size=32, weights="random", out_dir=tmp_path)
    (row,) = res["summary"]
    per_fold = res["rows"]
    assert row["pcc_top50"] == pytest.approx(np.mean([r["pcc_top50"] for r in per_fold]))
    assert row["pcc_top50"] >= row["pcc_mean"]  # the best genes of each section: never below the mean
    assert -1 <= row["pcc_pooled"] <= 1
    assert "optimistic" in res["optimistic_metrics"].lower()
    md = (tmp_path / "results.md").read_text()
    assert "top-50 PCC (optimistic)" in md and "pooled PCC (optimistic)" in md


def test_hold_out_by_patient_groups_sections(tissue, monkeypatch):
    adata = tissue.copy()
    adata.obs["patient"] = adata.obs["section"].map({"S0": "P0", "S1": "P0", "S2": "P1"}).astype(str)
    seen = []
    original = MeanBaseline.fit

    def spy(self, fold):
        seen.append((fold.test_section, set(fold.train.obs["section"]), set(fold.test.obs["section"])))
        return original(self, fold)

    monkeypatch.setattr(MeanBaseline, "fit", spy)
    res = run_benchmark(adata, {"mean": MeanBaseline}, group_key="patient", n_genes=20, patch_size=32,
                        image_size=32, weights="random")
    assert seen == [("P0", {"S2"}, {"S0", "S1"}), ("P1", {"S0", "S1"}, {"S2"})]
    assert res["hold_out_key"] == "patient" and res["folds"] == ["P0", "P1"]


def test_runner_bad_input_names_the_key_or_fold(tissue):
    kw = {"n_genes": 20, "patch_size": 32, "image_size": 32, "weights": "random"}
    with pytest.raises(KeyError, match="'patient'"):
        run_benchmark(tissue, {"mean": MeanBaseline}, group_key="patient", **kw)
    with pytest.raises(ValueError, match="S9"):
        run_benchmark(tissue, {"mean": MeanBaseline}, folds=["S9"], **kw)
    adata = tissue.copy()
    adata.obs["patient"] = np.where(np.arange(adata.n_obs) % 2, "P0", "P1")
    with pytest.raises(ValueError, match="span several values"):
        run_benchmark(adata, {"mean": MeanBaseline}, group_key="patient", **kw)
    one = tissue[tissue.obs["section"] == "S0"].copy()
    with pytest.raises(ValueError, match="at least 2"):
        run_benchmark(one, {"mean": MeanBaseline}, **kw)


def test_nh2st_method_predicts_from_shared_features_as_from_images(tissue, monkeypatch):
    """The runner hands NH2STMethod the held-out spots' trunk features; they must give the same
    predictions as cropping and embedding the held-out patches again."""
    preds = {}
    original = NH2STMethod.predict

    def spy(self, fold):
        fast = original(self, fold)
        preds["fast"], preds["images"] = fast, self.model_.get_predicted_expression(fold.test).to_numpy()
        return fast

    monkeypatch.setattr(NH2STMethod, "predict", spy)
    run_benchmark(tissue, {"nh2st": lambda: NH2STMethod(epochs=1, latent_dim=64, n_heads=4)}, folds=["S1"],
                  n_genes=20, patch_size=32, image_size=32, weights="random")
    assert preds["fast"].shape == (100, 20)
    np.testing.assert_allclose(preds["fast"], preds["images"], rtol=1e-4, atol=1e-5)


def test_nh2st_selection_uses_only_training_sections(tissue, monkeypatch):
    seen = []
    original = NH2STMethod._fit

    def spy(self, fold):
        seen.append((set(fold.train.obs["section"]), set(fold.test.obs["section"]), self.train_kwargs.get("weight_decay")))
        return original(self, fold)

    monkeypatch.setattr(NH2STMethod, "_fit", spy)
    made = []
    factory = lambda: made.append(NH2STMethod(epochs=1, latent_dim=64, n_heads=4,  # noqa: E731
                                              select={"weight_decay": [0.0, 0.1]})) or made[-1]
    res = run_benchmark(tissue, {"nh2st": factory}, folds=["S2"], n_genes=20, patch_size=32, image_size=32,
                        weights="random")
    assert res["rows"][0]["selected"] == made[0].selected_  # recorded in the results
    # two candidates trained on S0 and validated on S1, then the refit on S0 + S1; S2 never seen
    assert seen[:2] == [({"S0"}, {"S1"}, 0.0), ({"S0"}, {"S1"}, 0.1)]
    assert seen[2][:2] == ({"S0", "S1"}, {"S2"})
    sel = made[0].selected_
    assert sel["validation_section"] == "S1" and sel["value"] in (0.0, 0.1)
    assert seen[2][2] == sel["value"]
    assert sel["value"] == max(sel["validation_pcc"], key=sel["validation_pcc"].get)
    with pytest.raises(ValueError, match="one setting"):
        NH2STMethod(select={"lr": [1e-3], "epochs": [5]})


def test_a_foundation_encoder_table_shares_features_and_cache(tissue, tmp_path, hf_cache, monkeypatch):
    """run_benchmark(encoder=...) embeds every spot once with that encoder; the probes and the frozen NH2ST
    rows read those features; a second run reads them from the feature cache and gives the same table."""

    import st_predict.benchmark._runner as runner
    from st_predict.benchmark import HESTProbe, frozen_methods

    calls = []
    real = runner.prepare_patches
    monkeypatch.setattr(runner, "prepare_patches", lambda x, *a: calls.append(len(x)) or real(x, *a))
    nh2st_seen = []
    real_fit = NH2STMethod._fit

    def spy(self, fold):
        real_fit(self, fold)
        nh2st_seen.append((self.model_.module.settings.encoder, fold.extra["fmaps_train"].shape[1]))

    monkeypatch.setattr(NH2STMethod, "_fit", spy)
    methods = {name: frozen_methods(epochs=2)[name] for name in ("per-gene mean", "HEST probe (PCA-256 + ridge)",
                                                                  "NH2ST frozen trunk")}
    kwargs = {"folds": ["S0"], "n_genes": 20, "patch_size": 32, "encoder": "hf-hub:testorg/tiny-vit",
              "feature_cache": tmp_path / "features"}
    first = run_benchmark(tissue, methods, **kwargs)
    assert sum(calls) == tissue.n_obs  # every spot embedded once, for all methods and folds
    assert first["encoder"] == "hf-hub:testorg/tiny-vit" and first["image_size"] == 32
    assert nh2st_seen == [("hf-hub:testorg/tiny-vit", 192)]  # NH2ST on the ViT-Ti's 192-d features
    summary = {r["method"]: r for r in first["summary"]}
    assert np.isfinite(summary["HEST probe (PCA-256 + ridge)"]["pcc_mean"])
    assert np.isfinite(summary["NH2ST frozen trunk"]["pcc_mean"])
    calls.clear()
    second = run_benchmark(tissue, methods, **kwargs)
    assert calls == []
    np.testing.assert_array_equal([r["pcc"] for r in second["rows"]], [r["pcc"] for r in first["rows"]])
    with pytest.raises(ValueError, match="frozen_methods"):
        run_benchmark(tissue, {"NH2ST": lambda: NH2STMethod(epochs=1)}, **kwargs)
    assert HESTProbe().n_components == 256


def test_hest_probe_recovers_a_linear_signal():
    """PCA-256 + ridge without intercept (HEST-Benchmark): genes that are linear in the features are
    predicted with PCC ~1 on new spots."""
    from types import SimpleNamespace

    from st_predict.benchmark import HESTProbe

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(400, 20))  # 300 features spanned by 20 factors, the genes linear in them
    feats = latent @ rng.normal(size=(20, 300)) + 0.05 * rng.normal(size=(400, 300))
    y = latent @ rng.normal(size=(20, 5)) + 3.0
    fold = SimpleNamespace(feats_train=feats[:300], y_train=y[:300], feats_test=feats[300:])
    probe = HESTProbe()
    probe.fit(fold)
    pred = probe.predict(fold)
    assert probe.reduce_[-1].n_components == 256 and probe.ridge_.fit_intercept is False
    pcc = [np.corrcoef(pred[:, j], y[300:, j])[0, 1] for j in range(5)]
    assert min(pcc) > 0.9


def test_reliability_columns_and_calibration_never_reads_the_held_out_section(tissue, monkeypatch, tmp_path):
    """A method trained with reliability=True gains the coverage, width, Spearman, CRPS and ensemble columns;
    the fold models and their calibration see the training sections only (a spy on every prediction they make
    while calibrating). Beside it, a pretrained predictor (Path2Space, random weights in an offline cache) zero-shot,
    calibrated and adapted on the same fold: the calibrated rows have the same reliability columns, calibrated on the
    training sections only, and the fold's genes outside its vocabulary are counted."""
    from pretrained_fixtures import offline_hub

    from st_predict import NH2ST, Pretrained
    from st_predict.benchmark import pretrained_methods

    read = []
    calibrating = []
    real_fit, real_predict = NH2ST._fit_reliability, NH2ST.get_predicted_expression

    def fit_spy(self, *args, **kwargs):
        calibrating.append(True)
        try:
            return real_fit(self, *args, **kwargs)
        finally:
            calibrating.pop()

    def predict_spy(self, adata=None, *args, **kwargs):
        if calibrating:
            read.append(set((self.adata if adata is None else adata).obs["section"]))
        return real_predict(self, adata, *args, **kwargs)

    monkeypatch.setattr(NH2ST, "_fit_reliability", fit_spy)
    monkeypatch.setattr(NH2ST, "get_predicted_expression", predict_spy)
    method = lambda: NH2STMethod(epochs=3, latent_dim=64, n_heads=4, image_size=32,  # noqa: E731
                                 train_kwargs={"reliability": True})
    calibrated_on = []
    real_calibrate = Pretrained.calibrate

    def calibrate_spy(self, adata, *args, **kwargs):
        calibrated_on.append(set(adata.obs["section"]))
        return real_calibrate(self, adata, *args, **kwargs)

    monkeypatch.setattr(Pretrained, "calibrate", calibrate_spy)
    adata = tissue.copy()
    for lib in adata.uns["spatial"]:  # Path2Space reads 100 um tiles: 32 px of these sections
        adata.uns["spatial"][lib].setdefault("metadata", {})["pixel_size_um"] = 100 / 32
    vocabulary = [f"G{i:03d}" for i in range(0, 60, 2)]  # every other gene
    with offline_hub(tmp_path, vocabulary):
        res = run_benchmark(adata, {"NH2ST reliability": method, **pretrained_methods(["path2space"])}, folds=["S2"],
                            n_genes=20, patch_size=32, image_size=32, weights="random", out_dir=tmp_path / "out")
    assert read == [{"S0", "S1"}, {"S0", "S1"}]  # two fold models, each predicting the training spots only
    assert calibrated_on == [{"S0", "S1"}, {"S0", "S1"}]  # calibrated and adapted on the training sections
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["NH2ST reliability", "path2space zero-shot", "path2space calibrated", "path2space adapted"]
    train = adata[adata.obs["section"] != "S2"]
    genes = select_genes(train.X, train.var_names, train.obs["section"].to_numpy(), n_top=20)
    outside = sum(g not in vocabulary for g in genes)
    assert 0 < outside < 20
    for name in ("path2space zero-shot", "path2space calibrated", "path2space adapted"):
        assert rows[name]["n_genes_not_output"] == outside and rows[name]["n_nan_genes"] >= outside
    assert "coverage_90" not in rows["path2space zero-shot"]  # nothing calibrated: no intervals
    for name in ("path2space calibrated", "path2space adapted"):
        r = rows[name]
        assert 0 < r["coverage_80"] <= r["coverage_90"] <= 1 and r["width_80"] < r["width_90"], r
        assert np.isfinite(r["spearman_reliability"]) and r["n_genes_scored"] == 20 - outside
    table = (tmp_path / "out" / "results.md").read_text()
    assert "90 % coverage" in table and "| path2space calibrated |" in table.split("90 % coverage")[1]
    assert "| NH2ST reliability |" in table.split("90 % coverage")[1]
    row = res["rows"][0]
    for key in ("coverage_80", "coverage_90", "coverage_mae_90", "width_90", "spearman_reliability", "pcc_ensemble",
                "crps_adaptive", "crps_constant_width"):
        assert np.isfinite(row[key]), key
    assert 0 < row["coverage_80"] <= row["coverage_90"] <= 1 and row["width_80"] < row["width_90"]
    assert row["pcc_single"] == pytest.approx(row["pcc"])
    assert [p["keep"] for p in row["risk_coverage"]] == [1.0, 0.9, 0.8, 0.7, 0.5]
    assert row["risk_coverage"][0]["mse"] == pytest.approx(row["mse"], rel=1e-5)
    assert res["summary"][0]["coverage_90"] == pytest.approx(row["coverage_90"])
