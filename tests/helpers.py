"""Helpers shared by the tests (importable because pyproject sets pytest's pythonpath to tests/)."""

import os

import numpy as np
import pytest

HER2ST_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "her2st")


def her2st_path():
    """The real HER2ST sections (../shared/data/her2st from the project root), or skip."""
    path = os.environ.get("ST_PREDICT_HER2ST", HER2ST_DIR)
    if not os.path.isdir(os.path.join(path, "counts")):
        pytest.skip(f"HER2ST sections not found at {os.path.abspath(path)} (set ST_PREDICT_HER2ST)")
    return path


SMALL = {"image_size": 32, "latent_dim": 64, "n_heads": 4, "weights": "random", "n_genes": 40}


def setup(adata, **kwargs):
    from st_predict import NH2ST

    kwargs.setdefault("library_key", "section")
    kwargs.setdefault("patch_size", 32)
    NH2ST.setup_anndata(adata, **kwargs)


def per_gene_pcc(pred, truth):
    pred, truth = np.asarray(pred, float), np.asarray(truth, float)
    pc, tc = pred - pred.mean(0), truth - truth.mean(0)
    denom = np.sqrt((pc**2).sum(0) * (tc**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pc * tc).sum(0) / denom
