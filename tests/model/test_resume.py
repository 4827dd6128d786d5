"""Checkpoints and resuming: a run killed with SIGKILL and resumed ends with the weights of an
uninterrupted run; best/last checkpoints; the command line's --resume."""

import logging
import signal
import subprocess
import sys

import pytest
import torch

from st_predict import NH2ST

# one training run in its own process: "plain" (no checkpoints), "killed" (checkpoints every epoch,
# SIGKILLs itself at the second batch of the third epoch) or "resumed" (continues from last.ckpt)
_RUN = """
import os, signal, sys, warnings
warnings.filterwarnings("ignore")
import lightning.pytorch as pl
import scvi
from st_predict import NH2ST
from st_predict.data import synthetic_tissue

mode, ckpt, out = sys.argv[1:4]
scvi.settings.seed = 0
adata = synthetic_tissue(n_sections=2, n_rows=8, n_cols=8, n_genes=40, seed=3)
NH2ST.setup_anndata(adata, library_key="section", patch_size=32)
model = NH2ST(adata, image_size=32, latent_dim=32, n_heads=2, n_genes=20, encoder_weights="random")


class Die(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 2 and batch_idx == 1:
            os.kill(os.getpid(), signal.SIGKILL)


class Steps(pl.Callback):
    # says which epochs and batches this process ran

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        print("STEP", trainer.current_epoch, batch_idx, flush=True)


kw = dict(max_epochs=4, batch_size=16, progress=False, accelerator="cpu", batches=sys.argv[4])
if mode == "plain":
    model.train(callbacks=[Steps()], **kw)
elif mode == "killed":
    model.train(checkpoint_dir=ckpt, callbacks=[Die(), Steps()], **kw)
else:
    model.train(checkpoint_dir=ckpt, resume=True, callbacks=[Steps()], **kw)
model.save(out, overwrite=True)
"""


def _run(mode, ckpt, out, batches):
    return subprocess.run([sys.executable, "-c", _RUN, mode, str(ckpt), str(out), batches],
                          capture_output=True, text=True, timeout=600)


def _steps(proc) -> list[tuple[int, int]]:
    return [tuple(map(int, line.split()[1:])) for line in proc.stdout.splitlines() if line.startswith("STEP ")]


def _state(path):
    saved = torch.load(path / "model.pt", map_location="cpu", weights_only=False)["model_state_dict"]
    return {k: v for k, v in saved.items() if isinstance(v, torch.Tensor)}


@pytest.mark.slow
def test_a_run_killed_mid_epoch_and_resumed_matches_an_uninterrupted_run(tmp_path, batches="mixed"):
    """The real thing, once: SIGKILL in a process of its own (no chance to clean up)."""
    plain = _run("plain", tmp_path / "unused", tmp_path / "plain", batches)
    assert plain.returncode == 0, plain.stderr[-3000:]
    killed = _run("killed", tmp_path / "ckpt", tmp_path / "killed", batches)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (tmp_path / "ckpt" / "last.ckpt").is_file() and not (tmp_path / "killed").exists()
    epoch = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"]
    assert epoch == 1  # the end of the second epoch: the kill came during the third
    resumed = _run("resumed", tmp_path / "ckpt", tmp_path / "resumed", batches)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # only the remaining epochs ran: the third and fourth, each whole (a rerun from scratch would pass the
    # weight comparison below as well, but not this)
    per_epoch = len(_steps(plain)) // 4
    assert {e for e, _ in _steps(plain)} == {0, 1, 2, 3} and per_epoch >= 2
    assert _steps(killed)[-1] == (2, 0)  # killed as the second batch of the third epoch began
    assert _steps(resumed) == [(e, b) for e in (2, 3) for b in range(per_epoch)]
    a, b = _state(tmp_path / "plain"), _state(tmp_path / "resumed")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


class _Stop(Exception):
    """The fault injected in process: an error at the second batch of the third epoch."""


def _train_in_process(mode: str, ckpt, batches: str) -> tuple[NH2ST, list[tuple[int, int]]]:
    """What ``_RUN`` does, in this process: the same data, seed and settings; ``"killed"`` raises :class:`_Stop`
    where ``_RUN`` SIGKILLs itself."""
    import lightning.pytorch as pl
    import scvi

    from st_predict.data import synthetic_tissue

    steps = []

    class Steps(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            steps.append((trainer.current_epoch, batch_idx))
            if mode == "killed" and trainer.current_epoch == 2 and batch_idx == 1:
                raise _Stop

    scvi.settings.seed = 0
    adata = synthetic_tissue(n_sections=2, n_rows=8, n_cols=8, n_genes=40, seed=3)
    NH2ST.setup_anndata(adata, library_key="section", patch_size=32)
    model = NH2ST(adata, image_size=32, latent_dim=32, n_heads=2, n_genes=20, encoder_weights="random")
    kw = {"max_epochs": 4, "batch_size": 16, "progress": False, "accelerator": "cpu", "batches": batches,
          "callbacks": [Steps()]}
    if mode == "plain":
        model.train(**kw)
    elif mode == "killed":
        with pytest.raises(_Stop):
            model.train(checkpoint_dir=ckpt, **kw)
    else:
        model.train(checkpoint_dir=ckpt, resume=True, **kw)
    return model, steps


def test_a_run_stopped_by_an_error_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path):
    """The same contract with section batches, the fault injected in this process (cheaper than three
    processes; the SIGKILL test above keeps the real kill)."""
    plain, plain_steps = _train_in_process("plain", None, "section")
    _, killed_steps = _train_in_process("killed", tmp_path / "ckpt", "section")
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 1
    assert killed_steps[-1] == (2, 1)
    resumed, resumed_steps = _train_in_process("resumed", tmp_path / "ckpt", "section")
    per_epoch = len(plain_steps) // 4
    assert per_epoch >= 2 and resumed_steps == [(e, b) for e in (2, 3) for b in range(per_epoch)]
    a, b = plain.module.state_dict(), resumed.module.state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def test_checkpoints_last_and_best_and_resume_settings(tissue, tmp_path, caplog):
    from helpers import SMALL, setup

    adata = tissue.copy()
    setup(adata)
    model = NH2ST(adata, **SMALL)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir="):
        model.train(max_epochs=1, resume=True, progress=False)
    with caplog.at_level(logging.WARNING, logger="st_predict"):
        model.train(max_epochs=2, validation="section", best_epoch=True, progress=False,
                    checkpoint_dir=tmp_path / "c", resume=True)
    assert "No checkpoint at" in caplog.text  # nothing to resume: started from the first epoch
    last = torch.load(tmp_path / "c" / "last.ckpt", map_location="cpu", weights_only=True)
    best = torch.load(tmp_path / "c" / "best.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and best["epoch"] in (0, 1)
    assert "st_predict_neighbor_cache" in last  # the neighbour cache is training state
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]  # no half-written files
    # a finished run resumed trains no further: it ends with the same best epoch and weights
    best_epoch, weights = model.best_epoch_, {k: v.clone() for k, v in model.module.state_dict().items()}
    assert best_epoch in (1, 2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="st_predict"):
        model.train(max_epochs=2, validation="section", best_epoch=True, progress=False,
                    checkpoint_dir=tmp_path / "c", resume=True)
    assert "Resuming from" in caplog.text
    assert model.best_epoch_ == best_epoch
    for k, v in weights.items():
        torch.testing.assert_close(model.module.state_dict()[k], v)
    with pytest.raises(ValueError, match="not both"):
        model.train(max_epochs=1, checkpoint_dir=tmp_path / "c", ckpt_path="x", progress=False)
