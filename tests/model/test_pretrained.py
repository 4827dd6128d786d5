"""Pretrained predictors of the lazyslide-models registry (issue 31): Path2Space, STPath and DeepSpot-M loaded
through their own loaders from files the tests write (a local Hugging Face cache, offline; or model_path=), their
features computed once per section, calibration (coverage, reliability), adaptation, save/load and errors. Random
weights: nothing here measures accuracy."""

import json
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from pretrained_fixtures import Counting, hub_file, offline_hub, write_stpath

from st_predict import InputError, Pretrained
from st_predict._utils import MissingFileError, MissingKeyError
from st_predict.data import select_sections, synthetic_tissue
from st_predict.metrics import measured_expression

pytest.importorskip("lazyslide_models")

GENES = [f"G{i:03d}" for i in range(8)]
NOISE = "G029"


def _with_pixel_size(adata, tile_um):
    for lib in adata.uns["spatial"]:
        adata.uns["spatial"][lib].setdefault("metadata", {})["pixel_size_um"] = tile_um / 32  # a tile is 32 px
    return adata


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """CTransPath and Path2Space with random weights in an offline HF cache (the registry's repos and files)."""
    with offline_hub(tmp_path_factory.mktemp("hf"), [*GENES, NOISE, "NOT_MEASURED"]) as hub:
        yield hub


@pytest.fixture(scope="module")
def tissue():
    return _with_pixel_size(synthetic_tissue(n_sections=3, n_rows=6, n_cols=6, n_genes=30, seed=1), 100.0)


def test_path2space_predicts_spots_from_features_computed_once(hub, tissue, tmp_path):
    _, (ctrans, head) = hub
    adata = tissue.copy()
    model = Pretrained("path2space", genes=GENES, feature_cache=tmp_path / "features")
    assert model.encoder_spec.name == "lazyslide:ctranspath" and model.encoder_spec.out_channels == 768
    assert (model.geometry.tile_um, model.geometry.tile_px) == (100.0, 224)
    assert model.info["license"] == "Apache-2.0" and "Apache-2.0" in repr(model)
    calls = []
    model.encoder.register_forward_hook(lambda mod, args, out: calls.append(len(args[0])))
    df = model.predict(adata, library_key="section")
    assert adata.obsm["pretrained"] is df and list(df.columns) == GENES and df.index.equals(adata.obs_names)
    assert sum(calls) == adata.n_obs  # each spot's tile through the encoder once
    assert "pretrained_lower" not in adata.obsm  # not calibrated: no intervals
    meta = adata.uns["st_predict"]["pretrained"]
    assert meta["predictor"] == "path2space" and meta["tile_um"] == 100.0 and not meta["calibrated"]
    # the registry's own programs ran: CTransPath on the normalised 224 px tiles, Path2Space on its features
    rows = np.flatnonzero(adata.obs["section"].to_numpy() == "S0")[:4]
    from st_predict.pp import make_patch_reader

    reader = make_patch_reader(adata, library_key="section", patch_size=dict.fromkeys(("S0", "S1", "S2"), 32.0),
                               out_size=224)
    x = reader.read(rows).float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.encoder_spec.mean, model.encoder_spec.std))
    with torch.no_grad():
        want = head(ctrans((x - mean) / std))[:, :len(GENES)]
    np.testing.assert_allclose(df.to_numpy()[rows], want.numpy(), rtol=1e-4, atol=1e-5)
    # again, and calibrating on the same spots: no encoder call (kept in memory)
    model.predict(adata, library_key="section", key_added="again")
    model.calibrate(adata, library_key="section")
    assert sum(calls) == adata.n_obs
    # another predictor object on the same on-disk cache: no encoder call either
    other = Pretrained("path2space", genes=GENES[:3], feature_cache=tmp_path / "features")
    other_calls = []
    other.encoder.register_forward_hook(lambda mod, args, out: other_calls.append(len(args[0])))
    np.testing.assert_allclose(other.predict(adata, library_key="section").to_numpy(), df.to_numpy()[:, :3], rtol=1e-6)
    assert other_calls == []


def test_genes_outside_the_vocabulary_and_missing_inputs_are_named(hub, tissue):
    with pytest.raises(MissingKeyError, match="NOPE"):
        Pretrained("path2space", genes=["G000", "NOPE"])
    with pytest.raises(InputError, match="not a model of the lazyslide-models registry"):
        Pretrained("no-such-predictor")
    with pytest.raises(InputError, match="not a feature- or tile-prediction"):
        Pretrained("ctranspath")
    model = Pretrained("path2space", genes=GENES)
    bare = tissue.copy()
    del bare.uns["spatial"]["S1"]["metadata"]["pixel_size_um"]
    with pytest.raises(MissingKeyError, match="pixel_size_um"):
        model.predict(bare, library_key="section")
    with pytest.raises(MissingKeyError, match="NOT_MEASURED"):
        Pretrained("path2space", genes=[*GENES, "NOT_MEASURED"]).calibrate(tissue.copy(), library_key="section")


def test_missing_weights_name_their_fix(hub, tmp_path, monkeypatch):
    with pytest.raises(MissingFileError, match="model_path"):
        Pretrained("path2space", genes=GENES, model_path=tmp_path / "gone.pt2")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty"))  # an offline cache without the files
    with pytest.raises(MissingFileError, match="HF_HUB_OFFLINE=1"):
        Pretrained("path2space", genes=GENES)


def test_stpath_sees_each_section_whole_with_its_coordinates(tissue, stpath_files):
    weights, voc = stpath_files
    enc = Counting(1536)
    with pytest.raises(InputError, match="genes="):
        Pretrained("stpath", encoder=enc, model_path=weights, gene_voc_path=voc, tile_px=32)
    model = Pretrained("stpath", genes=GENES[:4], encoder=enc, model_path=weights, gene_voc_path=voc, tile_px=32,
                       organ_type=None)
    assert model.geometry.whole_section and model.geometry.tile_um == 112.0
    enc.seen = 0  # (building the encoder ran it once on a blank tile, to read its output size)
    seen = []
    real = model.card.predict

    def spy(features, coords=None):
        seen.append((len(features), None if coords is None else np.asarray(coords).copy()))
        return real(features, coords)

    model.card.predict = spy
    adata = _with_pixel_size(tissue.copy(), 112.0)
    df = model.predict(adata, library_key="section")
    assert df.shape == (adata.n_obs, 4) and np.isfinite(df.to_numpy()).all()
    assert [n for n, _ in seen] == [36, 36, 36] and enc.seen == adata.n_obs  # one call per section, each spot once
    s0 = adata.obs["section"].to_numpy() == "S0"
    np.testing.assert_allclose(seen[0][1], adata.obsm["spatial"][s0])
    # STPath's output depends on where the spots are: moving them changes the prediction (a per-tile model would not)
    moved = adata.copy()
    moved.obsm["spatial"] = moved.obsm["spatial"].astype(float)
    moved.obsm["spatial"][s0, 0] = moved.obsm["spatial"][s0, 0][::-1]
    fresh = Pretrained("stpath", genes=GENES[:4], encoder=Counting(1536), model_path=weights, gene_voc_path=voc,
                       tile_px=32)
    assert not np.allclose(fresh.predict(adata, library_key="section").to_numpy()[s0],
                           fresh.predict(moved, library_key="section", key_added="m").to_numpy()[s0])


@pytest.mark.slow
def test_deepspotm_predicts_tiles_from_its_hub_files(tmp_path, monkeypatch, slide_file):
    pytest.importorskip("deepspotm")
    import huggingface_hub.constants as hc
    import timm
    from deepspotm import DeepSpotM
    from deepspotm.image_encoder import H0miniEncoder
    from safetensors.torch import save_file

    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))
    # the smallest backbone deepspotm builds (H0-mini, a ViT-B/14), random, where deepspotm reads it; then the model
    torch.manual_seed(0)
    vit = timm.create_model(H0miniEncoder.TIMM_NAME, pretrained=False, num_classes=0, **H0miniEncoder._build_kwargs())
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()},
              str(hub_file(hub, "bioptimus/H0-mini", "model.safetensors")))
    tokens = hub_file(hub, "ratschlab/DeepSpotM", "tokens.csv")
    pd.DataFrame({"token": GENES, "token_type": "gene"}).to_csv(tokens, index=False)
    hp = {"encoder_model": "H0miniEncoder", "gene_embed_dim": 32, "cross_attn_heads": 2, "cross_attn_layers": 1,
          "use_router": False, "r": 2}
    net = DeepSpotM(**hp, token_path=str(tokens), backbone_pretrained=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(hub_file(hub, "ratschlab/DeepSpotM", "model.safetensors")))
    hub_file(hub, "ratschlab/DeepSpotM", "config.json").write_text(json.dumps(hp))

    model = Pretrained("deepspotm", genes=["G001", "G003"], batch_size=4)
    assert model.info["gated"] and model.info["commercial"] is False and "non-commercial" in repr(model)
    calls = []
    real = model.card.predict
    model.card.predict = lambda image: (calls.append(len(image)), real(image))[1]  # the tile model, per batch
    adata = _with_pixel_size(synthetic_tissue(n_sections=1, n_rows=3, n_cols=3, n_genes=30, seed=1), 112.0)
    df = model.predict(adata, library_key="section")
    assert df.shape == (9, 2) and np.isfinite(df.to_numpy()).all() and df.to_numpy().std(0).min() > 0
    assert calls == [4, 4, 1]
    model.predict(adata, library_key="section", key_added="again")
    assert calls == [4, 4, 1]  # the tile outputs are kept: not run again
    with pytest.raises(MissingKeyError, match="NOPE"):
        Pretrained("deepspotm", genes=["G001", "NOPE"])
    # a slide: DeepSpot-M's 224 px tiles of about 112 um, each run through the tile model once
    calls.clear()
    table = model.predict_slide(slide_file, pitch_um=150, progress=False, image_mpp=None).tables["pretrained"]
    assert table.n_obs >= 3 and sum(calls) == table.n_obs and np.isfinite(table.X).all()
    assert table.uns["st_predict"]["patch_size_um"] == model.geometry.tile_um


def test_deepspotm_without_its_package_names_the_install_command(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_deepspotm(name, *args, **kwargs):
        if name == "deepspotm" or name.startswith("deepspotm."):
            raise ImportError("No module named 'deepspotm'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_deepspotm)
    with pytest.raises(InputError, match="pip install"):
        Pretrained("deepspotm", genes=["G001"])


# -- calibration: a predictor with a known error (the truth plus noise) on synthetic tissue --------------------------
@pytest.fixture(scope="module")
def five():
    return _with_pixel_size(synthetic_tissue(n_sections=5, n_rows=10, n_cols=10, n_genes=30, seed=2), 100.0)


def _known_error(model, monkeypatch, bias=None, noise_sd=0.3):
    """Replace the predictor's outputs by the measured values plus Gaussian noise (``NOISE``: noise alone), optionally
    through a planted per-gene affine bias ``(a, b)``; the noise is fixed by the spots asked for."""
    genes = list(model.genes_)

    def raw(adata, library_key=None, *args, **kwargs):
        truth = measured_expression(adata, genes).to_numpy()
        rng = np.random.default_rng(zlib.crc32("/".join(adata.obs_names).encode()))  # fixed by the spots asked for
        eps = rng.normal(0, noise_sd, (adata.n_obs, len(genes)))
        out = truth + eps
        j = genes.index(NOISE)
        out[:, j] = truth[:, j].mean() + 3 * eps[:, j]  # knows nothing of the spot
        if bias is not None:
            out = bias[0][None, :] + bias[1][None, :] * out
        return out.astype(np.float32)

    monkeypatch.setattr(model, "raw_outputs", raw)
    return model


def test_calibrated_intervals_cover_a_held_out_section_and_rank_the_noise_gene_last(hub, five, monkeypatch):
    model = _known_error(Pretrained("path2space", genes=[*GENES, NOISE]), monkeypatch)
    cal = select_sections(five, ["S0", "S1", "S2", "S3"])
    rel = model.calibrate(cal, library_key="section")
    assert list(rel.index) == [*GENES, NOISE] and set(rel["n_sections"]) == {4}, rel
    assert rel["reliability"].idxmin() == NOISE and not rel.loc[NOISE, "reliable"], rel.loc[NOISE].to_dict()
    assert rel.loc[GENES, "reliable"].all()
    test = select_sections(five, ["S4"])
    pred = model.predict(test, library_key="section")
    lo, hi = test.obsm["pretrained_lower"], test.obsm["pretrained_upper"]
    truth = measured_expression(test, model.genes_)
    covered = ((truth >= lo) & (truth <= hi)).to_numpy().mean(0)
    assert 0.85 <= covered.mean() <= 0.95, covered
    assert (lo.to_numpy() <= pred.to_numpy()).all() and (pred.to_numpy() <= hi.to_numpy()).all()
    meta = test.uns["st_predict"]["pretrained"]
    assert meta["calibrated"] and meta["interval_level"] == 0.9 and meta["scale"].startswith("log1p")
    # a lower level gives narrower bounds
    model.predict(test, library_key="section", key_added="p50", interval_level=0.5)
    assert (test.obsm["p50_upper"] - test.obsm["p50_lower"]).to_numpy().mean() < (hi - lo).to_numpy().mean()


def test_adapt_removes_a_planted_per_gene_bias_on_a_held_out_section(hub, five, monkeypatch):
    rng = np.random.default_rng(0)
    g = len(GENES) + 1
    bias = (rng.normal(0, 1.5, g), rng.uniform(0.3, 3.0, g))  # each gene on its own scale and offset
    cal = select_sections(five, ["S0", "S1", "S2", "S3"])
    test = select_sections(five, ["S4"])
    truth = measured_expression(test, [*GENES, NOISE]).to_numpy()
    errors = {}
    for how in ("calibrate", "adapt"):
        model = _known_error(Pretrained("path2space", genes=[*GENES, NOISE]), monkeypatch, bias=bias)
        model.calibrate(cal, library_key="section") if how == "calibrate" else model.adapt(cal, library_key="section")
        errors[how] = float(((model.get_predicted_expression(test, library_key="section", return_numpy=True)
                              - truth) ** 2).mean())
        if how == "adapt":
            assert model.calibration_["adapt"] == "affine" and "adapted: affine" in repr(model)
    assert errors["adapt"] < 0.5 * errors["calibrate"], errors
    with pytest.raises(InputError, match="at least two"):
        Pretrained("path2space", genes=GENES).adapt(select_sections(five, ["S0"]), library_key="section")


def test_save_and_load_keep_a_reference_and_the_calibration(hub, five, tmp_path, monkeypatch):
    model = _known_error(Pretrained("path2space", genes=[*GENES, NOISE]), monkeypatch)
    model.calibrate(select_sections(five, ["S0", "S1", "S2"]), library_key="section")
    model.save(tmp_path / "p")
    files = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert files == ["calibration.npz", "pretrained.json", "reliability.csv"]
    assert sum(p.stat().st_size for p in (tmp_path / "p").iterdir()) < 200_000  # a reference, not the weights
    loaded = Pretrained.load(tmp_path / "p")
    assert loaded.key == "path2space" and loaded.genes_ == model.genes_ and loaded.is_calibrated
    pd.testing.assert_frame_equal(loaded.gene_reliability_, model.gene_reliability_, check_dtype=False)
    test = select_sections(five, ["S4"])
    want = model.calibrated(model.raw_outputs(test, "section"), 0.9)
    got = loaded.calibrated(model.raw_outputs(test, "section"), 0.9)
    for a, b in zip((want[0], *want[1]), (got[0], *got[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # real outputs of the reloaded predictor: the same weights, read again from the cache
    fresh = Pretrained("path2space", genes=[*GENES, NOISE])
    np.testing.assert_allclose(Pretrained.load(tmp_path / "p").raw_outputs(test, "section"),
                               fresh.raw_outputs(test, "section"), rtol=1e-6)
    with pytest.raises(MissingFileError, match="model_path"):
        Pretrained.load(tmp_path / "p", model_path=tmp_path / "moved.pt2")
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "p")


# -- whole slides: a pyramidal TIFF of one large stained disc -------------------------------------------------------
SLIDE_MPP = 0.4


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory):
    """A 1,536 px (614 um) slide at 0.4 um/px: a textured purple disc covering half of it, on white."""
    from helpers import write_slide

    size = 1536
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.full((size, size, 3), 242, np.uint8)
    disc = (yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.4**2
    stripes = (np.sin(np.arange(size) * 2 * np.pi / 16) * 40).astype(np.int16)
    tex = np.array([150, 80, 160], np.int16) + stripes[None, :, None] + rng.integers(-20, 20, (size, size, 3))
    img[disc] = tex[disc].clip(0, 255).astype(np.uint8)
    return write_slide(tmp_path_factory.mktemp("slide") / "disc.tiff", img, SLIDE_MPP)


def _tile_sides_um(sdata, key):
    bounds = sdata.shapes[f"{key}_tiles"].geometry.bounds
    return (bounds["maxx"] - bounds["minx"]).to_numpy() * SLIDE_MPP


def test_path2space_predicts_a_slide_encoding_each_tile_once_and_calibrated_with_bounds(hub, five, slide_file,
                                                                                        monkeypatch):
    pytest.importorskip("lazyslide")
    model = Pretrained("path2space", genes=[*GENES, NOISE])
    calls = []
    model.encoder.register_forward_hook(lambda mod, args, out: calls.append(len(args[0])))
    sdata = model.predict_slide(slide_file, progress=False, image_mpp=None)
    table = sdata.tables["pretrained"]
    assert table.n_obs >= 8 and list(table.var_names) == [*GENES, NOISE]
    assert sum(calls) == table.n_obs  # each tile through the encoder once
    np.testing.assert_allclose(_tile_sides_um(sdata, "pretrained"), 100.0, rtol=0.02)  # Path2Space's 100 um tiles
    meta = table.uns["st_predict"]
    assert meta["predictor"] == "path2space" and meta["patch_size_um"] == 100.0 and meta["pitch_um"] == 100.0
    assert not meta["calibrated"] and "lower" not in table.layers
    # tile centres in the slide's level-0 pixels
    assert np.allclose(table.obsm["spatial"], sdata.shapes["pretrained_tiles"].geometry.centroid.get_coordinates())
    # the same slide again: its features are kept (keyed by the slide's content), no encoder call
    again = model.predict_slide(slide_file, progress=False, image_mpp=None, key_added="again").tables["again"]
    assert sum(calls) == table.n_obs
    np.testing.assert_allclose(again.X, table.X, rtol=1e-6)
    # calibrated (on a known-error stand-in): the slide's points are the scale map of the same outputs, with bounds
    _known_error(model, monkeypatch).calibrate(select_sections(five, ["S0", "S1", "S2"]), library_key="section")
    cal = model.predict_slide(slide_file, progress=False, image_mpp=None, key_added="cal").tables["cal"]
    assert sum(calls) == table.n_obs
    a, b = model.calibration_["params"]["scale"]
    np.testing.assert_allclose(cal.X, np.maximum(a + b * table.X, 0), rtol=1e-5, atol=1e-6)
    assert (cal.layers["lower"] <= cal.X).all() and (cal.X <= cal.layers["upper"]).all()
    assert (cal.layers["upper"] > cal.layers["lower"]).all()
    assert cal.var["reliable"].dtype == bool and cal.var.loc[NOISE, "reliability"] == cal.var["reliability"].min()
    assert cal.uns["st_predict"]["calibrated"] and cal.uns["st_predict"]["interval_level"] == 0.9
    with pytest.raises(InputError, match="tta"):
        model.predict_slide(slide_file, tta=True)


@pytest.fixture(scope="module")
def stpath_files(tmp_path_factory):
    pytest.importorskip("einops")
    return write_stpath(tmp_path_factory.mktemp("stpath"), GENES)


def test_stpath_predicts_a_slide_in_one_call_and_refuses_more_tiles_than_max_spots(slide_file, stpath_files):
    pytest.importorskip("lazyslide")
    weights, voc = stpath_files
    enc = Counting(1536)
    model = Pretrained("stpath", genes=GENES[:4], encoder=enc, model_path=weights, gene_voc_path=voc, tile_px=32)
    enc.seen = 0
    seen = []
    real = model.card.predict
    model.card.predict = lambda features, coords=None: (seen.append((len(features), np.asarray(coords))),
                                                        real(features, coords))[1]
    sdata = model.predict_slide(slide_file, progress=False, image_mpp=None)
    table = sdata.tables["pretrained"]
    n = table.n_obs
    assert n >= 8 and enc.seen == n and [k for k, _ in seen] == [n]  # every tile encoded once, one STPath call
    np.testing.assert_allclose(seen[0][1], table.obsm["spatial"])  # with the tiles' centres
    np.testing.assert_allclose(_tile_sides_um(sdata, "pretrained"), 112.0, rtol=0.02)  # STPath's 112 um tiles
    assert np.isfinite(table.X).all() and table.uns["st_predict"]["predictor"] == "stpath"
    # more tiles than STPath may see at once: refused before any tile is encoded, the error says what to change
    small = Counting(1536)
    capped = Pretrained("stpath", genes=GENES[:4], encoder=small, model_path=weights, gene_voc_path=voc, tile_px=32,
                        max_spots=n - 1)
    small.seen = 0
    with pytest.raises(InputError, match=rf"{n} tiles .* max_spots={n - 1}.*pitch_um="):
        capped.predict_slide(slide_file, progress=False, image_mpp=None)
    assert small.seen == 0
    with pytest.raises(InputError, match="user encoder module"):
        model.predict_slides([slide_file], slide_file + ".out")


def test_predict_slides_loads_the_saved_reference_in_each_worker(hub, slide_file, tmp_path):
    pytest.importorskip("distributed")
    import shutil

    import spatialdata
    from distributed import Client

    slides = [shutil.copy(slide_file, tmp_path / name) for name in ("a.tiff", "b.tiff")]
    model = Pretrained("path2space", genes=GENES, feature_cache=tmp_path / "cache")
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        manifest = model.predict_slides(slides, tmp_path / "out", client=client, image_mpp=None, progress=False)
    assert list(manifest["status"]) == ["done", "done"], manifest["error"].tolist()
    got = spatialdata.read_zarr(tmp_path / "out" / "a.zarr").tables["pretrained"]
    assert got.uns["st_predict"]["predictor"] == "path2space"
    # the worker's predictor wrote the features into this one's cache: predicting here runs no encoder, same values
    calls = []
    model.encoder.register_forward_hook(lambda mod, args, out: calls.append(len(args[0])))
    want = model.predict_slide(slides[0], image_mpp=None, progress=False).tables["pretrained"]
    assert calls == []
    np.testing.assert_allclose(got.X, want.X, rtol=1e-6)


def test_nh2st_frozen_on_the_same_encoder_reads_the_features_pretrained_wrote(hub, tissue, tmp_path, encoder_calls):
    """One section embedded once for a pretrained predictor and for NH2ST's frozen heads: NH2ST trained on CTransPath
    (frozen, the same 100 um patches at 224 px, one view) finds every section's features in the cache Path2Space
    wrote, and runs no encoder."""
    from st_predict import NH2ST

    adata = tissue.copy()
    Pretrained("path2space", genes=GENES, feature_cache=tmp_path / "fc").predict(adata, library_key="section")
    written = len(list((tmp_path / "fc").rglob("*.pt")))
    assert written == 3  # one entry per section
    NH2ST.setup_anndata(adata, library_key="section", patch_size_um=100.0)
    torch.manual_seed(0)
    model = NH2ST(adata, encoder="lazyslide:ctranspath", genes=GENES, latent_dim=32, n_heads=2)
    model.train(max_epochs=1, progress=False, feature_cache=tmp_path / "fc", augment="none")
    assert encoder_calls == [] and len(list((tmp_path / "fc").rglob("*.pt"))) == written
