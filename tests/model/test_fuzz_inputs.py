"""Fuzzed inputs, table-driven: each gets a correct result or a clear error that names the item, never
a silent wrong answer, and the user's AnnData is left as it was."""

import anndata as ad
import numpy as np
import pytest
from helpers import SMALL, setup
from scipy import sparse

from st_predict import NH2ST
from st_predict.data import synthetic_tissue

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")


def _base():
    return synthetic_tissue(n_sections=3, n_rows=8, n_cols=8, n_genes=60, seed=0)


def _dense(x):
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


def _snapshot(a):
    return {
        # scvi-tools' registry adds its own "_scvi_*" columns (as it adds uns ids); the user's columns stay as they were
        "X": _dense(a.X).copy(), "obs": a.obs.loc[:, [c for c in a.obs.columns if not str(c).startswith("_scvi")]].copy(), "obs_names": list(a.obs_names), "var_names": list(a.var_names),
        "spatial": np.asarray(a.obsm["spatial"]).copy(), "uns_keys": sorted(k for k in a.uns if not k.startswith("_scvi")),  # scvi's registration ids
        "images": {k: np.asarray(v["images"]["hires"]).copy() for k, v in a.uns["spatial"].items()},
    }


def _assert_unchanged(a, snap):
    now = _snapshot(a)
    np.testing.assert_array_equal(now["X"], snap["X"])
    assert now["obs"].equals(snap["obs"]) and now["obs_names"] == snap["obs_names"]
    assert now["var_names"] == snap["var_names"] and now["uns_keys"] == snap["uns_keys"]
    np.testing.assert_array_equal(now["spatial"], snap["spatial"])
    for k, img in snap["images"].items():
        np.testing.assert_array_equal(now["images"][k], img)


def _map_images(adata, f):
    for entry in adata.uns["spatial"].values():
        entry["images"]["hires"] = f(entry["images"]["hires"])
    return adata


@pytest.fixture(scope="module")
def trained():
    adata = _base()
    setup(adata)
    model = NH2ST(adata, **SMALL)
    model.train(max_epochs=1, progress=False)
    return model


def _grey(img):
    return np.repeat(img.mean(2, keepdims=True).astype(np.uint8), 3, axis=2)


# images: (make the variant from a uint8 RGB image, the uint8 RGB image it must read as)
IMAGES = {
    "RGBA": (lambda im: np.concatenate([im, np.full(im.shape[:2] + (1,), 255, np.uint8)], 2), lambda im: im),
    "16-bit": (lambda im: im.astype(np.uint16) * 257, lambda im: im),
    "greyscale (H, W)": (lambda im: _grey(im)[..., 0], _grey),
    "float in [0, 1]": (lambda im: im.astype(np.float32) / 255, lambda im: im),
}


@pytest.mark.parametrize("variant", IMAGES, ids=IMAGES)
def test_image_formats_read_as_the_same_rgb(trained, variant):
    make, same_as = IMAGES[variant]
    reference = _map_images(_base(), same_as)
    data = _map_images(_base(), make)
    snap = _snapshot(data)
    want = trained.get_predicted_expression(reference, tta=False, library_key="section").to_numpy()
    got = trained.get_predicted_expression(data, tta=False, library_key="section").to_numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    _assert_unchanged(data, snap)


def _with_coord(value):
    def make():
        a = _base()
        xy = a.obsm["spatial"].copy()
        xy[3, 0] = value
        a.obsm["spatial"] = xy
        return a

    return make


def _rename(names):
    def make():
        a = _base()
        a.obs_names = names(a)
        return a

    return make


def _counts(f):
    def make():
        a = _base()
        a.X = f(_dense(a.X).astype(np.float64), a)
        return a

    return make


def _zero_section(x, a):
    x[(a.obs["section"] == "S1").to_numpy()] = 0
    return x


def _tiny_image():
    a = _base()
    a.uns["spatial"]["S1"]["images"]["hires"] = a.uns["spatial"]["S1"]["images"]["hires"][:20, :20]
    return a


# inputs that must be refused: (make, exception, message naming the item)
ERRORS = {
    "NaN coordinate": (_with_coord(np.nan), ValueError, r"1 spots with NaN/inf coordinates, e\.g\. \['S0_0x3'\]"),
    "inf coordinate": (_with_coord(np.inf), ValueError, r"1 spots with NaN/inf coordinates, e\.g\. \['S0_0x3'\]"),
    "a section of zero counts": (_counts(_zero_section), ValueError, r"adata\.X is all zero in section\(s\) 'S1'"),
    "real non-integer counts": (_counts(lambda x, a: x + 0.3), ValueError, r"adata\.X holds \d+ non-integer values"),
    "negative counts": (_counts(lambda x, a: x - 1.0), ValueError, r"adata\.X holds \d+ negative values"),
    "image smaller than a patch": (_tiny_image, ValueError,
                                   r"64 spots have a 32 px patch .*section 'S1'.* in a 20x20 px image"),
    "an AnnData view": (lambda: _base()[:150], ValueError, r"view of an AnnData .* adata\[mask\]\.copy\(\)"),
}


@pytest.mark.parametrize("case", ERRORS, ids=ERRORS)
def test_refused_inputs_get_an_error_naming_the_item(case):
    make, exc, message = ERRORS[case]
    data = make()
    snap = _snapshot(data)
    with pytest.raises(exc, match=message):
        setup(data)
        NH2ST(data, **SMALL)
    _assert_unchanged(data, snap)


def _targets(adata, **kw):
    setup(adata)
    model = NH2ST(adata, **{**SMALL, **kw})
    return model.genes_, model.training_targets()


# inputs that must train exactly as the plain data does: same genes, same targets
EQUIVALENT = {
    "float counts with rounding noise": _counts(lambda x, a: (x + 1e-5).astype(np.float32)),
    "float counts a hair below zero": _counts(lambda x, a: x - 1e-9),
    "sparse X": lambda: (lambda a: (setattr(a, "X", sparse.csr_matrix(_dense(a.X))), a)[1])(_base()),
    "dense X": lambda: (lambda a: (setattr(a, "X", _dense(a.X)), a)[1])(_base()),
    "duplicated obs_names": _rename(lambda a: [a.obs_names[0]] * 2 + list(a.obs_names[2:])),
    "obs_names repeated across sections": _rename(lambda a: [f"spot{i % 64}" for i in range(a.n_obs)]),
}


@pytest.mark.parametrize("case", EQUIVALENT, ids=EQUIVALENT)
def test_equivalent_inputs_train_on_the_same_genes_and_targets(case):
    genes, targets = _targets(_base())
    data = EQUIVALENT[case]()
    snap = _snapshot(data)
    got_genes, got_targets = _targets(data)
    assert got_genes == genes
    np.testing.assert_allclose(got_targets.numpy(), targets.numpy(), rtol=0, atol=1e-6)
    _assert_unchanged(data, snap)


def test_gene_names_differing_only_in_case_stay_distinct():
    data = _base()
    names = list(data.var_names)
    names[1] = names[0].swapcase()
    data.var_names = names
    setup(data)
    model = NH2ST(data, **{**SMALL, "n_genes": None}, genes=[names[0], names[1]])
    model.train(max_epochs=1, progress=False)
    pred = model.get_predicted_expression(data)
    assert list(pred.columns) == [names[0], names[1]] and np.isfinite(pred.to_numpy()).all()
    truth = _dense(data.X)[:, :2]
    assert not np.array_equal(truth[:, 0], truth[:, 1])  # two genes, not one read twice
    _, targets = model.genes_, model.training_targets().numpy()
    assert not np.allclose(targets[:, 0], targets[:, 1])


def test_views_and_backed_anndata_predict_as_the_anndata(trained, tmp_path):
    data = _base()
    want = trained.get_predicted_expression(data, tta=False, library_key="section")
    view = data[data.obs["section"] == "S1"]
    got = trained.get_predicted_expression(view, tta=False, library_key="section")
    np.testing.assert_allclose(got.to_numpy(), want.loc[view.obs_names].to_numpy(), atol=1e-5)
    assert view.is_view  # reading did not turn the view into a copy
    data.write_h5ad(tmp_path / "d.h5ad")
    backed = ad.read_h5ad(tmp_path / "d.h5ad", backed="r")
    got = trained.get_predicted_expression(backed, tta=False, library_key="section")
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), atol=1e-5)
    # and a backed AnnData trains, as the in-memory one does
    genes, targets = _targets(_base())
    backed2 = ad.read_h5ad(tmp_path / "d.h5ad", backed="r")
    got_genes, got_targets = _targets(backed2)
    assert got_genes == genes
    np.testing.assert_allclose(got_targets.numpy(), targets.numpy(), atol=1e-6)


def test_truncated_and_corrupted_image_files_name_the_file(tmp_path):
    import tifffile
    from PIL import Image

    from st_predict.data._images import read_fullres_image

    img = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "he.jpg", quality=90)
    Image.fromarray(img).save(tmp_path / "he.png")
    tifffile.imwrite(tmp_path / "he.tif", img, tile=(128, 128), compression="zlib", photometric="rgb")
    for name in ("he.jpg", "he.png", "he.tif"):
        raw = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(raw[: len(raw) * 2 // 3])
        (tmp_path / f"junk_{name}").write_bytes(b"\x00junk" * 50)
    for name in ("cut_he.jpg", "cut_he.png", "junk_he.jpg", "junk_he.png", "junk_he.tif"):
        with pytest.raises(ValueError, match=rf"{name}"):
            read_fullres_image(tmp_path / name)
    lazy = read_fullres_image(tmp_path / "cut_he.tif")  # a TIFF is read lazily: the cut shows on reading
    with pytest.raises(ValueError, match=r"Could not read pixels .* of the image .*cut_he\.tif"):
        np.asarray(lazy[400:512, 400:512])
