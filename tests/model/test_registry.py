"""Issue 27: the data facts live in the scvi-tools registry, registered once; every reader asks it."""

import numpy as np
import pytest
from helpers import SMALL, setup

from st_predict import NH2ST
from st_predict.pp import PatchGeometry, spatial_knn, spatial_neighbors

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")


def test_view_anndata_setup_lists_the_section_neighbour_and_patch_fields(split, capsys):
    train, _ = split
    setup(train)
    model = NH2ST(train, **SMALL)
    fields = model.adata_manager.registry["field_registries"]
    assert {"X", "spatial", "library", "neighbor_indices", "neighbor_distances", "patch"} <= set(fields)
    assert list(fields["library"]["state_registry"]["categorical_mapping"]) == ["S0", "S1"]
    patch = fields["patch"]["state_registry"]
    assert patch["size_px"] == 32 and patch["patch_px"] == {"S0": 32.0, "S1": 32.0} and patch["image_key"] == "hires"
    model.view_anndata_setup()
    shown = capsys.readouterr().out
    for name in ("library", "neighbor_indices", "neighbor_distances", "patch State Registry"):
        assert name in shown
    # the neighbour arrays: squidpy's 25 nearest spots of the same section, nearest first (a model with K reads the
    # first K: the K nearest, ties at the K-th distance broken by row)
    idx, dist = train.obsm["spatial_neighbors_indices"], train.obsm["spatial_neighbors_distances"]
    assert idx.shape == (200, 25) and (np.diff(dist, axis=1) >= 0).all()
    xy, sec = train.obsm["spatial"], train.obs["section"].to_numpy()
    assert (sec[idx] == sec[:, None]).all()
    np.testing.assert_allclose(dist, np.linalg.norm(xy[idx] - xy[:, None], axis=-1), rtol=1e-6)
    direct = spatial_knn(xy, sec, 8)
    np.testing.assert_allclose(dist[:, :8], np.linalg.norm(xy[direct] - xy[:, None], axis=-1), rtol=1e-6)


def test_the_patch_is_resolved_once_for_setup_model_training_and_prediction(split, monkeypatch):
    train, test = split
    calls = []
    real = PatchGeometry.from_pixel_sizes.__func__

    def counting(cls, *args, **kwargs):
        calls.append(args)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(PatchGeometry, "from_pixel_sizes", classmethod(counting))
    setup(train)
    model = NH2ST(train, **SMALL)
    model.train(1, progress=False)
    model.predict(test)
    assert len(calls) == 1


def test_neighbours_of_a_subset_are_computed_again(tissue):
    full = tissue.copy()
    spatial_neighbors(full, 8, library_key="section")
    sub = full[full.obs["section"] == "S1"].copy()  # row positions of the full AnnData: stale here
    assert sub.obsm["spatial_neighbors_indices"].max() >= sub.n_obs
    setup(sub, n_neighbors=8)
    idx = sub.obsm["spatial_neighbors_indices"]
    assert idx.max() < sub.n_obs
    np.testing.assert_allclose(sub.obsm["spatial_neighbors_distances"],
                               np.linalg.norm(sub.obsm["spatial"][idx] - sub.obsm["spatial"][:, None], axis=-1))
    kept = sub.obsm["spatial_neighbors_indices"]
    setup(sub, n_neighbors=8)  # they belong to these spots now: used as they are
    assert sub.obsm["spatial_neighbors_indices"] is kept


def test_a_model_needing_more_neighbours_than_registered_says_how_to_register_them(split):
    train, _ = split
    setup(train, n_neighbors=4)
    with pytest.raises(ValueError, match=r"hold 4 per spot but the model needs K = 8.*n_neighbors=8"):
        NH2ST(train, **SMALL)
    NH2ST(train, **SMALL, n_neighbors=4)  # fits


def test_a_reliability_fold_model_crops_the_area_it_was_trained_on(tissue, monkeypatch):
    """A patch in pixels becomes micrometres with the median pixel size of the training sections; a fold model
    leaving a section out must keep the full model's micrometres (it predicts with the full model's patch)."""
    adata = tissue.copy()
    for lib, mpp in zip(("S0", "S1", "S2"), (0.5, 0.5, 1.0), strict=True):
        adata.uns["spatial"][lib].setdefault("metadata", {})["pixel_size_um"] = mpp
    setup(adata, patch_size=32)
    model = NH2ST(adata, **SMALL)
    assert model.patch_geometry_.size_um == 16.0  # 32 px x the median 0.5 um/px
    seen = []
    real_train = NH2ST.train

    def spy(self, *args, **kwargs):
        if self is not model:
            seen.append((self.patch_geometry_.size_um, self._training_data().reader.boxes,
                         self._training_data().libraries))
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(NH2ST, "train", spy)
    model.train(1, progress=False, reliability=True)
    assert len(seen) == 3
    for size_um, boxes, libraries in seen:  # without S0 the median would be 0.75 um/px: a 24 um patch
        assert size_um == 16.0
        side = boxes[:, 2] - boxes[:, 0]
        assert (side[libraries == "S2"] == 16).all() and (side[libraries != "S2"] == 32).all()
