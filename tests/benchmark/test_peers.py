"""The peer baselines (TRIPLEX-, His2ST-, HisToGene- and EGN-style) on synthetic tissue: each learns the
planted image signal; the three that read the spot's surroundings react to a neighbour's pixels and EGN
does not; bad input is named. The models are tiny so the file runs in seconds."""

import dataclasses

import numpy as np
import pytest

from st_predict._utils._errors import InputError
from st_predict.benchmark import (
    EGNStyle,
    His2STStyle,
    HisToGeneStyle,
    MeanBaseline,
    TRIPLEXStyle,
    run_benchmark,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")

TINY = {
    "TRIPLEX": lambda: TRIPLEXStyle(
        image_size=32,
        emb_dim=64,
        depth_global=2,
        depth_neighbor=1,
        heads_global=4,
        heads_neighbor=4,
        heads_fusion=2,
        epochs=6,
    ),
    "His2ST": lambda: His2STStyle(
        image_size=32, channels=16, depth_transformer=1, depth_graph=2, heads=2, dim_head=16, epochs=100
    ),
    "HisToGene": lambda: HisToGeneStyle(image_size=32, dim=64, depth=1, heads=2, dim_head=16, epochs=60),
    "EGN": lambda: EGNStyle(
        image_size=32,
        patch_size=8,
        dim=64,
        depth=2,
        heads=2,
        dim_head=16,
        mlp_dim=128,
        bhead=2,
        bdim=16,
        epochs=8,
    ),
}
CONTEXT = {"TRIPLEX": True, "His2ST": True, "HisToGene": True, "EGN": False}


@pytest.fixture(scope="module")
def fitted(tissue):
    """One leave-S2-out run of the four tiny peers next to the per-gene mean: the result rows, the fitted
    models, their predictions of S2 and the fold."""
    models, preds, folds = {}, {}, []

    def recording(name, make):
        def factory():
            model = make()
            fit, predict = model.fit, model.predict

            def fit_and_keep(fold):
                folds.append(fold)
                fit(fold)

            def predict_and_keep(fold):
                preds[name] = predict(fold)
                return preds[name]

            model.fit, model.predict = fit_and_keep, predict_and_keep
            models[name] = model
            return model

        return factory

    methods = {"mean": MeanBaseline, **{name: recording(name, make) for name, make in TINY.items()}}
    res = run_benchmark(
        tissue, methods, folds=["S2"], n_genes=40, patch_size=32, image_size=32, weights="random"
    )
    return {"rows": {r["method"]: r for r in res["rows"]}, "models": models, "preds": preds, "fold": folds[0]}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY))
def test_each_peer_learns_the_planted_image_signal(fitted, name):
    rows = fitted["rows"]
    assert np.isnan(rows["mean"]["pcc"])  # a constant prediction has no PCC: only a spot-dependent one scores
    assert rows[name]["pcc"] > 0.25, rows[name]
    assert rows[name]["mse"] < rows["mean"]["mse"], (rows[name], rows["mean"])
    assert fitted["preds"][name].shape == (100, 40)


def _painted(fold, spot: str):
    """The fold with the pixels strictly inside ``spot``'s patch box of the test image painted black, and the
    test spots' frozen features recomputed with the runner's trunk."""
    from st_predict.benchmark._runner import _encoder_fmaps
    from st_predict.pp import PatchGeometry

    test = fold.test.copy()
    lib = str(test.obs.loc[spot, "section"])
    img = test.uns["spatial"][lib]["images"]["hires"].copy()
    cx, cy = (int(v) for v in test.obsm["spatial"][test.obs_names.get_loc(spot)])
    img[cy - 14 : cy + 14, cx - 14 : cx + 14] = 0  # the patch box is [c - 16, c + 16): 2 px inside it
    test.uns["spatial"][lib]["images"]["hires"] = img
    setup = fold.extra["setup"]
    geometry = PatchGeometry.resolve(test, test.obs["section"].astype(str).to_numpy(), setup["patch_size"])
    fmaps = _encoder_fmaps(test, setup, geometry, fold.extra["image_size"], fold.extra["trunk"], None)[0]
    return dataclasses.replace(
        fold, test=test, feats_test=fmaps.mean((2, 3)).numpy(), extra={**fold.extra, "fmaps_test": fmaps}
    )


def test_a_neighbours_pixels_reach_the_context_peers_only(fitted):
    """Painting the patch of the spot right of S2_4x4 (32 px away; the patches abut, they do not overlap)
    leaves S2_4x4's own patch and frozen feature as they were. TRIPLEX (neighbourhood and section
    encoders), His2ST and HisToGene (attention and graph over the section) change S2_4x4's prediction;
    EGN, which reads only the spot's own patch and training exemplars, does not, though it does change
    the painted spot's."""
    fold = fitted["fold"]
    target, neighbour = (fold.test.obs_names.get_loc(s) for s in ("S2_4x4", "S2_4x5"))
    painted = _painted(fold, "S2_4x5")
    np.testing.assert_array_equal(painted.feats_test[target], fold.feats_test[target])
    assert np.abs(painted.feats_test[neighbour] - fold.feats_test[neighbour]).max() > 1e-3
    for name, model in fitted["models"].items():
        assert model.sees_context is CONTEXT[name]
        before, after = fitted["preds"][name], model.predict(painted)
        assert np.abs(after[neighbour] - before[neighbour]).max() > 1e-4, name
        change = np.abs(after[target] - before[target]).max()
        if CONTEXT[name]:
            assert change > 1e-4, (name, change)
        else:
            np.testing.assert_allclose(after[target], before[target], atol=1e-6, rtol=0)


def test_the_padded_region_reader_masks_sub_patches_off_the_image(fitted):
    """The 5 x 5 sub-patch grid: its centre is the spot's own patch and its right cell the right
    neighbour's; on a corner spot the two rows and columns that leave the image are white and masked."""
    from st_predict.benchmark._methods import _fold_patches
    from st_predict.benchmark._peer_common import RegionReader, grid_positions

    fold = fitted["fold"]
    rows = fold.test.obs_names.get_indexer(["S2_4x4", "S2_0x0"])
    regions, mask = RegionReader(fold, fold.test, 32).read(rows)
    assert regions.shape == (2, 3, 160, 160) and mask.shape == (2, 25)
    own = _fold_patches(fold, fold.test, fold.extra["setup"], 32)
    assert (regions[0, :, 64:96, 64:96] == own[rows[0]]).all()
    assert (regions[0, :, 64:96, 96:128] == own[fold.test.obs_names.get_loc("S2_4x5")]).all()
    assert mask[0].all()
    corner = mask[1].view(5, 5)
    assert corner[2:, 2:].all() and not corner[:2].any() and not corner[:, :2].any()
    assert (regions[1, :, :48, :] == 255).all() and (regions[1, :, :, :48] == 255).all()
    pos = grid_positions(fold.test.obsm["spatial"], fold.test.obs["section"].astype(str).to_numpy())
    np.testing.assert_array_equal(pos, fold.test.obs[["array_col", "array_row"]].to_numpy())


def test_bad_input_is_named(fitted):
    fold = fitted["fold"]
    with pytest.raises(InputError, match="fewer than one batch of 500"):
        EGNStyle(batch_size=500).fit(fold)
    with pytest.raises(InputError, match="fewer than one batch of 500"):
        TRIPLEXStyle(batch_size=500).fit(fold)
    with pytest.raises(InputError, match="other training sections"):
        EGNStyle().fit(dataclasses.replace(fold, groups=np.full(len(fold.groups), "S0")))
    train = fold.train.copy()
    train.obs["section"] = train.obs["section"].astype(str)
    train.obs.iloc[0, train.obs.columns.get_loc("section")] = "S9"
    for method in (HisToGeneStyle(), His2STStyle()):
        with pytest.raises(InputError, match="Section 'S9' has 1 spot"):
            method.fit(dataclasses.replace(fold, train=train))
    with pytest.raises(InputError, match="depth_global must be at least 2"):
        TRIPLEXStyle(depth_global=1)
