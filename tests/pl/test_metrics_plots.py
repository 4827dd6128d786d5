"""pcc_distribution and training_curves (Agg backend, set in conftest)."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import SMALL, setup
from scipy.stats import pearsonr

from st_predict import NH2ST
from st_predict.pl import pcc_distribution, training_curves


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def pcc_case():
    """10 genes over 60 spots whose PCC falls with the noise level, plus one gene constant in the
    predictions and one constant in the measurements; truth comes with rows and columns shuffled."""
    rng = np.random.default_rng(1)
    n_spots = 60
    spots = [f"spot{i}" for i in range(n_spots)]
    noise = [0.1, 3.0, 0.5, 8.0, 0.02, 1.0, 20.0, 0.3, 2.0, 5.0]
    genes = [f"G{i}" for i in range(len(noise))] + ["CONST_PRED", "CONST_TRUTH"]
    truth = rng.normal(size=(n_spots, len(genes)))
    pred = truth + rng.normal(size=truth.shape) * np.array(noise + [1.0, 1.0])
    pred[:, -2] = 0.5  # constant prediction
    truth[:, -1] = 0.0  # gene never detected
    pred = pd.DataFrame(pred, index=spots, columns=genes)
    truth = pd.DataFrame(truth, index=spots, columns=genes)
    expected = pd.Series({g: pearsonr(pred[g], truth[g])[0] for g in genes[:-2]})
    shuffled = truth.iloc[rng.permutation(n_spots), rng.permutation(len(genes))]
    return pred, shuffled, expected


def _texts(ax):
    return {t.get_gid(): t.get_text() for t in ax.texts}


def test_pcc_distribution_names_exactly_the_best_and_worst_genes(pcc_case, tmp_path):
    pred, truth, expected = pcc_case
    ax, labels = pcc_distribution(pred, truth, n_label=3, return_labels=True, save=str(tmp_path / "pcc.png"))
    best = list(expected.sort_values(ascending=False).index[:3])
    worst = list(expected.sort_values().index[:3])
    assert labels["best"] == best
    assert labels["worst"] == worst
    assert labels["nan"] == ["CONST_PRED", "CONST_TRUTH"]
    np.testing.assert_allclose(labels["pcc"][expected.index], expected, rtol=1e-10)
    assert labels["pcc"].index.tolist() == pred.columns.tolist()
    # the names (and their PCC) are written on the plot, best first / worst first
    texts = _texts(ax)
    assert texts["pcc_best"].splitlines() == ["best"] + [f"{g}  {expected[g]:.3f}" for g in best]
    assert texts["pcc_worst"].splitlines() == ["worst"] + [f"{g}  {expected[g]:.3f}" for g in worst]
    # markers sit at the labelled genes' PCC
    marks = {line.get_gid(): line.get_xdata() for line in ax.lines if line.get_gid()}
    np.testing.assert_allclose(marks["pcc_best"], expected[best])
    np.testing.assert_allclose(marks["pcc_worst"], expected[worst])
    # NaN genes are counted, not dropped silently
    assert "2 NaN" in ax.get_title() and "12 genes" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"mean {expected.mean():.3f}", f"median {expected.median():.3f}", "NaN PCC: 2 genes"]
    # the histogram holds the 10 defined PCCs; mean and median lines are at the right place
    assert sum(p.get_height() for p in ax.patches) == 10
    vlines = [line.get_xdata()[0] for line in ax.lines if not line.get_gid()]
    np.testing.assert_allclose(vlines, [expected.mean(), expected.median()])
    assert (tmp_path / "pcc.png").stat().st_size > 5_000


def test_pcc_distribution_returns_axes_and_draws_into_given_axes(pcc_case):
    pred, truth, _ = pcc_case
    fig, axes = plt.subplots(1, 2)
    out = pcc_distribution(pred, truth, ax=axes[1], title="section A")
    assert out is axes[1] and axes[1].get_title() == "section A"
    assert not axes[0].patches
    # a custom title still shows the NaN count in the legend
    assert "NaN PCC: 2 genes" in [t.get_text() for t in out.get_legend().get_texts()]


def test_pcc_distribution_label_lists_do_not_overlap_with_few_genes(pcc_case):
    pred, truth, expected = pcc_case
    few = ["G0", "G1", "G2", "CONST_PRED"]
    _, labels = pcc_distribution(pred[few], truth[few], n_label=2, return_labels=True)
    order = list(expected[few[:3]].sort_values(ascending=False).index)
    assert labels["best"] == order[:2] and labels["worst"] == order[2:]
    ax, labels = pcc_distribution(pred, truth, n_label=0, return_labels=True)
    assert labels["best"] == labels["worst"] == [] and not ax.texts


def test_pcc_distribution_misaligned_inputs_name_the_culprits(pcc_case):
    pred, truth, _ = pcc_case
    with pytest.raises(KeyError, match=r"genes of pred missing from truth: \['G3', 'G7'\]"):
        pcc_distribution(pred, truth.drop(columns=["G3", "G7"]))
    with pytest.raises(KeyError, match=r"genes of truth missing from pred: \['EXTRA'\]"):
        pcc_distribution(pred, truth.assign(EXTRA=1.0))
    with pytest.raises(KeyError, match=r"spots of pred missing from truth: \['spot5'\]"):
        pcc_distribution(pred, truth.drop(index="spot5"))
    renamed = truth.rename(index={"spot0": "other"})
    with pytest.raises(KeyError, match=r"'spot0'.*'other'"):
        pcc_distribution(pred, renamed)
    with pytest.raises(TypeError, match="DataFrame"):
        pcc_distribution(pred, truth.to_numpy())
    dup = pred.rename(columns={"G1": "G0"})
    with pytest.raises(ValueError, match=r"duplicated genes.*'G0'"):
        pcc_distribution(dup, truth)


def test_pcc_distribution_all_nan_raises(pcc_case):
    pred, truth, _ = pcc_case
    const = ["CONST_PRED", "CONST_TRUTH"]
    with pytest.raises(ValueError, match="No gene has a defined PCC"):
        pcc_distribution(pred[const], truth[const])


def test_pcc_distribution_reads_anndata_predictions(pcc_case):
    import anndata as ad

    pred, truth, expected = pcc_case
    adata = ad.AnnData(obs=pd.DataFrame(index=pred.index))
    adata.obsm["nh2st"] = pred
    _, labels = pcc_distribution(adata, truth, n_label=1, return_labels=True)
    assert labels["best"] == [expected.idxmax()] and labels["worst"] == [expected.idxmin()]
    with pytest.raises(KeyError, match="run model.predict"):
        pcc_distribution(adata, truth, key="other")


def _history(epochs=4, validation=True):
    rng = np.random.default_rng(0)
    idx = pd.Index(range(epochs), name="epoch")
    out = {}
    for prefix in ("train", "validation") if validation else ("train",):
        for term in ("loss", "mse", "nce_query"):
            key = f"{prefix}_{term}"
            out[key] = pd.DataFrame({key: rng.uniform(0.1, 3.0, epochs)}, index=idx)
    return out


def _lines(axes):
    return {line.get_label(): line for ax in axes for line in ax.get_lines()}


def test_training_curves_one_line_per_term_with_history_values(tmp_path):
    history = _history()
    ax = training_curves(history, save=str(tmp_path / "curves.png"))
    lines = _lines(ax)
    assert sorted(lines) == sorted(f"{t} ({p})" for t in ("loss", "mse", "nce_query") for p in ("train", "validation"))
    for term in ("loss", "mse", "nce_query"):
        train, val = lines[f"{term} (train)"], lines[f"{term} (validation)"]
        np.testing.assert_array_equal(train.get_ydata(), history[f"train_{term}"].iloc[:, 0].to_numpy())
        np.testing.assert_array_equal(val.get_ydata(), history[f"validation_{term}"].iloc[:, 0].to_numpy())
        np.testing.assert_array_equal(train.get_xdata(), [1, 2, 3, 4])  # epochs counted from 1, as the bar does
        assert train.get_linestyle() == "-" and val.get_linestyle() == "--"
        assert train.get_color() == val.get_color()
    assert len({lines[f"{t} (train)"].get_color() for t in ("loss", "mse", "nce_query")}) == 3
    assert all(a.get_yscale() == "linear" and a.get_xlabel() == "epoch" for a in ax)
    assert (tmp_path / "curves.png").stat().st_size > 5_000


def test_training_curves_put_terms_of_other_scales_on_panels_of_their_own():
    history = _history()
    history["train_mse"].iloc[:, 0] = [0.95, 0.93, 0.90, 0.88]  # MSE near 1, InfoNCE terms near 2-6
    history["validation_pcc"] = pd.DataFrame({"validation_pcc": [0.10, 0.15, 0.2, 0.22]}, index=history["train_mse"].index)
    axes = training_curves(history)
    assert [a.get_title() for a in axes] == ["losses", "MSE", "validation PCC"]
    assert [sorted(line.get_label() for line in a.get_lines()) for a in axes] == [
        ["loss (train)", "loss (validation)", "nce_query (train)", "nce_query (validation)"],
        ["mse (train)", "mse (validation)"], ["pcc (validation)"]]
    lo, hi = axes[2].get_ylim()
    assert lo > 0.05 and hi < 0.3  # the PCC panel is scaled to the PCC, not to the losses
    # one Axes given: every term on it; a list of the wrong length is refused
    import matplotlib.pyplot as plt

    fig, one = plt.subplots()
    assert training_curves(history, ax=one) == [one] and len(one.get_lines()) == 7
    with pytest.raises(ValueError, match="ax has 2 Axes but there are 3 panels"):
        training_curves(history, ax=[one, one])
    plt.close("all")


def test_training_curves_validation_only_when_logged():
    ax = training_curves(_history(validation=False))
    assert all(line.get_linestyle() == "-" for line in _lines(ax).values())
    assert sorted(_lines(ax)) == ["loss (train)", "mse (train)", "nce_query (train)"]


def test_training_curves_keys_log_and_errors():
    history = _history()
    ax = training_curves(history, keys=["mse", "train_loss"], log=True)
    assert sorted(_lines(ax)) == ["loss (train)", "loss (validation)", "mse (train)", "mse (validation)"]
    assert [a.get_yscale() for a in ax] == ["log", "log"]
    with pytest.raises(KeyError, match=r"\['bogus'\].*available: \['loss', 'mse', 'nce_query'\]"):
        training_curves(history, keys=["bogus"])
    history["validation_mse"].iloc[2, 0] = 0.0
    with pytest.raises(ValueError, match=r"\['validation_mse'\]"):
        training_curves(history, log=True)
    with pytest.raises(ValueError, match="no 'train_<term>'"):
        training_curves({"elbo": [1.0, 2.0]})
    # plain sequences are accepted too
    ax = training_curves({"train_loss": [3.0, 2.0, 1.5]})
    np.testing.assert_array_equal(ax[0].get_lines()[0].get_ydata(), [3.0, 2.0, 1.5])


@pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")
def test_training_curves_of_an_nh2st_model(tissue):
    adata = tissue[tissue.obs["section"] != "S2"].copy()
    torch.manual_seed(0)
    setup(adata)
    model = NH2ST(adata, **SMALL)
    with pytest.raises(ValueError, match=r"NH2ST.history is empty.*not trained.*'train_\*' loss terms"):
        training_curves(model)
    model.train(max_epochs=2, validation="section", progress=False)
    ax = training_curves(model)
    lines = _lines(ax)
    terms = ("loss", "mse", "nce_query", "nce_neighbor")
    assert sorted(lines) == sorted([f"{t} ({p})" for t in terms for p in ("train", "validation")] + ["pcc (validation)"])
    np.testing.assert_array_equal(lines["pcc (validation)"].get_ydata(), model.history["validation_pcc"].iloc[:, 0])
    for t in terms:
        for p in ("train", "validation"):
            np.testing.assert_array_equal(lines[f"{t} ({p})"].get_ydata(), model.history[f"{p}_{t}"].iloc[:, 0])
            np.testing.assert_array_equal(lines[f"{t} ({p})"].get_xdata(), [1, 2])  # epochs counted from 1
