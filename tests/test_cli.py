"""The ``st-predict`` command line: every subcommand end to end on synthetic data, and bad input."""

import json

import anndata as ad
import numpy as np
import pytest
from helpers import SMALL_TRAIN, module_root

from st_predict.cli._main import build_parser, main

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")



@pytest.fixture(scope="module")
def trained(tmp_path_factory, cli_model):
    """This module's output folder, with the session's CLI-trained model (``model``) and its data."""
    return module_root(tmp_path_factory, cli_model, "trained")


def test_train_saves_model_history_and_curves(trained):
    root, _ = trained
    model_dir = root / "model"
    assert (model_dir / "model.pt").is_file()
    history = json.loads((model_dir / "history.json").read_text())
    assert len(history["train_loss"]) == 2 and {"train_mse", "train_nce_query", "train_nce_neighbor"} <= set(history)
    assert (model_dir / "training_curves.png").stat().st_size > 5_000


def test_predict_writes_obsm_and_small_images_then_evaluate(trained, capsys):
    from st_predict import NH2ST

    root, data = trained
    out = root / "pred.h5ad"
    assert main(["predict", str(root / "model"), str(data), "--out", str(out), "--quiet"]) == 0
    pred = ad.read_h5ad(out)
    original = ad.read_h5ad(data)
    assert pred.obsm["nh2st"].shape == (300, 30)
    np.testing.assert_array_equal(pred.X.toarray() if hasattr(pred.X, "toarray") else pred.X,
                                  original.X.toarray() if hasattr(original.X, "toarray") else original.X)
    # the same numbers as the Python API
    model = NH2ST.load(str(root / "model"))
    np.testing.assert_allclose(pred.obsm["nh2st"].to_numpy(), model.get_predicted_expression(original).to_numpy(),
                               rtol=1e-5, atol=1e-5)
    assert set(pred.uns["spatial"]) == {"S0", "S1", "S2"}
    assert "hires" in pred.uns["spatial"]["S2"]["images"]
    assert "tissue_hires_scalef" in pred.uns["spatial"]["S2"]["scalefactors"]
    # squidpy's defaults find the image (img_res_key="hires"): the output plots as written
    import matplotlib.pyplot as plt
    import squidpy as sq

    sq.pl.spatial_scatter(pred, color=str(pred.var_names[0]), library_key="section")
    fig = plt.gcf()
    assert len(fig.axes[0].get_images()) == 1  # the H&E under the spots
    plt.close("all")

    capsys.readouterr()
    assert main(["evaluate", str(out), "--out", str(root / "eval")]) == 0
    assert "Training sections of the model (adata.uns['st_predict']['nh2st']): S0, S1" in capsys.readouterr().out
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert [r["section"] for r in metrics["sections"]] == ["S0", "S1", "S2"]
    assert all(r["n_genes"] == 30 and r["n_spots"] == 100 for r in metrics["sections"])
    assert metrics["sections"][2]["pcc"] > 0.2  # held-out S2: the planted signal is learnable
    assert (root / "eval" / "pcc_distribution_S2.png").is_file()
    assert "| S2 |" in (root / "eval" / "metrics.md").read_text()


@pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")  # anndata's notice when writing the zarr
def test_predict_on_image_only_data_and_spatialdata(trained, tmp_path):
    from st_predict.data import synthetic_spatialdata, synthetic_tissue

    root, _ = trained
    image_only = synthetic_tissue(n_sections=1, n_rows=6, n_cols=6, n_genes=60, seed=3)[:, :0].copy()
    image_only.write_h5ad(tmp_path / "he_only.h5ad")
    assert main(["predict", str(root / "model"), str(tmp_path / "he_only.h5ad"), "--out", str(tmp_path / "p.h5ad"),
                 "--quiet"]) == 0
    assert ad.read_h5ad(tmp_path / "p.h5ad").obsm["nh2st"].shape == (36, 30)

    sdata = synthetic_spatialdata(n_sections=2, n_rows=5, n_cols=5, n_genes=60, seed=4)
    sdata.write(tmp_path / "s.zarr")
    assert main(["predict", str(root / "model"), str(tmp_path / "s.zarr"), "--out", str(tmp_path / "s.h5ad"),
                 "--quiet"]) == 0
    res = ad.read_h5ad(tmp_path / "s.h5ad")
    assert res.obsm["nh2st"].shape == (50, 30) and np.isfinite(res.obsm["nh2st"].to_numpy()).all()


def test_benchmark_command_writes_tables(trained, tmp_path, capsys):
    _, data = trained
    assert main(["benchmark", "--list-methods"]) == 0
    listed = capsys.readouterr().out
    assert "ridge (PCA-256)" in listed and "path2space calibrated  (pretrained; by name only)" in listed
    code = main(["benchmark", str(data), "--methods", "per-gene mean", "ridge (PCA-256)", "--folds", "S0", "S1",
                 "--n-genes", "20", "--patch-size", "32", "--image-size", "32", "--weights", "random",
                 "--out", str(tmp_path / "bench")])
    assert code == 0
    res = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert [r["method"] for r in res["summary"]] == ["per-gene mean", "ridge (PCA-256)"]
    assert res["folds"] == ["S0", "S1"]
    assert "| ridge (PCA-256) |" in (tmp_path / "bench" / "results.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "{tmp}/missing.h5ad", "--out", "{tmp}/m"], "does not exist"),
        (["train", "{data}", "--out", "{tmp}/m", "--genes", "NOT_A_GENE", *SMALL_TRAIN], "NOT_A_GENE"),
        (["train", "{data}", "--out", "{tmp}/m", "--sections", "S9", *SMALL_TRAIN], "S9"),
        (["predict", "{tmp}/no_model", "{data}", "--out", "{tmp}/p.h5ad"], "no saved model"),
        (["predict", "{model}", "{data}", "--out", "{tmp}/p.csv"], "must end in .h5ad"),
        (["evaluate", "{data}", "--out", "{tmp}/e"], "no predictions 'nh2st'"),
        (["evaluate", "{tmp}/nothing.h5ad", "--out", "{tmp}/e"], "is not a file"),
        (["benchmark", "{data}", "--methods", "magic", "--out", "{tmp}/b"], "unknown methods ['magic']"),
        (["benchmark", "{data}", "--pretrained-option", "stpath-model_path", "--out", "{tmp}/b"], "KEY:NAME=VALUE"),
        (["benchmark", "{data}", "--pretrained-option", "nope:model_path=x", "--out", "{tmp}/b"],
         "not a pretrained predictor"),
        (["predict-slides", "{tmp}/no_model", "{data}", "--out", "{tmp}/s"], "no saved model"),
        (["predict-slides", "{model}", "--out", "{tmp}/s"], "give the slides, or --manifest"),
        (["predict-slides", "{model}", "{tmp}/gone.svs", "--out", "{tmp}/s"], "gone.svs does not exist"),
        (["predict-slides", "{model}", "--manifest", "{tmp}/gone.csv", "--out", "{tmp}/s"], "gone.csv does not exist"),
        (["benchmark", "{data}", "--folds", "S7", "--out", "{tmp}/b", "--weights", "random"], "S7"),
        (["demo", "--no-fetch", "--epochs", "1", "--weights", "random", "--test-section", "Z9", "--out", "{tmp}/d"],
         "--test-section 'Z9'"),
    ],
)
def test_bad_input_gives_one_line_error_and_exit_code_2(trained, tmp_path, capsys, argv, message):
    root, data = trained
    subs = {"{tmp}": str(tmp_path), "{data}": str(data), "{model}": str(root / "model")}
    for old, new in subs.items():
        argv = [a.replace(old, new) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"st-predict {argv[0]}: error:") and message in err
    assert len(err.splitlines()) == 1


def test_every_option_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"train", "predict", "predict-slide", "predict-slides", "evaluate", "benchmark", "demo"}
    for name, p in sub.choices.items():
        assert p.description, name
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings or action.dest}"
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["train", "--help"])
    assert exit_info.value.code == 0


def test_train_recipe_and_section_validation(tmp_path):
    from st_predict import NH2ST
    from st_predict.data import synthetic_tissue

    data = tmp_path / "tissue.h5ad"
    synthetic_tissue(n_sections=3, n_rows=8, n_cols=8, n_genes=40).write_h5ad(data)
    small = [a for a in SMALL_TRAIN if a != "--quiet"]
    code = main(["train", str(data), "--out", str(tmp_path / "m"), "--validation", "S2", "--quiet", *small])
    assert code == 0
    model = NH2ST.load(str(tmp_path / "m"))
    assert model.validation_["sections"] == ["S2"] and not model.validation_["leaky"]
    assert model.best_epoch_ in (1, 2)
    history = json.loads((tmp_path / "m" / "history.json").read_text())
    assert len(history["validation_pcc"]) == 2
    code = main(["train", str(data), "--out", str(tmp_path / "p"), "--recipe", "paper", "--quiet", *small])
    assert code == 0
    paper = NH2ST.load(str(tmp_path / "p"))
    assert paper.recipe_.name == "paper" and paper.train_settings_["optimizer"] == "adam"
    assert paper.module_kwargs["image_size"] == 32  # --image-size overrides the recipe's 224
    # random-spot validation over several sections is refused (leaky), with a one-line error
    assert main(["train", str(data), "--out", str(tmp_path / "r"), "--validation", "random", "--quiet", *small]) == 2


_CLI = """
import os, signal, sys, warnings
warnings.filterwarnings("ignore")
from st_predict.cli._main import main
from st_predict.train import EpochCheckpoint

if sys.argv[1] == "killed":  # dies right after the checkpoint of the second epoch, as if pre-empted
    real = EpochCheckpoint.on_train_epoch_end

    def write_then_die(self, trainer, pl_module):
        real(self, trainer, pl_module)
        if trainer.current_epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    EpochCheckpoint.on_train_epoch_end = write_then_die
sys.exit(main(sys.argv[2:]))
"""


def _cli_run(mode, *argv):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", _CLI, mode, *argv], capture_output=True, text=True, timeout=600)


def _weights(folder):
    import torch

    saved = torch.load(folder / "model.pt", map_location="cpu", weights_only=False)["model_state_dict"]
    return {k: v for k, v in saved.items() if isinstance(v, torch.Tensor)}


@pytest.mark.slow
def test_train_resume_continues_an_interrupted_run_to_the_uninterrupted_weights(tmp_path, capsys):
    import torch

    from st_predict.data import synthetic_tissue

    data = tmp_path / "tissue.h5ad"
    synthetic_tissue(n_sections=2, n_rows=8, n_cols=8, n_genes=40).write_h5ad(data)
    small = [*SMALL_TRAIN, "--epochs", "4"]  # the last --epochs counts
    plain = _cli_run("plain", "train", str(data), "--out", str(tmp_path / "plain"), *small)
    assert plain.returncode == 0, plain.stderr[-3000:]
    argv = ["train", str(data), "--out", str(tmp_path / "m"), "--resume", *small]
    killed = _cli_run("killed", *argv)
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = torch.load(tmp_path / "m" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and not (tmp_path / "m" / "model.pt").exists()
    resumed = _cli_run("resumed", *argv)  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "m")
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    # without --resume a non-empty output folder is refused
    assert main(["train", str(data), "--out", str(tmp_path / "m"), *SMALL_TRAIN]) == 2
    assert "pass --overwrite (or --resume)" in capsys.readouterr().err


_PREDICT_DIES_WHILE_WRITING = """
import os, signal, sys, warnings
warnings.filterwarnings("ignore")
import anndata as ad
from st_predict.cli._main import main

real_write = ad.AnnData.write_h5ad

def write_then_die(self, filename, *args, **kwargs):
    real_write(self, filename, *args, **kwargs)
    with open(filename, "r+b") as f:  # a half-written file, as if the process died mid-write
        f.truncate(os.path.getsize(filename) // 2)
    os.kill(os.getpid(), signal.SIGKILL)

ad.AnnData.write_h5ad = write_then_die
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_commands_never_overwrite_or_leave_half_outputs(trained, tmp_path, capsys):
    import subprocess
    import sys

    root, data = trained
    out = tmp_path / "pred.h5ad"
    predict = ["predict", str(root / "model"), str(data), "--out", str(out), "--quiet"]
    assert main(predict) == 0
    before = out.read_bytes()
    # an existing output needs --overwrite, for every command that writes one
    for argv in (predict, ["evaluate", str(out), "--out", str(tmp_path / "eval")]):
        if argv[0] == "evaluate":
            assert main(argv) == 0
            capsys.readouterr()
        assert main(argv) == 2
        assert "--overwrite" in capsys.readouterr().err
    # a predict killed while writing leaves the old file, whole (its hidden staging file may remain)
    proc = subprocess.run([sys.executable, "-c", _PREDICT_DIES_WHILE_WRITING, *predict, "--overwrite"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert out.read_bytes() == before
    ad.read_h5ad(out)
    # a run that fails leaves nothing: evaluate with a key that is not there
    assert main(["evaluate", str(out), "--out", str(tmp_path / "eval2"), "--key", "nope"]) == 2
    assert not (tmp_path / "eval2").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and not p.name.startswith(".pred.h5ad")]
    assert not leftovers, leftovers


def test_bugs_show_their_traceback_and_bad_input_one_line(trained, tmp_path, monkeypatch, capsys):
    """Issue 15: an error inside a command that is not about the input (here injected into the output
    step of predict, after the model ran) prints its traceback and exits 1, even a ValueError from a
    dependency; bad input prints one line and exits 2; --debug adds the traceback to bad input."""
    import st_predict.data

    root, data = trained
    predict = ["predict", str(root / "model"), str(data), "--out", str(tmp_path / "p.h5ad"), "--quiet"]
    for error in (RuntimeError("injected bug"), ValueError("a dependency's own check")):
        def broken(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(st_predict.data, "downsample_images", broken)
        assert main(predict) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and f"{type(error).__name__}: {error}" in err
        assert "internal error" in err
        assert not (tmp_path / "p.h5ad").exists()  # nothing half-written
    missing = ["predict", str(root / "model"), str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "q.h5ad")]
    assert main(missing) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"st-predict predict: error: input {str(tmp_path / 'missing.h5ad')!r} does not exist"]
    for argv in (["--debug", *missing], [*missing, "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "MissingFileError" in err
        assert err.strip().splitlines()[-1].startswith("st-predict predict: error: input")


def test_old_option_names_still_work_and_say_what_replaced_them(trained, tmp_path, capsys):
    root, data = trained
    out = tmp_path / "pred.h5ad"
    assert main(["predict", str(root / "model"), str(data), "--out", str(out), "--quiet"]) == 0
    assert main(["evaluate", str(out), "--out", str(tmp_path / "e"), "--section-key", "section"]) == 0
    assert "--section-key is deprecated" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert [r["section"] for r in metrics["sections"]] == ["S0", "S1", "S2"]  # the column was used
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    from st_predict import __version__

    assert __version__ in capsys.readouterr().out


def test_every_command_shares_the_defaults():
    """The same option has the same default in every command that has it (from one place)."""
    from st_predict._utils._constants import PREDICT_BATCH_SIZE

    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    defaults: dict[str, set] = {}
    for p in sub.choices.values():
        for action in p._actions:
            if action.option_strings and action.dest not in ("help", "func"):
                defaults.setdefault(action.option_strings[0], set()).add(repr(action.default))
    shared = {flag: d for flag, d in defaults.items() if len(d) > 1 and flag != "--batch-size" and flag != "--out"}
    assert not shared, shared
    assert sub.choices["predict"].get_default("batch_size") == sub.choices["predict-slide"].get_default("batch_size")
    assert sub.choices["predict"].get_default("batch_size") == PREDICT_BATCH_SIZE


def test_train_reads_a_her2st_folder_lazily(tmp_path, monkeypatch):
    """`st-predict train` on a HER2ST folder decodes each JPEG only to crop its patches."""
    import dask.array as da
    import pandas as pd
    from PIL import Image

    import st_predict.data._her2st as her2st
    from st_predict.data import synthetic_tissue

    root = tmp_path / "her2st"
    for d in ("counts", "spots", "images"):
        (root / d).mkdir(parents=True)
    tissue = synthetic_tissue(n_sections=2, n_rows=8, n_cols=8, n_genes=40)
    for sec in ("S0", "S1"):
        t = tissue[tissue.obs["section"] == sec]
        Image.fromarray(tissue.uns["spatial"][sec]["images"]["hires"]).save(root / "images" / f"{sec}_HE.jpg")
        xy = t.obsm["spatial"]
        ids = [f"{int(x // 32)}x{int(y // 32)}" for x, y in xy]
        pd.DataFrame(t.X.toarray() if hasattr(t.X, "toarray") else t.X, index=ids, columns=t.var_names).to_csv(
            root / "counts" / f"{sec}.tsv.gz", sep="\t")
        pd.DataFrame({"x": xy[:, 0] // 32, "y": xy[:, 1] // 32, "pixel_x": xy[:, 0], "pixel_y": xy[:, 1]}).to_csv(
            root / "spots" / f"{sec}_selection.tsv", sep="\t", index=False)
    images = []
    real = her2st.read_her2st

    def spy(*args, **kwargs):
        adata = real(*args, **kwargs)
        images.extend(e["images"]["hires"] for e in adata.uns["spatial"].values())
        return adata

    monkeypatch.setattr(her2st, "read_her2st", spy)
    assert main(["train", str(root), "--out", str(tmp_path / "model"), *SMALL_TRAIN]) == 0
    assert len(images) == 2 and all(isinstance(img, da.Array) for img in images)
    assert (tmp_path / "model" / "model.pt").is_file()


def test_errors_name_the_commands_options_not_python_keywords(cli_model, tmp_path, capsys):
    pytest.importorskip("lazyslide")
    from helpers import slide_tissue
    from PIL import Image

    model_dir, _ = cli_model
    Image.fromarray(slide_tissue(256)).save(tmp_path / "slide.jpg")
    out = ["--out", str(tmp_path / "o.zarr")]
    assert main(["predict-slide", str(model_dir), str(tmp_path / "slide.jpg"), *out]) == 2
    assert "pass --tile-size-um (the side of its training patches" in capsys.readouterr().err  # no pixel size known
    assert main(["predict-slide", str(model_dir), str(tmp_path / "slide.jpg"), "--tile-size-um", "32", *out]) == 2
    err = capsys.readouterr().err
    assert "records no micrometres per pixel; pass --mpp (e.g. --mpp 0.25" in err and "mpp=" not in err
    assert not (tmp_path / "o.zarr").exists()


def test_predict_never_writes_over_its_input_and_outputs_follow_the_umask(trained, tmp_path, capsys):
    import os
    import shutil
    import stat

    root, data = trained
    copy = tmp_path / "in.h5ad"
    shutil.copy(data, copy)
    before = copy.read_bytes()
    assert main(["predict", str(root / "model"), str(copy), "--out", str(copy), "--overwrite", "--quiet"]) == 2
    assert "is the input: the output holds downsampled copies of its images" in capsys.readouterr().err
    assert copy.read_bytes() == before
    old = os.umask(0o022)
    try:
        out = tmp_path / "pred.h5ad"
        assert main(["predict", str(root / "model"), str(copy), "--out", str(out), "--quiet"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # not mkstemp's 0600: colleagues can read it
