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
