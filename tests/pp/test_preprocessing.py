"""Neighbours, gene selection, normalisation and patch reading."""

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from anndata import AnnData
from scipy import sparse
from scipy.spatial import cKDTree

from st_predict.dataloaders._patch_reader import PatchReader
from st_predict.pp import make_patch_reader, normalize_expression, select_genes, spatial_knn


def test_knn_same_section_sorted_and_matches_brute_force():
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 1000, (120, 2))
    libs = np.repeat(["a", "b", "c"], 40)
    coords[libs == "b"] = coords[libs == "a"] + 0.5  # section b sits on top of section a
    nn = spatial_knn(coords, libs, 8)
    assert nn.shape == (120, 8)
    for lib in ("a", "b", "c"):
        idx = np.flatnonzero(libs == lib)
        assert np.isin(nn[idx], idx).all(), f"neighbours of {lib} leave the section"
        _, ref = cKDTree(coords[idx]).query(coords[idx], k=9)
        np.testing.assert_array_equal(nn[idx], idx[ref[:, 1:]])  # nearest first, self excluded
    d = np.linalg.norm(coords[nn] - coords[:, None], axis=-1)
    assert (np.diff(d, axis=1) >= 0).all()


def test_knn_rejects_small_sections():
    coords = np.random.default_rng(0).uniform(0, 100, (30, 2))
    libs = np.array(["big"] * 25 + ["tiny"] * 5)
    with pytest.raises(ValueError, match=r"K \+ 1 = 9 .*'tiny' has 5"):
        spatial_knn(coords, libs, 8)


def _counts():
    x = np.array(
        [
            [10, 0, 5, 100, 1],
            [20, 1, 5, 80, 0],
            [10, 0, 5, 0, 2],  # section B: gene 3 never detected
            [30, 0, 5, 0, 1],
        ],
        dtype=np.float32,
    )
    return x, np.array(["A", "A", "B", "B"]), pd.Index(["g0", "g1", "g2", "g3", "g4"])


def test_select_genes_top_mean_among_genes_in_every_section():
    x, libs, names = _counts()
    genes = select_genes(sparse.csr_matrix(x), names, libs, n_top=3)
    # g3 has the highest mean but is absent from section B; g1 is absent from B too
    assert genes == ["g0", "g2", "g4"]
    assert select_genes(x, names, libs, n_top=1) == ["g0"]
    with pytest.warns(UserWarning, match=r"n_genes=10 asks for more genes than the 3 detected"):
        assert select_genes(x, names, libs, n_top=10) == ["g0", "g2", "g4"]  # fewer available: all
    assert select_genes(x, names, libs, genes=["g3", "g1"]) == ["g3", "g1"]
    with pytest.raises(ValueError, match="duplicates"):
        select_genes(x, names, libs, genes=["g1", "g1"])


def test_normalisation_matches_scanpy():
    x, _, names = _counts()
    adata = AnnData(x.copy(), var=pd.DataFrame(index=names))
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    idx = np.array([3, 0])
    np.testing.assert_allclose(normalize_expression(sparse.csr_matrix(x), idx), adata.X[:, idx], rtol=1e-5)
    sel = normalize_expression(x, idx, library_size="selected_genes")
    np.testing.assert_allclose(np.expm1(sel).sum(1), [1e4] * 4, rtol=1e-4)
    np.testing.assert_array_equal(normalize_expression(x, idx, is_count_data=False), x[:, idx])
    zero = normalize_expression(np.zeros((2, 5)), idx)
    np.testing.assert_array_equal(zero, 0)


def _adata_with_image(img, coords, scale=1.0, key="hires"):
    a = AnnData(np.ones((len(coords), 1), dtype=np.float32))
    a.obsm["spatial"] = np.asarray(coords, dtype=float)
    a.uns["spatial"] = {"lib": {"images": {key: img}, "scalefactors": {f"tissue_{key}_scalef": scale}}}
    return a


def test_patch_is_the_image_slice_centred_on_the_spot():
    img = np.random.default_rng(0).integers(0, 255, (100, 120, 3), dtype=np.uint8)
    a = _adata_with_image(img, [[50, 40], [16, 16]])
    reader = make_patch_reader(a, patch_size=32, out_size=32)
    p = reader.read([0, 1]).numpy()
    np.testing.assert_array_equal(p[0].transpose(1, 2, 0), img[24:56, 34:66])  # y from 40-16, x from 50-16
    np.testing.assert_array_equal(p[1].transpose(1, 2, 0), img[0:32, 0:32])


def test_scale_factor_and_float_images():
    rng = np.random.default_rng(1)
    full = np.kron(rng.integers(0, 255, (12, 12, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 96 x 96, 8 px blocks
    half = full[::2, ::2]
    coords = [[48, 48]]  # patch [32, 64) at full resolution, [16, 32) in the half-size image
    a_full = make_patch_reader(_adata_with_image(full, coords), patch_size=32, out_size=16).read([0])
    a_half = make_patch_reader(_adata_with_image(half, coords, scale=0.5), patch_size=32, out_size=16).read([0])
    diff = (a_full.int() - a_half.int()).abs().float()
    assert diff.mean() < 10 and (diff == 0).float().mean() > 0.3  # equal away from block edges
    as_float = make_patch_reader(_adata_with_image(half / 255.0, coords, 0.5), patch_size=32, out_size=16).read([0])
    assert (as_float.int() - a_half.int()).abs().max() <= 1


class _RecordingArray:
    """An image that records every slice read from it (to prove patches read only their pixels)."""

    def __init__(self, arr):
        self.arr, self.shape, self.dtype, self.reads = arr, arr.shape, arr.dtype, []

    def __getitem__(self, key):
        out = self.arr[key]
        self.reads.append(out.shape)
        return out


def test_reader_reads_only_patch_pixels():
    img = _RecordingArray(np.zeros((1000, 1000, 3), dtype=np.uint8))
    reader = PatchReader({"l": img}, {"l": 1.0}, np.array([[100, 100], [500, 500]]), ["l", "l"], 64, 32)
    out = reader.read([0, 1])
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.uint8
    assert img.reads == [(64, 64, 3), (64, 64, 3)]


def test_patch_reader_computes_lazy_crops_without_dask_threads(monkeypatch):
    """dask's thread pool deadlocks in forked DataLoader workers: crops must not use it."""
    import dask.array as da

    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)

    def no_threads(*args, **kwargs):
        raise AssertionError("dask's threaded scheduler was used")

    monkeypatch.setattr(da.Array, "__dask_scheduler__", staticmethod(no_threads))
    with pytest.raises(AssertionError, match="threaded"):  # the patch is live
        np.asarray(da.ones(3))
    lazy = da.from_array(img, chunks=(16, 16, 3))
    reader = PatchReader({"A": lazy}, {"A": 1.0}, np.array([[20.0, 30.0]]), ["A"], 16, 16)
    eager = PatchReader({"A": img}, {"A": 1.0}, np.array([[20.0, 30.0]]), ["A"], 16, 16)
    torch.testing.assert_close(reader.read([0]), eager.read([0]))


def test_absent_genes_are_suggested_in_another_case_and_ensembl_ids_are_explained():
    names = ["ERBB2", "ESR1", "GAPDH"]
    with pytest.raises(ValueError, match=r"2 requested genes .*: erbb2, esr1\. Did you mean ERBB2, ESR1\?"):
        select_genes(np.ones((3, 3)), names, np.array(["a", "a", "a"]), genes=["erbb2", "esr1"])
    with pytest.raises(ValueError, match=r"not in adata.var_names: KRT99\.$"):  # nothing to suggest: nothing said
        select_genes(np.ones((3, 3)), names, np.array(["a", "a", "a"]), genes=["KRT99"])
    # var_names are Ensembl IDs and the genes symbols: the message names the var column that holds them
    from st_predict.metrics import measured_expression

    adata = AnnData(np.ones((4, 3), dtype=np.float32),
                    var=pd.DataFrame({"gene_symbols": names}, index=["ENSG00000141736", "ENSG00000091831", "ENSG00000111640"]))
    with pytest.raises(KeyError, match=r"look like Ensembl IDs .*adata\.var\['gene_symbols'\] holds the symbols"):
        measured_expression(adata, ["ERBB2", "ESR1"])


def test_more_genes_asked_than_detected_warns_with_both_numbers():
    x = np.array([[1, 0, 3], [2, 0, 1], [1, 1, 0], [3, 0, 2]], dtype=np.float32)
    with pytest.warns(UserWarning, match=r"n_genes=100000 asks for more genes than the 2 detected in every section \(of 3"):
        genes = select_genes(x, ["A", "B", "C"], np.array(["s", "s", "t", "t"]), n_top=100000)
    assert sorted(genes) == ["A", "C"]  # B is not detected in section s


def test_evaluation_refuses_nan_counts_as_training_does():
    from st_predict.metrics import evaluate

    adata = AnnData(np.array([[1.0, 2.0], [np.nan, 1.0], [3.0, 0.0]], dtype=np.float32),
                    var=pd.DataFrame(index=["A", "B"]))
    adata.obsm["nh2st"] = pd.DataFrame(np.ones((3, 2)), index=adata.obs_names, columns=["A", "B"])
    with pytest.raises(ValueError, match=r"adata.X holds 1 NaN or infinite values"):
        evaluate(adata, key="nh2st")
