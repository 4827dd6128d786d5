"""A newcomer's first hour: honest scoring from the command line and in Python, strict JSON, readable
help, one-line errors for corrupt files, quiet logs."""

import json
import logging
import warnings

import numpy as np
import pytest
from helpers import SMALL_TRAIN, module_root

from st_predict.cli._main import build_parser, main

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")



def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def run(tmp_path_factory, cli_model):
    """This module's output folder, with the session's CLI-trained model (``model``) and its data."""
    return module_root(tmp_path_factory, cli_model, "run")


def test_evaluate_marks_training_sections_and_keeps_them_out_of_the_headline(run, capsys):
    root, data = run
    assert main(["predict", str(root / "model"), str(data), "--out", str(root / "all.h5ad"), "--quiet"]) == 0
    assert main(["evaluate", str(root / "all.h5ad"), "--out", str(root / "eval")]) == 0
    printed = capsys.readouterr().out
    metrics = _strict_json((root / "eval" / "metrics.json").read_text())
    rows = {r["section"]: r for r in metrics["sections"]}
    assert metrics["training_sections"] == ["S0", "S1"]
    assert [rows[s]["trained_on"] for s in ("S0", "S1", "S2")] == [True, True, False]
    assert metrics["pcc_mean_over_sections"] == pytest.approx(rows["S2"]["pcc"])  # the held-out section only
    assert metrics["pcc_mean_over_training_sections_optimistic"] == pytest.approx(
        np.mean([rows["S0"]["pcc"], rows["S1"]["pcc"]]))
    assert "| S0 | yes |" in printed and "| S2 | no |" in printed
    assert f"Mean PCC over held-out sections: {rows['S2']['pcc']:.3f}" in printed


def test_predict_sections_and_a_headline_with_no_held_out_section_is_null(run, capsys):
    root, data = run
    out = root / "s01.h5ad"
    assert main(["predict", str(root / "model"), str(data), "--sections", "S0", "S1", "--out", str(out), "--quiet"]) == 0
    import anndata as ad

    pred = ad.read_h5ad(out)
    assert sorted(pred.obs["section"].unique()) == ["S0", "S1"] and set(pred.uns["spatial"]) == {"S0", "S1"}
    assert main(["evaluate", str(out), "--out", str(root / "eval01")]) == 0
    text = (root / "eval01" / "metrics.json").read_text()
    metrics = _strict_json(text)  # no bare NaN
    assert metrics["pcc_mean_over_sections"] is None
    assert "n/a (every section was a training section)" in capsys.readouterr().out


def test_evaluate_takes_an_anndata_and_normalises_the_truth_itself(run):
    import anndata as ad

    from st_predict import NH2ST
    from st_predict.metrics import evaluate
    from st_predict.pp import normalize_expression

    root, data = run
    adata = ad.read_h5ad(data)
    model = NH2ST.load(root / "model")
    model.predict(adata)
    assert adata.uns["st_predict"]["nh2st"]["training_sections"] == ["S0", "S1"]
    pred = adata.obsm["nh2st"]
    truth = normalize_expression(adata.X, adata.var_names.get_indexer(pred.columns))
    from st_predict import InputWarning

    with pytest.warns(InputWarning, match=r"training section\(s\) S0, S1: this score is not held out"):
        assert evaluate(adata, key="nh2st") == {**evaluate(pred, truth), "trained_on": True}
    held_out = adata[adata.obs["section"] == "S2"].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        assert evaluate(held_out, key="nh2st")["trained_on"] is False
    per_section = evaluate(adata, key="nh2st", library_key="section")
    assert list(per_section.index) == ["S0", "S1", "S2"] and list(per_section["trained_on"]) == [True, True, False]
    s2 = (adata.obs["section"] == "S2").to_numpy()
    assert per_section.loc["S2", "pcc"] == pytest.approx(evaluate(pred[s2], truth[s2])["pcc"])
    with pytest.raises(KeyError, match="no predictions 'other'"):
        evaluate(adata, key="other")
    with pytest.raises(TypeError, match="pass the measured expression"):
        evaluate(pred)


def test_help_gives_each_default_once_and_none_for_required_options():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "(default: None)" not in text, name
        for line in text.splitlines():
            assert line.count("(default:") <= 1, (name, line)
    import re

    train = sub.choices["train"].format_help()

    def option_help(flag):
        return " ".join(re.search(rf"\n  {flag}\s+(.*?)\n  -", train, re.S).group(1).split())

    assert option_help("--out OUT") == "folder for the saved model"  # required: no default shown
    assert option_help("--library-key LIBRARY_KEY").count("default:") == 1
    assert "(default: 250)" in option_help("--n-genes N_GENES")  # a real default is still shown


def test_corrupt_h5ad_and_model_files_get_one_line_errors(run, tmp_path, capsys):
    root, data = run
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(data.read_bytes()[:5000])
    assert main(["predict", str(root / "model"), str(bad), "--out", str(tmp_path / "p.h5ad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.h5ad is not a readable .h5ad file" in err
    import shutil

    shutil.copytree(root / "model", tmp_path / "model")
    raw = (tmp_path / "model" / "model.pt").read_bytes()
    (tmp_path / "model" / "model.pt").write_bytes(raw[: len(raw) // 2])
    assert main(["predict", str(tmp_path / "model"), str(data), "--out", str(tmp_path / "q.h5ad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.pt is not a readable saved model" in err


def test_loading_and_training_are_quiet_and_view_anndata_setup_works(run, caplog, capsys):
    from st_predict import NH2ST

    root, data = run
    with caplog.at_level(logging.INFO):
        model = NH2ST.load(root / "model")
    assert "already downloaded" not in caplog.text
    import anndata as ad
    from helpers import SMALL, setup

    adata = ad.read_h5ad(data)
    setup(adata)
    model = NH2ST(adata, **{**SMALL, "trunk": "frozen"})
    caplog.clear()
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        model.train(max_epochs=1, progress=False)
    messages = [str(w.message) for w in seen] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "eval mode" in m or "LeafSpec" in m or "litlogger" in m], messages
    capsys.readouterr()
    model.view_anndata_setup()  # scvi-tools' habit; needs rich.pretty
    assert "X" in capsys.readouterr().out  # the registry's summary table was printed


def test_cli_reference_is_written_from_the_parser():
    from st_predict.cli._main import cli_reference_markdown

    text = cli_reference_markdown()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    for name, p in sub.choices.items():
        assert f"## st-predict {name}" in text
        for action in p._actions:  # every option of every command is on the page
            for flag in action.option_strings:
                assert flag in text, (name, flag)


def test_argument_errors_come_before_the_heavy_imports(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from st_predict.cli._main import main; "
            "rc = main(['predict', 'no_model', 'missing.h5ad', '--out', 'x.h5ad']); "
            "rc2 = main(['train', 'missing.h5ad', '--out', 'm']); "
            "print(rc, rc2, 'scvi' in sys.modules, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.stdout.split() == ["2", "2", "False", "False"], proc.stdout + proc.stderr
    assert "no saved model at no_model" in proc.stderr and "input 'missing.h5ad' does not exist" in proc.stderr


def test_numeric_arguments_are_checked_before_the_heavy_imports(tmp_path):
    """Out-of-range numbers fail at parse time with exit code 2 and a one-line reason, with neither torch nor
    scvi-tools imported (the checks take a fraction of a second instead of the ~7 s of those imports)."""
    import subprocess
    import sys

    cases = {
        "train x.h5ad --out m --epochs 0": "--epochs: must be >= 1, got 0",
        "train x.h5ad --out m --batch-size 1": "--batch-size: must be >= 2, got 1",
        "train x.h5ad --out m --lr -1": "--lr: must be > 0, got -1",
        "train x.h5ad --out m --train-size 1.5": "--train-size: must be <= 1, got 1.5",
        "train x.h5ad --out m --patch-size-um nan": "--patch-size-um: 'nan' is not a finite number",
        "predict m x.h5ad --out p.h5ad --batch-size 0": "--batch-size: must be >= 1, got 0",
        "predict-slide m s.tif --out o.zarr --pitch-um -100": "--pitch-um: must be > 0, got -100",
        "predict-slide m s.tif --out o.zarr --mpp 0": "--mpp: must be > 0, got 0",
        "predict-slide m s.tif --out o.zarr --num-workers -1": "--num-workers: must be >= 0, got -1",
        "benchmark x.h5ad --n-genes 0": "--n-genes: must be >= 1, got 0",
        "demo --epochs 0": "--epochs: must be >= 1, got 0",
    }
    code = (
        "import sys, json\nfrom st_predict.cli._main import main\ncodes = []\n"
        f"for argv in {[c.split() for c in cases]!r}:\n"
        "    try:\n        codes.append(main(argv))\n    except SystemExit as e:\n        codes.append(e.code)\n"
        "print(json.dumps([codes, 'torch' in sys.modules, 'scvi' in sys.modules]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    import json

    codes, torch_loaded, scvi_loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert codes == [2] * len(cases), proc.stderr
    assert not torch_loaded and not scvi_loaded
    for message in cases.values():
        assert message in proc.stderr, (message, proc.stderr[-2000:])
    # each error is its one line with a pointer to the help, not the usage first
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == len(cases) and not any(line.startswith("usage:") for line in lines), lines
    assert all(line.endswith("--help)") for line in lines), lines


def test_training_into_a_log_file_prints_a_line_per_epoch_and_no_noise(run, tmp_path, capsys, caplog):
    """stdout and stderr are not terminals under pytest, as in ``st-predict train ... > log 2>&1``."""
    import re

    from torch import hub

    root, data = run
    args = ["train", str(data), "--out", str(tmp_path / "m"), "--sections", "S0", "S1",
            *[a for a in SMALL_TRAIN if a != "--quiet"]]
    args[args.index("--epochs") + 1] = "3"
    args[args.index("--weights") + 1] = "imagenet"  # offline here: the fallback must be said once, in one line
    hub_before = hub._hub_dir
    hub.set_dir(str(tmp_path / "hub"))  # an empty cache: the download is tried (and fails offline, or not)
    try:
        with caplog.at_level(logging.INFO), warnings.catch_warnings():
            warnings.simplefilter("default", UserWarning)  # shown as a user sees it, not raised as in the suite
            assert main(args) == 0
    finally:
        hub._hub_dir = hub_before
    printed = capsys.readouterr()
    text = printed.out + printed.err
    epochs = [line for line in printed.out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/3", "2/3", "3/3"], printed.out
    assert all(re.search(r"loss \d+\.\d{4} .*\(\d+\.\d s, \d+\.\d s in all\)$", line) for line in epochs), epochs
    noise = ["\x1b[", "Generating sequential column names", "Seed set to", "Training status", "GPU available",
             "TPU available", "Automatic Mixed Precision", "Downloading:", "_contextlib.py"]
    everything = text + caplog.text
    assert not [n for n in noise if n in everything], [n for n in noise if n in everything]
    weights_lines = [line for line in printed.err.splitlines() if "ImageNet" in line]
    assert len(weights_lines) <= 1 and all(line.startswith("st-predict train: UserWarning: ") for line in weights_lines)
    # --quiet: no epoch lines either
    args[args.index("--weights") + 1] = "random"
    assert main([*args[:args.index("--out") + 1], str(tmp_path / "q"), *args[args.index("--out") + 2:], "--quiet"]) == 0
    assert "epoch 1/3" not in capsys.readouterr().out


def test_reliability_from_the_command_line(run, tmp_path, capsys):
    import anndata as ad

    root, data = run
    args = ["train", str(data), "--out", str(tmp_path / "m"), "--sections", "S0", "S1", *SMALL_TRAIN, "--reliability"]
    assert main(args) == 0  # two sections: two fold models
    assert main(["predict", str(tmp_path / "m"), str(data), "--sections", "S2", "--out", str(tmp_path / "p.h5ad"),
                 "--quiet", "--interval-level", "0.8", "--interval-depth", "40"]) == 0
    printed = capsys.readouterr().out
    assert "80% intervals in obsm['nh2st_lower'] and obsm['nh2st_upper']" in printed and "most reliable:" in printed
    pred = ad.read_h5ad(tmp_path / "p.h5ad")
    assert {"nh2st_lower", "nh2st_upper"} <= set(pred.obsm)
    assert list(pred.uns["st_predict"]["nh2st"]["gene_reliability"].columns[:3]) == ["reliability", "ci_low", "ci_high"]
    assert main(["evaluate", str(tmp_path / "p.h5ad"), "--out", str(tmp_path / "e")]) == 0
    printed = capsys.readouterr().out
    metrics = _strict_json((tmp_path / "e" / "metrics.json").read_text())
    cov = metrics["intervals"]
    assert cov["level"] == 0.8 and 0 < cov["coverage_held_out"] <= 1 and set(cov["coverage_by_section"]) == {"S2"}
    assert pred.uns["st_predict"]["nh2st"]["interval_depth"] == 40
    # predicted for a measurement at 40 UMI; evaluate scores them at each spot's own (deeper) count: narrower
    written = (pred.obsm["nh2st_upper"] - pred.obsm["nh2st_lower"]).to_numpy().mean()
    assert cov["depth"] == "each spot's own UMI count" and cov["mean_width"] < 0.8 * written, (cov, written)
    assert cov["width_ratio_marginal"] > 0 and cov["crps"] > 0
    assert f"80% intervals for a measurement at each spot's own UMI count hold {cov['coverage_held_out']:.1%}" in printed


def test_predict_never_writes_over_the_coordinates_or_a_key_of_the_users(cli_model):
    import anndata as ad
    import numpy as np

    from st_predict import NH2ST, InputError

    model_dir, data = cli_model
    model = NH2ST.load(model_dir)
    adata = ad.read_h5ad(data)
    adata = adata[adata.obs["section"] == "S2"].copy()
    spatial = adata.obsm["spatial"].copy()
    with pytest.raises(InputError, match=r"key_added='spatial' would replace the spot coordinates"):
        model.predict(adata, key_added="spatial", tta=False)
    np.testing.assert_array_equal(adata.obsm["spatial"], spatial)
    adata.obsm["mine"] = np.zeros((adata.n_obs, 2))
    with pytest.raises(InputError, match=r"adata.obsm\['mine'\] already holds data .*overwrite=True"):
        model.predict(adata, key_added="mine", tta=False)
    assert (adata.obsm["mine"] == 0).all()
    model.predict(adata, key_added="mine", tta=False, overwrite=True)
    assert adata.obsm["mine"].shape == (adata.n_obs, len(model.genes_))
    with pytest.warns(UserWarning, match="not unique"):  # anndata's own notice
        twice = ad.concat([adata[:3], adata[:3]])
    with pytest.raises(InputError, match=r"adata.obs_names has 3 duplicates .*obs_names_make_unique"):
        model.predict(twice, tta=False)
    # a key an earlier predict wrote is replaced without asking
    first = model.predict(adata, tta=False)
    again = model.predict(adata, tta=False)
    np.testing.assert_allclose(again.to_numpy(), first.to_numpy(), rtol=1e-6)


def test_the_model_file_stands_for_its_folder_and_a_missing_gpu_is_one_line(run, capsys):
    import torch

    root, data = run
    out = root / "from_file.h5ad"
    assert main(["predict", str(root / "model" / "model.pt"), str(data), "--out", str(out), "--quiet"]) == 0
    assert out.is_file()
    if torch.cuda.is_available():
        return
    capsys.readouterr()
    code = main(["predict", str(root / "model"), str(data), "--out", str(root / "gpu.h5ad"), "--accelerator", "gpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "no CUDA device is visible to this process: use --accelerator 'cpu'" in err[0]
    assert not (root / "gpu.h5ad").exists()


def test_a_prediction_batch_of_zero_names_the_range(cli_model):
    from st_predict import NH2ST, InputError

    model = NH2ST.load(cli_model[0])
    for bad in (0, -3, 2.5):
        with pytest.raises(InputError, match=rf"batch_size must be an integer >= 1, got {bad}"):
            model.get_predicted_expression(model.adata, batch_size=bad)


def test_a_section_of_one_colour_warns_that_its_patches_hold_no_tissue(cli_model):
    import anndata as ad
    import numpy as np

    from st_predict import NH2ST, InputWarning

    model_dir, data = cli_model
    model = NH2ST.load(model_dir)
    adata = ad.read_h5ad(data)
    adata = adata[adata.obs["section"] == "S2"].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        model.predict(adata, tta=False)  # the synthetic tissue: no word
    img = adata.uns["spatial"]["S2"]["images"]["hires"]
    adata.uns["spatial"]["S2"]["images"]["hires"] = np.full_like(img, 180)
    with pytest.warns(InputWarning, match=r"Section 'S2': its patches hold no tissue \(the image is one colour"):
        model.predict(adata, tta=False)


def test_a_flag_named_in_an_error_reads_as_the_commands_option():
    from st_predict.cli._main import _in_option_words

    said = _in_option_words("if the spots are where you mean them, pass allow_off_tissue=True.", build_parser(), "predict")
    assert said == "if the spots are where you mean them, pass --allow-off-tissue."
    args = build_parser().parse_args(["predict", "m", "in.h5ad", "--out", "o.h5ad", "--allow-off-tissue"])
    assert args.allow_off_tissue is True
