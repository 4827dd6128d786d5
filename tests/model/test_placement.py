"""Misplaced spot coordinates on the real HER2ST C2 section (issue 28): swapped x/y, hires-image pixels and
micrometres each end in one line naming the likely cause; the correct section, and one with a few spots on glass,
predict without a word."""

import warnings

import numpy as np
import pytest
import torch
from helpers import her2st_path

from st_predict import NH2ST, InputError, InputWarning

pytestmark = [pytest.mark.her2st, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")]


@pytest.fixture(scope="module")
def c2_and_model():
    from st_predict.data import read_her2st, select_sections

    adata = read_her2st(her2st_path(), sections=["C2", "C3"])
    train, test = select_sections(adata, ["C3"]), select_sections(adata, ["C2"])
    torch.manual_seed(0)
    NH2ST.setup_anndata(train, library_key="section", patch_size=224)
    model = NH2ST(train, image_size=32, latent_dim=64, n_heads=4, encoder_weights="random", n_genes=30)
    model.train(max_epochs=1, progress=False)
    return test, model


def _moved(test, xy):
    out = test.copy()
    out.obsm["spatial"] = xy
    return out


def test_misplaced_coordinates_name_the_likely_cause(c2_and_model):
    test, model = c2_and_model
    xy = np.asarray(test.obsm["spatial"], dtype=float)
    mpp = float(test.uns["spatial"]["C2"]["metadata"]["pixel_size_um"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        assert model.predict(_moved(test, xy), tta=False).shape == (test.n_obs, 30)
    cases = {
        "swapped": (xy[:, ::-1], r"x and y look swapped in adata.obsm\['spatial'\]: obs\['array_x'\]"),
        "hires": (xy * 0.2, r"40 um apart .* pixels of an image downscaled about 5x \(e\.g\. 'hires'\)"),
        "micrometres": (xy * mpp, r"147 um apart .*looks like micrometres \(200 units apart, as on the training data\)"),
    }
    for name, (moved, why) in cases.items():
        with pytest.raises(InputError, match=why) as err:
            model.predict(_moved(test, moved), tta=False)
        assert "\n" not in str(err.value) and "allow_off_tissue=True" in str(err.value), name
    # the user who means it
    assert model.predict(_moved(test, xy[:, ::-1]), tta=False, allow_off_tissue=True).shape == (test.n_obs, 30)


def test_a_few_spots_on_glass_predict_and_many_are_refused(c2_and_model):
    test, model = c2_and_model
    xy = np.asarray(test.obsm["spatial"], dtype=float).copy()
    n = len(xy)
    # the image's top-left corner is glass (the section lies in its middle)
    corner = np.array([300.0, 300.0]) + np.stack([np.arange(n) % 10, np.arange(n) // 10], 1) * 271.4 / 4
    some = xy.copy()
    some[: n // 10] = corner[: n // 10]
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        model.predict(_moved(test, some), tta=False)
    many = xy.copy()
    many[: n // 2] = corner[: n // 2]
    moved = _moved(test, many)
    del moved.obs["array_x"], moved.obs["array_y"]  # no array grid to compare with: the glass check speaks
    with pytest.raises(InputError, match=r"Section 'C2': \d+% of its patches fall on glass .* obs\['in_tissue'\]"):
        model.predict(moved, tta=False)
