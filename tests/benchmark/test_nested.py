"""The fully nested selection: candidates scored on leave-one-section-out splits of each fold's training sections."""

import numpy as np
import pytest

from st_predict import InputError
from st_predict.benchmark import NH2STMethod, nested_selection, run_benchmark, to_markdown

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")


def _row(method, fold, pcc, inner=None):
    row = {"method": method, "held_out": fold, "pcc": pcc, "mse": 1 - pcc, "mae": 0.5, "n_nan_genes": 0,
           "seconds": 10.0, "cpu_seconds": 20.0, "sees_context": method == "b", "pcc_top50": pcc + 0.1}
    if inner is not None:
        row["inner"] = {"sections": ["x", "y"], "pcc": [inner, inner], "mean": inner}
    return row


def test_each_fold_takes_the_candidate_its_inner_splits_chose_not_the_best_on_its_test_section():
    # fold F1: b is better inside (0.30 > 0.20) but worse on the held-out section (0.1 < 0.9): b is taken
    # fold F2: a wins inside; F3: a tie to 3 decimals goes to the first candidate, a
    rows = [_row("a", "F1", 0.9, 0.20), _row("b", "F1", 0.1, 0.30),
            _row("a", "F2", 0.4, 0.25), _row("b", "F2", 0.5, 0.24),
            _row("a", "F3", 0.3, 0.2501), _row("b", "F3", 0.6, 0.2504)]
    result = {"folds": ["F1", "F2", "F3"], "rows": rows, "summary": [], "n_genes": 3, "weights": "random"}
    nested_selection(result, ["a", "b"], "chosen")
    info = result["nested"]["chosen"]
    assert info["choices"] == {"F1": "b", "F2": "a", "F3": "a"}
    assert info["default"] == "a"
    row = {r["held_out"]: r for r in result["rows"] if r["method"] == "chosen"}
    assert [row[f]["pcc"] for f in ("F1", "F2", "F3")] == [0.1, 0.4, 0.3]
    assert row["F1"]["seconds"] == 20.0  # both candidates ran
    (summary,) = result["summary"]
    assert summary["pcc_mean"] == pytest.approx(np.mean([0.1, 0.4, 0.3]))
    md = to_markdown(result)
    assert "| F1 | 0.200 | 0.300 | b | 0.100 |" in md and "Chosen on most folds (the default it gives): a." in md


def test_nested_selection_refuses_candidates_without_inner_scores():
    result = {"folds": ["F1"], "rows": [_row("a", "F1", 0.5), _row("b", "F1", 0.4, 0.2)], "summary": []}
    with pytest.raises(InputError, match="inner scores"):
        nested_selection(result, ["a", "b"], "chosen")
    with pytest.raises(InputError, match=r"\['c'\] are not methods"):
        nested_selection(result, ["a", "c"], "chosen")


def test_inner_loso_scores_every_training_section_and_never_reads_the_held_out_one(tissue, monkeypatch):
    seen = []
    original = NH2STMethod._fit

    def spy(self, fold):
        seen.append((fold.test_section, sorted(set(fold.train.obs["section"]))))
        return original(self, fold)

    monkeypatch.setattr(NH2STMethod, "_fit", spy)
    method = {"m": lambda: NH2STMethod(epochs=1, latent_dim=32, n_heads=2, image_size=32, inner_loso=True)}
    res = run_benchmark(tissue, method, folds=["S2"], n_genes=20, patch_size=32, image_size=32, weights="random")
    # two inner splits of S0 + S1, then the fit on both; S2 is never a training or validation section
    assert seen == [("S0", ["S1"]), ("S1", ["S0"]), ("S2", ["S0", "S1"])]
    (row,) = res["rows"]
    assert row["inner"]["sections"] == ["S0", "S1"] and len(row["inner"]["pcc"]) == 2
    assert row["inner"]["mean"] == pytest.approx(np.mean(row["inner"]["pcc"]))
    assert row["cpu_seconds"] > 0 and row["sees_context"] is True  # the default context: the 8 nearest spots
