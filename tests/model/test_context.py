"""NH2ST with ``context="neighbors"``: the translator reads each spot's pathology neighbourhood at training and
at inference, from spots (squidpy's graph on the spots predicted) and from whole-slide tiles."""

import numpy as np
import pytest
import torch
from helpers import SMALL, setup

from st_predict import NH2ST, InputError
from st_predict.pp import context_neighbors, grid_neighbors

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")


def _trained(adata, context, epochs=2):
    torch.manual_seed(0)
    # the neighbourhood model is the default one: what the tests below show is what NH2ST(adata) does
    m = NH2ST(adata, **SMALL) if context == "neighbors" else NH2ST(adata, **SMALL, context=context)
    assert m.module.context == context
    m.train(max_epochs=epochs, progress=False)
    return m


@pytest.fixture(scope="module")
def models(tissue):
    """A patch-only and a default (neighbourhood) model trained alike on S0 + S1 (pixel size 0.5 um/px)."""
    adata = tissue[tissue.obs["section"] != "S2"].copy()
    for lib in adata.uns["spatial"]:
        adata.uns["spatial"][lib].setdefault("metadata", {})["pixel_size_um"] = 0.5
    setup(adata)
    return {c: _trained(adata, c) for c in ("patch", "neighbors")}


def _test_section(tissue):
    test = tissue[tissue.obs["section"] == "S2"].copy()
    test.uns["spatial"]["S2"].setdefault("metadata", {})["pixel_size_um"] = 0.5
    return test


def _with_patch_painted(adata, spot: int, value: int = 0):
    """A copy of ``adata`` whose image is ``value`` strictly inside ``spot``'s 32 px patch."""
    out = adata.copy()
    lib = str(out.obs["section"].iloc[spot])
    img = np.array(out.uns["spatial"][lib]["images"]["hires"])
    x, y = np.rint(out.obsm["spatial"][spot]).astype(int)
    img[y - 14 : y + 14, x - 14 : x + 14] = value
    out.uns["spatial"][lib]["images"]["hires"] = img
    return out


def test_a_neighbours_image_changes_the_spot_only_with_context(models, tissue):
    test = _test_section(tissue)
    target, neighbour, far = 55, 56, 0  # row 5 col 5, its right neighbour, a corner 7 spots away
    painted = _with_patch_painted(test, neighbour)
    for context, model in models.items():
        before = model.get_predicted_expression(test, tta=False).to_numpy()
        after = model.get_predicted_expression(painted, tta=False).to_numpy()
        assert np.abs(after[neighbour] - before[neighbour]).max() > 1e-2  # its own patch changed
        np.testing.assert_array_equal(after[far], before[far])  # not a neighbour: untouched either way
        moved = np.abs(after[target] - before[target]).max()
        if context == "neighbors":
            assert moved > 0.0, moved  # inference is deterministic: the patch model moves by exactly 0
        else:
            assert moved == 0.0


def test_context_model_predicts_a_subset_with_the_neighbours_of_all_spots(models, tissue):
    model = models["neighbors"]
    test = _test_section(tissue)
    full = model.get_predicted_expression(test, tta=False).to_numpy()
    part = model.get_predicted_expression(test, indices=[55, 3], tta=False).to_numpy()
    np.testing.assert_allclose(part, full[[55, 3]], atol=1e-5)


def test_description_says_what_the_translator_sees(models):
    assert "context 'patch', the paper" in models["patch"].description
    assert "8 nearest spots' (context 'neighbors')" in models["neighbors"].description


def test_context_model_saves_and_loads(models, tissue, tmp_path):
    model = models["neighbors"]
    test = _test_section(tissue)
    model.save(tmp_path / "m")
    again = NH2ST.load(tmp_path / "m")
    assert again.module.context == "neighbors"
    np.testing.assert_allclose(again.get_predicted_expression(test, tta=False).to_numpy(),
                               model.get_predicted_expression(test, tta=False).to_numpy(), atol=1e-5)


def test_as_tile_model_refuses_a_context_model(models):
    pytest.importorskip("lazyslide_models")
    with pytest.raises(InputError, match="neighbourhood.*predict_slide"):
        models["neighbors"].as_tile_model()
    assert models["patch"].as_tile_model().columns == tuple(models["patch"].genes_)


def test_context_neighbors_pads_small_sections_with_the_spot_itself():
    xy = np.array([[0, 0], [10, 0], [30, 0], [0, 0], [5, 0]], float)
    libs = np.array(["a", "a", "a", "b", "b"])
    out = context_neighbors(xy, libs, 3)
    assert out.tolist() == [[1, 2, 0], [0, 2, 1], [1, 0, 2], [4, 3, 3], [3, 4, 4]]


def test_grid_neighbors_keep_the_training_pitch_on_a_finer_grid():
    """Tiles every 10 px, trained at a 20 px pitch: each tile's 8 neighbours are the 3 x 3 ring 20 px away."""
    xy = np.array([[x, y] for x in range(0, 100, 10) for y in range(0, 100, 10)], float)
    nbrs = grid_neighbors(xy, 10.0, 2, 8)
    i = int(np.flatnonzero((xy == [40, 40]).all(1))[0])
    offsets = {tuple(v) for v in (xy[nbrs[i]] - xy[i]).astype(int)}
    assert offsets == {(dx, dy) for dx in (-20, 0, 20) for dy in (-20, 0, 20)} - {(0, 0)}
    same = grid_neighbors(xy, 10.0, 1, 8)  # tiles at the training pitch: the adjacent ones
    assert {tuple(v) for v in (xy[same[i]] - xy[i]).astype(int)} == {
        (dx, dy) for dx in (-10, 0, 10) for dy in (-10, 0, 10)} - {(0, 0)}


@pytest.mark.slow
def test_predict_slide_reads_the_neighbouring_tiles(models, tmp_path):
    """On a whole slide, turning one tile's pixels (same colours, so the tissue found is the same) changes the
    prediction of the tiles around it only for the context model, and never that of a tile far away."""
    pytest.importorskip("lazyslide")
    from helpers import write_slide

    rng = np.random.default_rng(0)
    img = np.full((1024, 1024, 3), 242, np.uint8)
    img[64:960, 64:960] = (rng.integers(0, 2, (896, 896, 1)) * np.array([[[90, 40, 60]]]) +
                           np.array([[[110, 60, 150]]]) + rng.integers(0, 30, (896, 896, 3))).clip(0, 255)
    plain = write_slide(tmp_path / "plain.tif", img, mpp=0.5)
    tables = {}
    for context, model in models.items():
        pitch = model.spot_pitch_um_  # 16 um: the tiles (16 um) abut
        out = {}
        for name, path in (("plain", plain), ("turned", None)):
            if path is None:
                sd = out["plain_sd"]
                table = sd.tables["nh2st"]
                xy = table.obsm["spatial"]
                centre = int(np.argmin(np.hypot(*(xy - xy.mean(0)).T)))
                cx, cy = np.rint(xy[centre]).astype(int)
                turned = img.copy()
                turned[cy - 14 : cy + 14, cx - 14 : cx + 14] = np.rot90(img[cy - 14 : cy + 14, cx - 14 : cx + 14])
                path = write_slide(tmp_path / f"turned_{context}.tif", turned, mpp=0.5)
                out["centre"] = centre
            sd = model.predict_slide(path, pitch_um=pitch, tta=False, progress=False, image_mpp=None)
            out[f"{name}_sd"] = sd
            out[name] = sd.tables["nh2st"]
        tables[context] = out
    for context, out in tables.items():
        a, b = out["plain"], out["turned"]
        np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])  # the same tiles
        xy, c = a.obsm["spatial"], out["centre"]
        dist = np.hypot(*(xy - xy[c]).T) * 0.5  # micrometres
        change = np.abs(np.asarray(b.X) - np.asarray(a.X)).max(1)
        assert change[c] > 0.0
        assert change[dist > 60].max() == 0.0  # beyond any neighbourhood
        ring = (dist > 8) & (dist < 24)  # the 8 tiles around it
        assert ring.sum() == 8
        if context == "neighbors":
            assert change[ring].min() > 0.0, change[ring]
        else:
            assert change[ring].max() == 0.0
