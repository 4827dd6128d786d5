"""The demo command runs end to end on the synthetic tissue (offline) and fails cleanly on bad input."""

import json

import pytest

from st_predict.__main__ import main

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")


def test_demo_on_synthetic_tissue(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--no-fetch", "--epochs", "3", "--weights", "random", "--out", str(out)]) == 0
    def strict(constant):
        raise ValueError(f"metrics.json is not strict JSON: {constant}")

    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=strict)
    assert metrics["data"] == "synthetic" and metrics["test_section"] == "S0"
    assert metrics["training_sections"] == ["S1", "S2", "S3", "S4"]
    assert metrics["per_gene_mean"]["pcc"] is None  # a constant predictor has no PCC: null, not NaN
    assert metrics["nh2st"]["n_genes"] == 100 and metrics["nh2st"]["n_spots"] == 144
    assert metrics["nh2st"]["mse"] < metrics["per_gene_mean"]["mse"]
    assert (out / "predicted_vs_measured.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "Held-out section S0" in printed
    # into a file (not a terminal): one line per epoch, and the training time the README quotes
    assert [line.split()[1] for line in printed.splitlines() if line.startswith("epoch ")] == ["1/3", "2/3", "3/3"]
    assert f"Trained 3 epochs on 576 spots in {metrics['seconds_training_incl_embedding']:.1f} s" in printed


def test_demo_bad_section(tmp_path, capsys):
    code = main(["demo", "--no-fetch", "--epochs", "1", "--weights", "random", "--test-section", "Z9",
                 "--out", str(tmp_path)])
    assert code == 2
    assert "--test-section 'Z9' is not one of the sections" in capsys.readouterr().err
