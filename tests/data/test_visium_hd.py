"""read_visium_hd on a small Space Ranger Visium HD folder written by tests/hd_fixtures.py and read through the
real spatialdata-io reader (8 and 16 um bins, positions parquet, scale factors, PNGs, full-resolution BigTIFF)."""

import sys

import dask.array as da
import h5py
import numpy as np
import pandas as pd
import pytest
from hd_fixtures import HIRES_SCALEF, MICRONS_PER_PIXEL, write_space_ranger_hd
from helpers import SMALL, setup
from PIL import Image

from st_predict.data import read_visium_hd
from st_predict.pp import make_patch_reader
from st_predict.tl import aggregate_bins


@pytest.fixture(scope="module")
def hd(tmp_path_factory):
    """One folder shared by the tests that only read it."""
    return write_space_ranger_hd(tmp_path_factory.mktemp("hd") / "outs", fullres=True)


def _written(info, size, in_tissue_only=True):
    b = info["bins"][size]
    keep = np.flatnonzero(b["in_tissue"]) if in_tissue_only else np.arange(len(b["barcodes"]))
    return keep, b


@pytest.mark.parametrize("size", [16, 8])
def test_read_visium_hd_counts_positions_and_scalefactors(hd, size):
    a = read_visium_hd(hd["root"], bin_size_um=size)
    keep, b = _written(hd, size)
    assert a.obs_names.tolist() == [b["barcodes"][i] for i in keep]  # the filtered h5's bins, in its order
    assert a.var_names.tolist() == hd["genes"][:-1] + ["GENE27-1"]  # repeated symbols made unique, no warning
    assert a.var["gene_ids"].iloc[0] == "ENSG00000000000"
    assert a.X.format == "csr" and np.issubdtype(a.X.dtype, np.integer)
    np.testing.assert_array_equal(a.X.toarray(), b["counts"][keep].toarray())

    # bin centres in full-resolution pixels, x = column, y = row, exactly Space Ranger's parquet
    pos = pd.read_parquet(hd["root"] / "binned_outputs" / f"square_{size:03d}um" / "spatial" / "tissue_positions.parquet")
    pos = pos.set_index("barcode").loc[a.obs_names]
    assert a.obsm["spatial"].dtype == np.float64
    np.testing.assert_array_equal(a.obsm["spatial"], pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy())
    np.testing.assert_array_equal(a.obsm["spatial"], np.c_[b["x"][keep], b["y"][keep]])
    assert a.obs["array_row"].tolist() == pos["array_row"].tolist() == b["array_row"][keep].tolist()
    assert a.obs["array_col"].tolist() == b["array_col"][keep].tolist()
    assert (a.obs["in_tissue"] == 1).all()
    assert a.obs["section"].tolist() == ["HD1"] * a.n_obs and list(a.obs["section"].cat.categories) == ["HD1"]

    entry = a.uns["spatial"]["HD1"]
    side = size / MICRONS_PER_PIXEL
    assert entry["scalefactors"]["spot_diameter_fullres"] == side  # the bin's side in full-res pixels
    assert entry["scalefactors"]["bin_size_um"] == size
    assert entry["scalefactors"]["tissue_hires_scalef"] == HIRES_SCALEF
    assert "tissue_fullres_scalef" not in entry["scalefactors"]  # no full-resolution image asked for
    assert entry["metadata"]["bin_size_um"] == size
    assert entry["metadata"]["pixel_size_um"] == pytest.approx(MICRONS_PER_PIXEL) == pytest.approx(size / side)
    hires = np.asarray(Image.open(hd["root"] / "binned_outputs" / "square_016um" / "spatial" / "tissue_hires_image.png"))
    assert set(entry["images"]) == {"hires", "lowres"}
    np.testing.assert_array_equal(entry["images"]["hires"], hires)
    # the bins in tissue lie on tissue (not on the white background) in the hires image (all but a few at its edge)
    xy = np.floor(a.obsm["spatial"] * HIRES_SCALEF).astype(int)
    assert (hires[xy[:, 1], xy[:, 0], 1] < 215).mean() > 0.95


def test_read_visium_hd_16um_bins_are_sums_of_their_8um_bins(hd):
    a16, a8 = read_visium_hd(hd["root"], bin_size_um=16), read_visium_hd(hd["root"], bin_size_um=8)
    parent = pd.MultiIndex.from_arrays([a8.obs["array_row"] // 2, a8.obs["array_col"] // 2])
    key = pd.MultiIndex.from_arrays([a16.obs["array_row"], a16.obs["array_col"]])
    idx = key.get_indexer(parent)
    assert (idx >= 0).all() and (np.bincount(idx, minlength=a16.n_obs) == 4).all()  # four 8 um bins each
    onehot = np.zeros((a16.n_obs, a8.n_obs))
    onehot[idx, np.arange(a8.n_obs)] = 1
    np.testing.assert_array_equal(onehot @ a8.X.toarray(), a16.X.toarray())
    np.testing.assert_allclose(onehot @ a8.obsm["spatial"] / 4, a16.obsm["spatial"])  # same places
    assert a16.X.sum() > 0 and a16.X.toarray().std(0).min() > 0  # not trivially equal


def test_read_visium_hd_in_tissue_only(hd):
    filtered = read_visium_hd(hd["root"], bin_size_um=16)
    raw = read_visium_hd(hd["root"], bin_size_um=16, filtered_counts_file=False, in_tissue_only=False)
    keep, b = _written(hd, 16, in_tissue_only=False)
    assert raw.n_obs == len(b["barcodes"]) and 0 < raw.obs["in_tissue"].sum() < raw.n_obs
    assert raw.obs["in_tissue"].tolist() == b["in_tissue"].tolist()
    np.testing.assert_array_equal(raw.X.toarray(), b["counts"].toarray())
    kept = read_visium_hd(hd["root"], bin_size_um=16, filtered_counts_file=False)  # in_tissue_only=True
    assert kept.obs_names.tolist() == filtered.obs_names.tolist()
    assert (kept.obs["in_tissue"] == 1).all() and kept.n_obs == int(b["in_tissue"].sum())
    np.testing.assert_array_equal(kept.X.toarray(), filtered.X.toarray())
    np.testing.assert_array_equal(kept.obsm["spatial"], filtered.obsm["spatial"])


def test_read_visium_hd_fullres_image_is_lazy_and_agrees_with_the_bins(hd, monkeypatch):
    import spatialdata_io.readers.visium_hd as sdio_hd

    def eager(*args, **kwargs):
        raise AssertionError(f"spatialdata-io decoded {args} whole")

    monkeypatch.setattr(sdio_hd, "imread2", eager)  # how spatialdata-io reads a .btf: all in memory
    # spatialdata-io would find root/tissue_image.btf by itself and decode it: not without fullres_image_file
    assert "fullres" not in read_visium_hd(hd["root"], bin_size_um=16).uns["spatial"]["HD1"]["images"]
    a = read_visium_hd(hd["root"], bin_size_um=16, fullres_image_file=hd["fullres_image_file"])
    entry = a.uns["spatial"]["HD1"]
    full = entry["images"]["fullres"]
    assert isinstance(full, da.Array) and full.shape == hd["image"].shape and full.dtype == np.uint8
    assert entry["scalefactors"]["tissue_fullres_scalef"] == 1.0
    assert entry["metadata"]["source_image_path"] == str(hd["fullres_image_file"].absolute())
    # a crop of one bin's square at its obsm["spatial"] is the written image under that square
    patches = make_patch_reader(a, image_key="fullres", library_key="section", patch_size=32, out_size=32)
    patches = patches.read(np.arange(a.n_obs)).numpy().astype(float).mean((2, 3))  # (n, 3)
    x0, y0 = np.floor(a.obsm["spatial"] - 16 + 0.5).astype(int).T  # centres on half pixels round up
    truth = np.array([hd["image"][y : y + 32, x : x + 32].reshape(-1, 3).mean(0) for x, y in zip(x0, y0, strict=True)])
    np.testing.assert_allclose(patches, truth, atol=0.5)
    assert truth[:, 1].std() > 10  # the bins differ (tumour vs stroma), so a shuffle would show


def test_read_visium_hd_several_sections_and_prefixed_files(tmp_path):
    write_space_ranger_hd(tmp_path / "A", library_id="A", seed=1)
    write_space_ranger_hd(tmp_path / "B" / "outs", library_id="B", seed=2)
    # 10x's downloads prefix the feature slice with the dataset's name
    (tmp_path / "B" / "outs" / "feature_slice.h5").rename(tmp_path / "B" / "outs" / "Sample_B_feature_slice.h5")
    a = read_visium_hd({"A": tmp_path / "A", "B": tmp_path / "B"}, bin_size_um=16)
    assert list(a.obs["section"].cat.categories) == ["A", "B"] and set(a.uns["spatial"]) == {"A", "B"}
    assert a.obs_names.is_unique and a.obs_names[0].endswith("_A")  # the same barcodes in both, renamed
    b = read_visium_hd(tmp_path / "B", bin_size_um=8)
    assert list(b.uns["spatial"]) == ["B"]  # the h5's library_ids


def test_read_visium_hd_errors(tmp_path):
    write_space_ranger_hd(tmp_path / "s", library_id="S")
    root = tmp_path / "s"
    with pytest.raises(ValueError, match=r"bin_size_um=2: .* has bins of 8 um, 16 um only \(bin_size_um=8, 16\)"):
        read_visium_hd(root, bin_size_um=2)
    with pytest.raises(ValueError, match=r"bin_size_um=12\.5"):
        read_visium_hd(root, bin_size_um=12.5)
    with pytest.raises(TypeError, match="bin_size_um must be a number"):
        read_visium_hd(root, bin_size_um="16")
    with pytest.raises(FileNotFoundError, match=r"folder .*nowhere does not exist"):
        read_visium_hd(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"image .*he\.btf .*does not exist"):
        read_visium_hd(root, fullres_image_file=tmp_path / "he.btf")
    (tmp_path / "visium" / "spatial").mkdir(parents=True)
    (tmp_path / "visium" / "spatial" / "tissue_positions.csv").write_text("barcode\n")
    with pytest.raises(FileNotFoundError, match=r"binned_outputs does not exist\. .*read_visium"):
        read_visium_hd(tmp_path / "visium")

    # a full-resolution image that is not the one the hires image was made from
    wrong = tmp_path / "small.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(wrong)
    with pytest.raises(ValueError, match=r"small\.png is 100x100 px .*tissue_hires_scalef=0\.5"):
        read_visium_hd(root, fullres_image_file=wrong)

    sf = root / "binned_outputs" / "square_016um" / "spatial" / "scalefactors_json.json"
    sf.write_text(sf.read_text().replace('"bin_size_um": 16.0', '"bin_size_um": 8.0'))
    with pytest.raises(ValueError, match=r"scalefactors_json\.json does not describe 16 um bins"):
        read_visium_hd(root, bin_size_um=16)
    sf.write_text("{}")
    with pytest.raises(KeyError, match=r"scalefactors_json\.json has no 'spot_diameter_fullres'"):
        read_visium_hd(root, bin_size_um=16)

    pq = root / "binned_outputs" / "square_008um" / "spatial" / "tissue_positions.parquet"
    pd.read_parquet(pq).iloc[:, ::-1].to_parquet(pq)
    with pytest.raises(ValueError, match=r"tissue_positions\.parquet has columns \['pxl_col_in_fullres'"):
        read_visium_hd(root, bin_size_um=8)


@pytest.mark.parametrize(
    "missing",
    ["feature_slice.h5", "binned_outputs/square_016um/filtered_feature_bc_matrix.h5",
     "binned_outputs/square_016um/spatial/tissue_positions.parquet",
     "binned_outputs/square_016um/spatial/scalefactors_json.json",
     "binned_outputs/square_016um/spatial/tissue_hires_image.png"],
)
def test_read_visium_hd_missing_file_is_named(tmp_path, missing):
    write_space_ranger_hd(tmp_path, bin_sizes=(16,))
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match="missing: .*" + missing.replace(".", r"\.")):
        read_visium_hd(tmp_path, bin_size_um=16)


def test_read_visium_hd_barcodes_without_positions(tmp_path):
    write_space_ranger_hd(tmp_path, bin_sizes=(16,))
    pq = tmp_path / "binned_outputs" / "square_016um" / "spatial" / "tissue_positions.parquet"
    pos = pd.read_parquet(pq)
    pos[pos["in_tissue"] == 0].to_parquet(pq, index=False)  # no row for any bin of the filtered matrix
    with pytest.raises(ValueError, match=r"barcodes of .*filtered_feature_bc_matrix\.h5 have no row in"):
        read_visium_hd(tmp_path, bin_size_um=16)


def test_read_visium_hd_needs_spatialdata_io(hd, monkeypatch):
    monkeypatch.setitem(sys.modules, "spatialdata_io", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'st-predict\[hd\]'"):
        read_visium_hd(hd["root"])


def test_read_visium_hd_library_id_falls_back_to_the_folder(tmp_path):
    write_space_ranger_hd(tmp_path / "sample1" / "outs", bin_sizes=(16,))
    with h5py.File(tmp_path / "sample1" / "outs" / "binned_outputs" / "square_016um" / "filtered_feature_bc_matrix.h5",
                   "a") as f:
        del f.attrs["library_ids"]
    a = read_visium_hd(tmp_path / "sample1")
    assert list(a.uns["spatial"]) == ["sample1"] and (a.obs["section"] == "sample1").all()
    b = read_visium_hd(tmp_path / "sample1", library_id="mine")
    assert list(b.uns["spatial"]) == ["mine"]


# patch_size 64 full-resolution px = 32 um at both sizes: a 16 um bin with half a bin of context on each side,
# an 8 um bin with one and a half (Space Ranger's 16 um bins are about 58 px at 0.27 um/px; 224 px is ~60 um)
@pytest.mark.parametrize("size", [16, 8])
def test_nh2st_trains_and_predicts_on_visium_hd_bins(hd, size):
    from st_predict import NH2ST

    a = read_visium_hd(hd["root"], bin_size_um=size, fullres_image_file=hd["fullres_image_file"])
    for key in ("hires", "fullres"):
        setup(a, image_key=key, patch_size=64)
    model = NH2ST(a, **{**SMALL, "n_genes": 20})
    model.train(max_epochs=1, progress=False)
    model.predict(a)
    pred = a.obsm["nh2st"]
    assert pred.shape == (a.n_obs, 20) and list(pred.index) == a.obs_names.tolist()
    assert np.isfinite(np.asarray(pred, float)).all()
    if size != 16:
        return
    # the sub-spot head on HD bins: a bin's footprint is its square, not the disc inscribed in it
    assert a.uns["spatial"]["HD1"]["metadata"]["spot_shape"] == "square"
    model.train_bins(max_epochs=1, progress=False)
    assert model.bins_["config"]["square"] == {"HD1": True}
    bins = model.predict_bins(a, bin_um=4)  # 8 x 8 px squares in 32-px bins; the lattice is off the HD grid
    side = bins.uns["st_predict"]["bins"]["bin_px"]["HD1"]
    spot_xy = a.obsm["spatial"][a.obs_names.get_indexer(bins.obs["spot"])]
    off = np.abs(bins.obsm["spatial"] - spot_xy).max(1)
    inside, outside = off <= 16 - side / 2, off >= 16 + side / 2  # wholly inside / outside the bin's square
    assert inside.sum() > a.n_obs and outside.any()
    np.testing.assert_allclose(bins.obs["spot_weight"][inside], 1.0)  # the corners too (a disc gives them < 1)
    np.testing.assert_allclose(bins.obs["spot_weight"][outside], 0.0)
    # the 4-um squares summed into the measured 8-um bins: every in-tissue 8-um bin near a 16-um bin gets a value
    fine = read_visium_hd(hd["root"], bin_size_um=8)
    at = aggregate_bins(bins, at=fine)
    assert list(at.columns) == list(bins.var_names) and np.isfinite(at.to_numpy()).mean() > 0.95
