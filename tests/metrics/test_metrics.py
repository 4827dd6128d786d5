import numpy as np
import pandas as pd
import pytest
from scipy import stats

from st_predict.metrics import evaluate, pcc_per_gene


def test_pcc_per_gene_matches_scipy_and_flags_constant_genes():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(40, 5))
    pred = truth + rng.normal(scale=0.7, size=(40, 5))
    truth[:, 3] = 2.0  # a gene that is constant in this section
    r = pcc_per_gene(pred, truth)
    for j in (0, 1, 2, 4):
        assert r[j] == pytest.approx(stats.pearsonr(pred[:, j], truth[:, j]).statistic, rel=1e-10)
    assert np.isnan(r[3])


def test_evaluate_counts_nan_genes_and_computes_errors():
    truth = pd.DataFrame([[1.0, 0.0, 2.0], [2.0, 0.0, 4.0], [3.0, 0.0, 5.0]])
    pred = np.array([[1.0, 1.0, 2.0], [2.0, 1.0, 3.0], [4.0, 1.0, 5.0]])
    m = evaluate(pred, truth)
    assert m["n_nan_genes"] == 1 and m["n_genes"] == 3 and m["n_spots"] == 3
    expected_pcc = np.mean([stats.pearsonr(pred[:, 0], truth[0]).statistic, stats.pearsonr(pred[:, 2], truth[2]).statistic])
    assert m["pcc"] == pytest.approx(expected_pcc)
    diff = pred - truth.to_numpy()
    assert m["mse"] == pytest.approx((diff**2).mean()) and m["mae"] == pytest.approx(np.abs(diff).mean())
    with pytest.raises(ValueError, match="differ in shape"):
        evaluate(pred[:, :2], truth)


def test_top_k_pcc_is_the_mean_of_the_k_best_genes_by_scipy():
    from st_predict.metrics import top_k_pcc

    rng = np.random.default_rng(1)
    truth = rng.normal(size=(30, 8))
    noise = np.linspace(0.1, 3.0, 8)  # gene j gets noisier with j
    pred = truth + rng.normal(size=(30, 8)) * noise
    truth[:, 5] = 1.0  # NaN gene: never among the best
    ref = np.array([stats.pearsonr(pred[:, j], truth[:, j]).statistic for j in range(8) if j != 5])
    best3 = np.sort(ref)[::-1][:3].mean()
    assert top_k_pcc(pred, truth, k=3) == pytest.approx(best3)
    assert top_k_pcc(pred, truth, k=50) == pytest.approx(ref.mean())  # fewer genes than k: all valid ones
    m = evaluate(pred, truth, top_k=3)
    assert m["pcc_top50"] == pytest.approx(best3) and m["pcc_top50"] > m["pcc"]
    with pytest.raises(ValueError, match="k must be"):
        top_k_pcc(pred, truth, k=0)


def test_pooled_pcc_concatenates_sections_on_shared_genes_and_can_exceed_per_section_pcc():
    from st_predict.metrics import pooled_pcc

    rng = np.random.default_rng(2)
    # two sections whose levels differ a lot; within each section the prediction is pure noise
    t1 = pd.DataFrame(rng.normal(0, 1, (50, 3)), columns=["a", "b", "c"])
    t2 = pd.DataFrame(rng.normal(5, 1, (40, 3)), columns=["a", "b", "c"])
    p1 = pd.DataFrame(rng.normal(0, 1, (50, 4)), columns=["a", "b", "c", "x"])
    p2 = pd.DataFrame(rng.normal(5, 1, (40, 3)), columns=["c", "b", "a"])  # other column order
    pooled = pooled_pcc([p1, p2], [t1, t2])
    ref = np.mean([
        stats.pearsonr(np.r_[p1[g], p2[g]], np.r_[t1[g], t2[g]]).statistic for g in ("a", "b", "c")
    ])
    assert pooled == pytest.approx(ref)
    per_section = np.mean([evaluate(p1[["a", "b", "c"]], t1)["pcc"], evaluate(p2[["a", "b", "c"]], t2)["pcc"]])
    assert pooled > 0.8 and abs(per_section) < 0.3  # the between-section shift alone makes pooled PCC high
    with pytest.raises(ValueError, match="one truth per prediction"):
        pooled_pcc([p1], [t1, t2])
    with pytest.raises(ValueError, match="No gene is shared"):
        pooled_pcc([p1[["x"]]], [t1])
    with pytest.raises(ValueError, match="Section 1"):
        pooled_pcc([p1, p2.iloc[:10]], [t1, t2])


def test_interval_scores_sets_sharpness_beside_coverage():
    """Intervals as wide as each gene's spread cover like sharp ones: the width ratio against the marginal
    interval and the CRPS tell them apart."""
    from st_predict.metrics import interval_scores, marginal_width

    rng = np.random.default_rng(0)
    signal = rng.normal(size=(2000, 4)) * 2.0
    truth = signal + rng.normal(scale=0.5, size=signal.shape)
    sharp = interval_scores(signal - 0.82, signal + 0.82, truth, signal, 0.9)  # 1.645 x 0.5: the noise's 90 %
    lo, hi = np.quantile(truth, [0.05, 0.95], axis=0)
    blind = interval_scores(np.broadcast_to(lo, truth.shape), np.broadcast_to(hi, truth.shape), truth,
                            np.broadcast_to(truth.mean(0), truth.shape), 0.9)
    assert abs(sharp["coverage"] - 0.9) < 0.02 and abs(blind["coverage"] - 0.9) < 0.02
    assert sharp["width_ratio_marginal"] < 0.3 and blind["width_ratio_marginal"] == pytest.approx(1.0, abs=0.02)
    assert sharp["crps"] < 0.5 * blind["crps"]
    np.testing.assert_allclose(marginal_width(truth, np.full(4, 0.9)), hi - lo, rtol=1e-9)
    with pytest.raises(ValueError, match="differ in shape"):
        interval_scores(lo, hi, truth)
