"""Saved models: the committed fixture keeps loading, saves are atomic, formats are checked."""

import lzma
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from st_predict import NH2ST
from st_predict.model import SAVE_FORMAT
from st_predict.pp import PatchGeometry
from st_predict.train import RECIPES

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "nh2st_format1"


def _fixture_model_dir(tmp_path) -> Path:
    out = tmp_path / "fixture_model"
    out.mkdir()
    (out / "model.pt").write_bytes(lzma.decompress((FIXTURE / "model.pt.xz").read_bytes()))
    return out


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def test_the_committed_format1_model_loads_and_predicts_as_it_did():
    import tempfile

    from fixtures.make_saved_model import fixture_sections

    expected = np.load(FIXTURE / "expected.npz")
    with tempfile.TemporaryDirectory() as tmp:
        model = NH2ST.load(_fixture_model_dir(Path(tmp)), accelerator="cpu")
    assert model.save_format_ == 1 and model.st_predict_version_
    assert list(model.genes_) == list(expected["genes"])
    assert model.patch_size_um_ == 16.0
    # format 1 recorded only the micrometres: the geometry and the recipe are migrated on load; it predicted from
    # the patch alone, and still does (the default context changed since)
    assert model.patch_geometry_ == PatchGeometry(16.0, 32.0) and model.recipe_.name == "default"
    assert model.recipe_.network == RECIPES["default"].network.replace(context="patch")
    assert model.network_settings.context == "patch" and "context 'patch'" in model.description
    assert model.network_settings.latent_dim == 32 and model.network_settings.image_size == 32
    adata = fixture_sections()
    pred = model.get_predicted_expression(adata, tta=False)
    assert list(pred.index) == list(expected["obs_names"])
    assert pred.to_numpy().std(0).min() > 1e-3  # the spots differ: the trunk was loaded, not skipped
    np.testing.assert_allclose(pred.to_numpy(), expected["prediction"], rtol=0, atol=1e-5)


def test_a_newer_save_format_is_refused_naming_both_versions(tmp_path):
    src = _fixture_model_dir(tmp_path)
    saved = torch.load(src / "model.pt", map_location="cpu", weights_only=False)
    saved["attr_dict"]["save_format_"] = SAVE_FORMAT + 98
    saved["attr_dict"]["st_predict_version_"] = "9.9.0"
    torch.save(saved, src / "model.pt")
    with pytest.raises(ValueError, match=rf"save format {SAVE_FORMAT + 98}, written by st_predict 9\.9\.0; this "
                       rf"release \(st_predict .*\) reads formats up to {SAVE_FORMAT}"):
        NH2ST.load(src)


def test_truncated_and_foreign_files_get_clear_errors(tmp_path):
    src = _fixture_model_dir(tmp_path)
    raw = (src / "model.pt").read_bytes()
    (src / "model.pt").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ValueError, match=r"model\.pt is not a readable saved model \(truncated or corrupted\?\)"):
        NH2ST.load(src)
    torch.save({"something": "else"}, src / "model.pt")
    with pytest.raises(ValueError, match="is not an st_predict saved model"):
        NH2ST.load(src)


def test_save_needs_overwrite_to_replace_and_leaves_no_staging(tmp_path):
    model = NH2ST.load(_fixture_model_dir(tmp_path))
    model.save(tmp_path / "a")
    with pytest.raises(ValueError, match="already exists and holds files; pass overwrite=True"):
        model.save(tmp_path / "a")
    model.save(tmp_path / "a", overwrite=True)
    assert sorted(os.listdir(tmp_path / "a")) == ["model.pt"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".a.saving-")]
    again = NH2ST.load(tmp_path / "a")
    assert again.save_format_ == SAVE_FORMAT
    for k, v in _weights(model).items():
        torch.testing.assert_close(_weights(again)[k], v)


_DIE_MID_SAVE = """
import io, os, signal, sys, warnings
warnings.filterwarnings("ignore")
import torch
from st_predict import NH2ST

model = NH2ST.load(sys.argv[1])
with torch.no_grad():
    for p in model.module.translator.parameters():
        p.add_(1.0)  # a different model, so that a half-written save would show
real_save = torch.save

def save_then_die(obj, f, *args, **kwargs):
    buf = io.BytesIO()
    real_save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    with open(f, "wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
        os.fsync(fh.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_then_die
model.save(sys.argv[2], overwrite=True)
"""


@pytest.mark.slow
def test_a_process_killed_mid_save_leaves_the_previous_model_loadable(tmp_path):
    src = _fixture_model_dir(tmp_path)
    before = _weights(NH2ST.load(src))
    for target in (src, tmp_path / "new_model"):  # over the saved model, and into a new folder
        proc = subprocess.run([sys.executable, "-c", _DIE_MID_SAVE, str(src), str(target)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    after = _weights(NH2ST.load(src))
    for k, v in before.items():
        torch.testing.assert_close(after[k], v)
    assert not (tmp_path / "new_model").exists()  # a killed first save leaves nothing under the name
    assert sorted(os.listdir(src)) == ["model.pt"]


def test_network_settings_pickled_before_the_context_load_as_patch():
    """Save format 2 pickled NetworkSettings without ``context``: those models predicted from the patch alone, and
    must not pick up today's default (``"neighbors"``)."""
    import pickle

    from st_predict.module import NetworkSettings

    old = NetworkSettings(latent_dim=32)
    object.__delattr__(old, "context")  # as a format-2 pickle has it
    again = pickle.loads(pickle.dumps(old))
    assert again.context == "patch" and again.latent_dim == 32
    assert NetworkSettings().context == "neighbors"
    assert pickle.loads(pickle.dumps(NetworkSettings(context="neighbors"))).context == "neighbors"
