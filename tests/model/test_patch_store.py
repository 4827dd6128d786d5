"""End-to-end training from the on-disk patch store and lazily read images (issue 19): the same patches,
the same training, each image decoded once per section, entries reused across runs."""

import dask
import dask.array as da
import numpy as np
import pytest
import scvi
import torch
from helpers import SMALL, her2st_path, setup

from st_predict import NH2ST
from st_predict.data import read_her2st, read_image
from st_predict.dataloaders._patch_store import PatchStore


def _lazy(adata, decodes=None):
    """``adata`` with every image a one-block dask array (as a lazily read JPEG), counting decodes."""
    adata = adata.copy()
    for lib, entry in adata.uns["spatial"].items():
        img = np.asarray(entry["images"]["hires"])

        def load(img=img, lib=lib):
            if decodes is not None:
                decodes[lib] = decodes.get(lib, 0) + 1
            return img.copy()

        entry["images"]["hires"] = da.from_delayed(dask.delayed(load, pure=True)(), shape=img.shape, dtype=img.dtype)
    return adata


def _model(adata, **kw):
    setup(adata, **kw)
    scvi.settings.seed = 0
    return NH2ST(adata, **SMALL)


def test_store_patches_equal_the_in_memory_ones(split, tmp_path):
    train, _ = split
    eager = _model(train.copy()).training_patches()
    assert isinstance(eager, torch.Tensor)
    decodes = {}
    lazy_model = _model(_lazy(train, decodes))
    store = lazy_model.training_patches(feature_cache=tmp_path)
    assert isinstance(store, PatchStore) and store.shape == tuple(eager.shape)
    torch.testing.assert_close(store[np.arange(len(store))], eager, rtol=0, atol=0)
    # any order, repeats, across sections, tensor indices (as the collate indexes)
    idx = torch.tensor([150, 3, 3, 199, 0, 101, 42])
    torch.testing.assert_close(store[idx], eager[idx], rtol=0, atol=0)
    # one entry per section, and each image decoded a bounded number of times (key + crop), not once per spot
    assert len(list(tmp_path.rglob("*.zarr"))) == 2
    assert decodes and all(n <= 2 for n in decodes.values()), decodes


def test_training_through_the_store_equals_training_in_memory(split, tmp_path):
    train, test = split
    states = []
    for cache in (None, tmp_path):
        model = _model(train.copy() if cache is None else _lazy(train))
        torch.manual_seed(0)
        model.train(max_epochs=2, progress=False, feature_cache=cache, batch_size=16)
        assert isinstance(model._data.patches, torch.Tensor if cache is None else PatchStore)
        states.append(model.module.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=0, msg=k)


def test_store_is_reused_and_keyed(split, tmp_path, monkeypatch):
    train, _ = split
    _model(train.copy()).training_patches(feature_cache=tmp_path)
    entries = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("zarr.json")}
    assert len(entries) == 2
    from st_predict.dataloaders._patch_reader import PatchReader

    calls = []
    real = PatchReader.read
    monkeypatch.setattr(PatchReader, "read", lambda self, idx: calls.append(len(idx)) or real(self, idx))
    again = _model(train.copy()).training_patches(feature_cache=tmp_path)
    assert calls == [] and {p: p.stat().st_mtime_ns for p in tmp_path.rglob("zarr.json")} == entries
    assert isinstance(again, PatchStore)
    # another patch size crops afresh into new entries
    _model(train.copy(), patch_size=40).training_patches(feature_cache=tmp_path)
    assert sum(calls) == train.n_obs and len(list(tmp_path.rglob("zarr.json"))) == 4


def test_large_patch_sets_go_to_the_default_store(split, tmp_path, monkeypatch):
    import st_predict.model._training as training

    monkeypatch.setattr(training, "PATCHES_IN_MEMORY_MAX", 1000)
    monkeypatch.setenv("ST_PREDICT_CACHE_DIR", str(tmp_path))
    train, _ = split
    assert isinstance(_model(train.copy()).training_patches(), PatchStore)
    assert len(list(tmp_path.rglob("*.zarr"))) == 2


def test_lazy_jpeg_equals_eager(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (90, 130, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "x.jpg", quality=90)
    lazy = read_image(tmp_path / "x.jpg", lazy=True)
    assert isinstance(lazy, da.Array) and lazy.shape == (90, 130, 3) and lazy.npartitions == 1
    np.testing.assert_array_equal(lazy.compute(), read_image(tmp_path / "x.jpg"))


@pytest.mark.her2st
def test_her2st_lazy_images():
    path = her2st_path()
    eager = read_her2st(path, sections=["C2"])
    lazy = read_her2st(path, sections=["C2"], load_images="lazy")
    img = lazy.uns["spatial"]["C2"]["images"]["hires"]
    assert isinstance(img, da.Array)
    np.testing.assert_array_equal(img[1000:1100, 2000:2100].compute(),
                                  eager.uns["spatial"]["C2"]["images"]["hires"][1000:1100, 2000:2100])
