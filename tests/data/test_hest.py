"""read_hest on tiny HEST-1k-like samples written by the test (h5ad, pyramidal TIFF, metadata JSON)."""

import json
import pickle
from pathlib import Path

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from helpers import SMALL, setup
from scipy import sparse

from st_predict import NH2ST
from st_predict.data import read_hest
from st_predict.pp import make_patch_reader

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")

H, W = 512, 384  # level-0 WSI: rows x columns
#: 12 spot centres (x = column, y = row) on a 3 x 4 grid
CENTRES = np.array([[48 + 96 * c, 64 + 160 * r + 8 * c] for r in range(3) for c in range(4)], dtype=float)


def _colour(i):
    return np.array([20 + 19 * i, 230 - 17 * i, (40 + 53 * i) % 256], dtype=np.uint8)


def _wsi():
    img = np.full((H, W, 3), 240, dtype=np.uint8)
    for i, (x, y) in enumerate(CENTRES.astype(int)):
        img[y - 16 : y + 16, x - 16 : x + 16] = _colour(i)
    return img


def _write_sample(root: Path, sid: str, pyramid: str = "subifds", meta_size=(W, H)):
    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, (len(CENTRES), 12)).astype(np.float32)
    a = ad.AnnData(
        X=sparse.csr_matrix(counts),
        obs=pd.DataFrame({"in_tissue": 1}, index=[f"{i:02d}x{i:02d}" for i in range(len(CENTRES))]),
        var=pd.DataFrame(index=[f"G{j}" for j in range(12)]),
    )
    a.obsm["spatial"] = CENTRES.copy()
    img = _wsi()
    # as HEST's h5ad: one "ST" library with a downscaled thumbnail
    a.uns["spatial"] = {"ST": {"images": {"downscaled_fullres": img[::8, ::8].copy()},
                               "scalefactors": {"tissue_downscaled_fullres_scalef": 0.125, "spot_diameter_fullres": 110.0}}}
    a.write_h5ad(root / "st" / f"{sid}.h5ad")
    wsi = root / "wsis" / f"{sid}.tif"
    if pyramid == "subifds":  # levels as SubIFDs of the first page
        with tifffile.TiffWriter(wsi) as tw:
            tw.write(img, tile=(64, 64), photometric="rgb", subifds=2)
            tw.write(img[::2, ::2], tile=(64, 64), photometric="rgb", subfiletype=1)
            tw.write(img[::4, ::4], tile=(64, 64), photometric="rgb", subfiletype=1)
    else:  # levels as reduced-resolution pages (libvips' layout)
        with tifffile.TiffWriter(wsi) as tw:
            for step in (1, 2, 4):
                tw.write(img[::step, ::step], tile=(64, 64), photometric="rgb", subfiletype=int(step > 1), metadata=None)
    meta = {"id": sid, "st_technology": "Visium", "pixel_size_um_estimated": 0.5, "pixel_size_um_embedded": 0.2527,
            "spot_diameter": 55.0, "inter_spot_dist": 100.0, "fullres_px_width": meta_size[0],
            "fullres_px_height": meta_size[1], "species": "Homo sapiens", "disease_state": None}
    (root / "metadata" / f"{sid}.json").write_text(json.dumps(meta))
    return counts


@pytest.mark.parametrize("pyramid", ["subifds", "pages"])
def test_read_hest_lazy_wsi_matches_spots(tmp_path, pyramid):
    counts = _write_sample(tmp_path, "TENX00", pyramid)
    a = read_hest(tmp_path)  # the folder's only sample
    assert a.n_obs == 12 and a.var_names.tolist() == [f"G{j}" for j in range(12)]
    np.testing.assert_array_equal(a.X.toarray(), counts)
    np.testing.assert_array_equal(a.obsm["spatial"], CENTRES)
    assert a.obs["section"].tolist() == ["TENX00"] * 12

    entry = a.uns["spatial"]["TENX00"]
    assert list(a.uns["spatial"]) == ["TENX00"]  # HEST's "ST" entry is renamed to the sample id
    img = entry["images"]["fullres"]
    assert isinstance(img, da.Array) and img.shape == (H, W, 3) and img.dtype == np.uint8
    assert img.chunksize[0] < H and img.chunksize[1] < W  # chunked by tiles: patches read only their tiles
    assert entry["images"]["downscaled_fullres"].shape == (H // 8, W // 8, 3)
    sf = entry["scalefactors"]
    assert sf["tissue_fullres_scalef"] == 1.0 and sf["tissue_downscaled_fullres_scalef"] == 0.125
    assert sf["spot_diameter_fullres"] == 110.0
    assert entry["metadata"]["pixel_size_um"] == 0.5  # the estimated one, as HEST uses
    assert entry["metadata"]["inter_spot_dist"] == 100.0 and "disease_state" not in entry["metadata"]

    reader = make_patch_reader(a, image_key="fullres", library_key="section", patch_size=24, out_size=24)
    patches = reader.read(np.arange(a.n_obs)).numpy()
    for i in range(a.n_obs):
        assert (patches[i] == _colour(i)[:, None, None]).all(), i
    # the lazy image pickles (for spawned DataLoader workers) and reads the same pixels afterwards
    again = pickle.loads(pickle.dumps(img))
    np.testing.assert_array_equal(np.asarray(again[40:90, 20:70]), _wsi()[40:90, 20:70])

    # the same sample through its h5ad path
    b = read_hest(tmp_path / "st" / "TENX00.h5ad")
    np.testing.assert_array_equal(b.obsm["spatial"], a.obsm["spatial"])
    assert list(b.uns["spatial"]) == ["TENX00"]


def test_read_hest_trains_on_two_samples(tmp_path):
    _write_sample(tmp_path, "S1")
    _write_sample(tmp_path, "S2", pyramid="pages")
    a = read_hest(tmp_path, sample_id=["S1", "S2"])
    assert list(a.obs["section"].cat.categories) == ["S1", "S2"] and set(a.uns["spatial"]) == {"S1", "S2"}
    assert a.obs_names.is_unique and a.obs_names[0] == "00x00_S1"
    setup(a, image_key="fullres", patch_size=24)
    torch.manual_seed(0)
    model = NH2ST(a, **{**SMALL, "n_genes": 10})
    model.train(max_epochs=1, progress=False, log_every_n_steps=1)
    pred = model.get_predicted_expression(a)
    assert pred.shape == (24, 10) and np.isfinite(pred.to_numpy()).all()
    assert isinstance(a.uns["spatial"]["S1"]["images"]["fullres"], da.Array)


def test_read_hest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_hest(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no 'st' folder"):
        read_hest(tmp_path)
    _write_sample(tmp_path, "S1")
    _write_sample(tmp_path, "S2")
    with pytest.raises(ValueError, match=r"holds 2 samples \['S1', 'S2'\]; pass sample_id="):
        read_hest(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"HEST samples \['NOPE'\] not found .* \(have \['S1', 'S2'\]\)"):
        read_hest(tmp_path, sample_id=["S1", "NOPE"])
    (tmp_path / "wsis" / "S2.tif").unlink()
    with pytest.raises(FileNotFoundError, match=r"HEST sample 'S2': missing .*wsis/S2\.tif"):
        read_hest(tmp_path, sample_id="S2")
    _write_sample(tmp_path, "S3", meta_size=(W, H + 100))
    with pytest.raises(ValueError, match=r"is 384x512 px .* = 384x612"):
        read_hest(tmp_path, sample_id="S3")
    a = ad.read_h5ad(tmp_path / "st" / "S1.h5ad")
    del a.obsm["spatial"]
    a.write_h5ad(tmp_path / "st" / "S1.h5ad")
    with pytest.raises(KeyError, match=r"S1\.h5ad has no obsm\['spatial'\]"):
        read_hest(tmp_path, sample_id="S1")
