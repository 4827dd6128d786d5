"""The on-disk feature cache (issue 16): equal to a fresh computation, computed once, recomputed when any
part of its key changes, and never left half-written."""

import numpy as np
import pytest
import torch

from st_predict.dataloaders._feature_cache import CACHE_ENV, FeatureCache, default_cache_dir, state_digest
from st_predict.nn import build_resnet18_trunk, prepare_patches


@pytest.fixture
def trunk():
    torch.manual_seed(0)
    return build_resnet18_trunk().eval()


@pytest.fixture
def patches():
    return torch.from_numpy(np.random.default_rng(1).integers(0, 256, (6, 3, 64, 64), dtype=np.uint8))


def _key(trunk, coords, patch_um=165.0):
    return {"encoder": "resnet18", "weights": state_digest(trunk), "section": "C2", "coords": coords,
            "patch_um": patch_um, "transform": {"size": 64, "mean": [0.485, 0.456, 0.406]}}


class Counting:
    def __init__(self, trunk, patches):
        self.trunk, self.patches, self.calls = trunk, patches, 0

    @torch.no_grad()
    def __call__(self):
        self.calls += 1
        return self.trunk(prepare_patches(self.patches))


def test_cached_features_equal_fresh_ones_and_are_computed_once(tmp_path, trunk, patches):
    coords = np.arange(12, dtype=float).reshape(6, 2)
    encode = Counting(trunk, patches)
    first = FeatureCache(tmp_path).get_or_compute(_key(trunk, coords), encode)
    again = FeatureCache(tmp_path).get_or_compute(_key(trunk, coords.copy()), encode)  # a new cache object, equal key
    assert encode.calls == 1
    torch.testing.assert_close(again, Counting(trunk, patches)(), rtol=0, atol=0)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_a_changed_key_recomputes(tmp_path, trunk, patches):
    coords = np.arange(12, dtype=float).reshape(6, 2)
    encode = Counting(trunk, patches)
    cache = FeatureCache(tmp_path)
    cache.get_or_compute(_key(trunk, coords), encode)
    cache.get_or_compute(_key(trunk, coords, patch_um=110.0), encode)  # another patch size
    moved = coords.copy()
    moved[3, 0] += 1
    cache.get_or_compute(_key(trunk, moved), encode)  # one spot moved
    with torch.no_grad():
        trunk[0].weight[0, 0, 0, 0] += 1e-3  # other weights
    cache.get_or_compute(_key(trunk, coords), encode)
    assert encode.calls == 4
    assert len(list(tmp_path.rglob("*.pt"))) == 4


def test_a_crash_while_writing_leaves_no_entry(tmp_path, trunk, patches, monkeypatch):
    coords = np.zeros((6, 2))
    cache = FeatureCache(tmp_path)
    real_save = torch.save

    def half_then_crash(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half an entry")
        raise KeyboardInterrupt  # the process is interrupted mid-write

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute(_key(trunk, coords), Counting(trunk, patches))
    monkeypatch.setattr(torch, "save", real_save)
    assert cache.get(_key(trunk, coords)) is None
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob(".*"))
    encode = Counting(trunk, patches)
    cache.get_or_compute(_key(trunk, coords), encode)
    assert encode.calls == 1


def test_an_entry_of_another_key_or_a_corrupt_one_is_not_read(tmp_path, trunk, patches, caplog):
    cache = FeatureCache(tmp_path)
    a, b = _key(trunk, np.zeros((6, 2))), _key(trunk, np.ones((6, 2)))
    cache.put(a, torch.ones(2))
    cache.path(b).parent.mkdir(parents=True, exist_ok=True)
    cache.path(b).write_bytes(cache.path(a).read_bytes())  # b's file holds a's entry
    assert cache.get(b) is None
    cache.path(a).write_bytes(b"not a torch file")
    assert cache.get(a) is None
    assert "another key" in caplog.text and "unreadable" in caplog.text


def test_the_location_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "feats"))
    assert default_cache_dir() == tmp_path / "feats"
    assert FeatureCache().root == tmp_path / "feats"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "st_predict" / "features"
    with pytest.raises(TypeError, match="plain value"):
        FeatureCache(tmp_path).path({"encoder": object()})
