"""read_visium on a minimal Space Ranger ``outs`` folder written by the test (10x v3 h5, positions,
scale factors, PNGs, full-resolution TIFF)."""

import json
from pathlib import Path

import dask.array as da
import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from helpers import setup
from PIL import Image
from scipy import sparse

from st_predict.data import read_visium
from st_predict.pp import make_patch_reader

H, W = 400, 320  # full-resolution image: rows x columns (not square, so swapped axes show)
HIRES, LOWRES = 0.25, 0.1
#: spot centres (x = column, y = row) in full-resolution pixels
CENTRES = np.array([[60, 300], [250, 80], [160, 200], [100, 104], [280, 360]], dtype=float)
GENES = ["GA", "GB", "GC", "GB", "GD"]  # a repeated symbol, as in real 10x matrices


def _colour(i):
    return np.array([30 + 40 * i, 220 - 35 * i, (90 + 71 * i) % 256], dtype=np.uint8)


def _fullres_image():
    img = np.full((H, W, 3), 235, dtype=np.uint8)
    for i, (x, y) in enumerate(CENTRES.astype(int)):
        img[y - 12 : y + 12, x - 12 : x + 12] = _colour(i)
    return img


def _write_10x_h5(path, counts, barcodes, genes, library_id="LIB1"):
    """A feature-barcode matrix in the 10x (Cell Ranger / Space Ranger >= 3) h5 schema."""
    m = sparse.csr_matrix(counts)  # barcodes x genes, i.e. the 10x genes x barcodes matrix in CSC
    with h5py.File(path, "w") as f:
        if library_id is not None:
            f.attrs["library_ids"] = np.array([library_id], dtype="S")
        f.attrs["chemistry_description"] = "Spatial 3' v1"
        f.attrs["software_version"] = "spaceranger-2.1.0"
        g = f.create_group("matrix")
        g.create_dataset("data", data=m.data.astype(np.int32))
        g.create_dataset("indices", data=m.indices.astype(np.int64))
        g.create_dataset("indptr", data=m.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array([len(genes), len(barcodes)], dtype=np.int32))
        g.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        feat = g.create_group("features")
        feat.create_dataset("id", data=np.array([f"ENSG{i:05d}" for i in range(len(genes))], dtype="S"))
        feat.create_dataset("name", data=np.array(genes, dtype="S"))
        feat.create_dataset("feature_type", data=np.array(["Gene Expression"] * len(genes), dtype="S"))
        feat.create_dataset("genome", data=np.array(["GRCh38"] * len(genes), dtype="S"))
        feat.create_dataset("_all_tag_keys", data=np.array(["genome"], dtype="S"))


def _write_outs(outs: Path, *, header=True, library_id="LIB1", fullres_suffix=".tif"):
    """Space Ranger outs/ with 5 spots; returns the full-resolution image file (written next to it)."""
    (outs / "spatial").mkdir(parents=True)
    barcodes = [f"AAACGT{i:04d}-1" for i in range(len(CENTRES))]
    counts = np.arange(len(CENTRES) * len(GENES)).reshape(len(CENTRES), len(GENES)) % 7
    _write_10x_h5(outs / "filtered_feature_bc_matrix.h5", counts, barcodes, GENES, library_id)
    # positions list spots in another order, plus one spot (off tissue) that has no counts
    rows = [(b, 1, 10 + i, 20 + 2 * i, int(y), int(x)) for i, (b, (x, y)) in enumerate(zip(barcodes, CENTRES, strict=True))]
    rows = rows[::-1] + [("TTTTTT0000-1", 0, 99, 99, 5, 5)]
    pos = pd.DataFrame(rows, columns=["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"])
    name = "tissue_positions.csv" if header else "tissue_positions_list.csv"
    pos.to_csv(outs / "spatial" / name, index=False, header=header)
    sf = {"tissue_hires_scalef": HIRES, "tissue_lowres_scalef": LOWRES, "spot_diameter_fullres": 26.0,
          "fiducial_diameter_fullres": 40.0}
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    full = _fullres_image()
    Image.fromarray(full[::4, ::4]).save(outs / "spatial" / "tissue_hires_image.png")  # 0.25 x
    Image.fromarray(full[::10, ::10]).save(outs / "spatial" / "tissue_lowres_image.png")  # 0.1 x
    image_file = outs.parent / f"he_fullres{fullres_suffix}"
    if fullres_suffix == ".tif":
        tifffile.imwrite(image_file, full, photometric="rgb", tile=(64, 64))
    else:
        Image.fromarray(full).save(image_file)
    return image_file, counts, barcodes


def _crop_colours(adata, image_key, patch_size, library_key="section"):
    reader = make_patch_reader(adata, image_key=image_key, library_key=library_key, patch_size=patch_size,
                               out_size=patch_size)
    patches = reader.read(np.arange(adata.n_obs)).numpy()  # (n, 3, s, s)
    return patches


def test_read_visium_coordinates_and_image_agree(tmp_path):
    image_file, counts, barcodes = _write_outs(tmp_path / "s1" / "outs")
    a = read_visium(tmp_path / "s1", fullres_image_file=image_file)  # the sample folder holding outs/ works

    assert a.obs_names.tolist() == barcodes  # counts order; the off-tissue position row is not added
    assert a.var_names.tolist() == ["GA", "GB", "GC", "GB-1", "GD"]  # made unique, no warning
    assert a.var["gene_ids"].tolist()[0] == "ENSG00000"
    np.testing.assert_array_equal(np.asarray(a.X.todense()), counts)
    np.testing.assert_array_equal(a.obsm["spatial"], CENTRES)  # x = column, y = row
    assert a.obsm["spatial"].dtype == np.float64
    assert a.obs["section"].tolist() == ["LIB1"] * 5 and list(a.obs["section"].cat.categories) == ["LIB1"]
    assert a.obs["array_row"].tolist() == [10, 11, 12, 13, 14]

    entry = a.uns["spatial"]["LIB1"]
    assert set(entry["images"]) == {"hires", "lowres", "fullres"}
    full = entry["images"]["fullres"]
    assert isinstance(full, da.Array) and full.shape == (H, W, 3) and full.dtype == np.uint8
    assert entry["scalefactors"]["tissue_fullres_scalef"] == 1.0
    assert entry["scalefactors"]["tissue_hires_scalef"] == HIRES
    assert entry["metadata"]["pixel_size_um"] == pytest.approx(65 / 26)
    assert entry["metadata"]["source_image_path"] == str(image_file.absolute())

    # a crop at each spot's obsm["spatial"] is that spot's colour, in the full-res and in squidpy's hires image
    for key in ("fullres", "hires"):
        patches = _crop_colours(a, key, 16)
        for i in range(a.n_obs):
            assert (patches[i] == _colour(i)[:, None, None]).all(), (key, i)

    setup(a, image_key="fullres", patch_size=16)  # NH2ST.setup_anndata accepts it


def test_read_visium_legacy_positions_png_fullres_and_library_id(tmp_path):
    image_file, _, _ = _write_outs(tmp_path / "s2" / "outs", header=False, library_id=None, fullres_suffix=".png")
    a = read_visium(tmp_path / "s2" / "outs", fullres_image_file=image_file)
    assert list(a.uns["spatial"]) == ["s2"]  # no library_ids attribute: the sample folder's name
    assert isinstance(a.uns["spatial"]["s2"]["images"]["fullres"], np.ndarray)
    np.testing.assert_array_equal(a.obsm["spatial"], CENTRES)
    patches = _crop_colours(a, "fullres", 20)
    assert all((patches[i] == _colour(i)[:, None, None]).all() for i in range(a.n_obs))
    # no full-resolution image: hires/lowres only; an explicit library id wins
    b = read_visium(tmp_path / "s2" / "outs", library_id="mine")
    assert list(b.uns["spatial"]) == ["mine"] and set(b.uns["spatial"]["mine"]["images"]) == {"hires", "lowres"}
    assert "tissue_fullres_scalef" not in b.uns["spatial"]["mine"]["scalefactors"]


def test_read_visium_several_sections(tmp_path):
    img_a, _, barcodes = _write_outs(tmp_path / "A" / "outs")
    img_b, _, _ = _write_outs(tmp_path / "B" / "outs", fullres_suffix=".png")
    a = read_visium({"A": tmp_path / "A" / "outs", "B": tmp_path / "B" / "outs"}, fullres_image_file={"A": img_a, "B": img_b})
    assert a.n_obs == 10 and list(a.obs["section"].cat.categories) == ["A", "B"]
    assert a.obs_names[0] == f"{barcodes[0]}_A" and a.obs_names.is_unique  # same barcodes in both sections
    assert set(a.uns["spatial"]) == {"A", "B"}
    patches = _crop_colours(a, "fullres", 16)
    for i in range(a.n_obs):
        assert (patches[i] == _colour(i % 5)[:, None, None]).all()
    with pytest.raises(KeyError, match=r"names libraries that path does not: \['C'\]"):
        read_visium({"A": tmp_path / "A" / "outs"}, fullres_image_file={"C": img_a})


def test_read_visium_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"folder .*nowhere does not exist"):
        read_visium(tmp_path / "nowhere")
    image_file, _, _ = _write_outs(tmp_path / "s" / "outs")
    outs = tmp_path / "s" / "outs"
    with pytest.raises(FileNotFoundError, match=r"Full-resolution image .*missing\.tif"):
        read_visium(outs, fullres_image_file=tmp_path / "missing.tif")
    # a full-resolution image whose size disagrees with tissue_hires_scalef x hires size
    wrong = tmp_path / "wrong.tif"
    tifffile.imwrite(wrong, np.zeros((200, 150, 3), np.uint8), photometric="rgb")
    with pytest.raises(ValueError, match=r"is 150x200 px .*tissue_hires_image.png is 80x100 px .*320x400 px"):
        read_visium(outs, fullres_image_file=wrong)
    # a barcode with counts but no position
    pos = pd.read_csv(outs / "spatial" / "tissue_positions.csv")
    pos[pos["barcode"] != "AAACGT0002-1"].to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    with pytest.raises(ValueError, match=r"1 barcodes .* no row in .*tissue_positions\*\.csv, e\.g\. \['AAACGT0002-1'\]"):
        read_visium(outs)
    (outs / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: .*spatial/scalefactors_json\.json"):
        read_visium(outs)
