"""Bad input gets a clear error that names the key, section or count, and the data is not changed."""

import anndata as ad
import numpy as np
import pytest
from helpers import SMALL, setup
from scipy import sparse

from st_predict import NH2ST

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")


def test_missing_spatial_coordinates(split):
    train, _ = split
    del train.obsm["spatial"]
    with pytest.raises(KeyError, match=r"obsm\['spatial'\] is missing"):
        setup(train)
    train.obsm["xy"] = np.full((train.n_obs, 2), np.nan)
    with pytest.raises(ValueError, match=r"200 spots with NaN"):
        setup(train, spatial_key="xy")


def _fresh(tissue):
    return tissue[tissue.obs["section"] != "S2"].copy()


def test_missing_image_or_scale_factor(tissue):
    train = _fresh(tissue)
    del train.uns["spatial"]["S1"]["images"]["hires"]
    with pytest.raises(KeyError, match=r"Section 'S1' has no image .*\['hires'\]"):
        setup(train)
    train = _fresh(tissue)
    del train.uns["spatial"]["S0"]["scalefactors"]["tissue_hires_scalef"]
    with pytest.raises(KeyError, match=r"Section 'S0' lacks .*tissue_hires_scalef"):
        setup(train)
    train = _fresh(tissue)
    del train.uns["spatial"]["S1"]
    with pytest.raises(KeyError, match=r"Section 'S1' has no entry"):
        setup(train)
    train = _fresh(tissue)
    with pytest.raises(ValueError, match=r"3 libraries \(S0, S1, S2\); pass library_key"):
        setup(train, library_key=None)
    with pytest.raises(KeyError, match="not a column"):
        setup(train, library_key="sample")


def test_spots_at_the_same_coordinates_are_named(split):
    train, _ = split
    coords = train.obsm["spatial"].copy()
    idx = np.flatnonzero(train.obs["section"] == "S1")[:2]
    coords[idx[1]] = coords[idx[0]]
    train.obsm["spatial"] = coords
    with pytest.raises(ValueError, match=r"2 spots of section 'S1' sit at the same coordinates"):
        setup(train)
    np.testing.assert_array_equal(train.obsm["spatial"], coords)


def test_patches_outside_the_image(tissue, split):
    train, test = split
    coords = train.obsm["spatial"].copy()
    idx = np.flatnonzero(train.obs["section"] == "S1")[:3]
    coords[idx, 0] = 5.0 + np.arange(3)  # a 32 px patch centred at x=5 starts at x=-11
    train.obsm["spatial"] = coords
    with pytest.raises(ValueError, match=r"3 spots have a 32 px patch .*section 'S1': 3 spots"):
        setup(train)
    # the same check guards prediction on new data
    train2 = _fresh(tissue)
    setup(train2)
    model = NH2ST(train2, **SMALL)
    model.train(max_epochs=1, progress=False)
    test.obsm["spatial"] = test.obsm["spatial"] + 1000.0
    with pytest.raises(ValueError, match=r"100 spots have a 32 px patch .*section 'S2'"):
        model.predict(test)
    assert "nh2st" not in test.obsm


@pytest.mark.parametrize(
    ("value", "message"),
    [(np.nan, "1 NaN or infinite"), (-3.0, "1 negative values"), (2.5, "1 non-integer values")],
)
@pytest.mark.parametrize("as_sparse", [False, True])
def test_invalid_counts(split, value, message, as_sparse):
    train, _ = split
    x = train.X.copy()
    x[4, 7] = value
    train.X = sparse.csr_matrix(x) if as_sparse else x
    with pytest.raises(ValueError, match=f"adata.X holds {message}"):
        setup(train)


def test_invalid_counts_in_a_layer_and_normalised_data(split):
    train, _ = split
    train.layers["counts"] = train.X.copy()
    train.layers["counts"][0, 0] = -1
    with pytest.raises(ValueError, match=r"adata.layers\['counts'\] holds 1 negative"):
        setup(train, layer="counts")
    with pytest.raises(KeyError, match="layer='raw' is not in adata.layers"):
        setup(train, layer="raw")
    # already-normalised values are accepted with is_count_data=False
    train.layers["lognorm"] = np.log1p(train.X) + 0.5
    setup(train, layer="lognorm", is_count_data=False)
    model = NH2ST(train, **SMALL)
    assert model.module.n_genes == 40


def test_section_smaller_than_k_plus_one(split):
    train, _ = split
    small = ad.concat([train[train.obs["section"] == "S0"], train[train.obs["section"] == "S1"][:6]], merge="same")
    small.uns["spatial"] = train.uns["spatial"]
    setup(small)
    with pytest.raises(ValueError, match=r"K \+ 1 = 9 spots per section .*'S1' has 6"):
        NH2ST(small, **SMALL)
    NH2ST(small, **{**SMALL, "n_neighbors": 5})  # fine with K + 1 <= 6


def test_absent_genes(split):
    train, _ = split
    setup(train)
    with pytest.raises(ValueError, match=r"2 requested genes are not in adata.var_names: NOPE, ALSO_NO"):
        NH2ST(train, **{**SMALL, "genes": ["G001", "NOPE", "ALSO_NO"]})


def test_empty_anndata(split):
    train, _ = split
    with pytest.raises(ValueError, match=r"empty \(n_obs == 0\)"):
        setup(train[:0].copy())
    with pytest.raises(ValueError, match=r"no genes \(n_vars == 0\)"):
        setup(train[:, :0].copy())


def test_batch_too_small_for_contrastive_loss(split):
    train, _ = split
    setup(train)
    model = NH2ST(train, **SMALL)
    with pytest.raises(ValueError, match="batch_size=1 is too small for a contrastive loss"):
        model.train(max_epochs=1, batch_size=1)
    with pytest.raises(ValueError, match=r"Only 200 training spots for batch_size=256"):
        model.train(max_epochs=1, batch_size=256)
    # a fine-tuned trunk's BatchNorm needs two patches per batch
    plain = NH2ST(train, **{**SMALL, "contrastive": False})
    with pytest.raises(ValueError, match="batch_size=1 with trunk='finetune'"):
        plain.train(max_epochs=1, batch_size=1)
    # without contrastive losses and with a frozen trunk a batch of one is fine
    single = NH2ST(train, **{**SMALL, "contrastive": False, "trunk": "frozen"})
    single.train(max_epochs=1, batch_size=1, progress=False)
    assert single.is_trained


def test_bad_hyperparameters(split):
    train, _ = split
    setup(train)
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 32"):
        NH2ST(train, **{**SMALL, "image_size": 50})
    with pytest.raises(ValueError, match="hyperedge_degree must be between 1 and K \\+ 1 = 5"):
        NH2ST(train, **{**SMALL, "n_neighbors": 4, "hyperedge_degree": 6})
    with pytest.raises(ValueError, match="attention must be one of"):
        NH2ST(train, **{**SMALL, "attention": "bidirectional"})
    with pytest.raises(FileNotFoundError, match="neither 'imagenet', 'random' nor an existing weights file"):
        NH2ST(train, **{**SMALL, "encoder_weights": "/nonexistent/resnet.pth"})


def test_fixture_images_untouched(tissue):
    """The deletions above worked on copies."""
    for lib in ("S0", "S1", "S2"):
        assert "hires" in tissue.uns["spatial"][lib]["images"]
        assert tissue.uns["spatial"][lib]["scalefactors"]["tissue_hires_scalef"] == 1.0


def test_a_section_without_its_uns_entry_is_named_before_its_pixel_size(split):
    train, _ = split
    for entry in train.uns["spatial"].values():
        entry.setdefault("metadata", {})["pixel_size_um"] = 0.5
    train.uns["spatial"]["S0_image"] = train.uns["spatial"].pop("S0")
    with pytest.raises(KeyError, match=r"Section 'S0' has no entry in adata.uns\['spatial'\] \(it has: .*S0_image"):
        setup(train, patch_size=None, patch_size_um=16.0)
