"""NH2ST on encoders other than the ResNet18 (issue 16): a Hugging Face Hub id read from a local HF cache
offline, a lazyslide-models registry key with a local weights file, a timm name and a user's module. Each
trains and predicts on synthetic data, is saved and reloaded with its encoder, and feeds the feature cache.
No weights are downloaded: the tests write every checkpoint they load."""

import os

import numpy as np
import pytest
import torch
from helpers import REPO, setup, tiny_vit
from torch import nn

from st_predict import NH2ST
from st_predict.data import synthetic_tissue

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")

HEAD = {"latent_dim": 32, "n_heads": 4, "n_genes": 20}


@pytest.fixture(scope="module")
def small():
    """Two 5 x 5 training sections and one to predict."""
    tissue = synthetic_tissue(n_sections=3, n_rows=5, n_cols=5, n_genes=30, seed=3)
    return tissue[tissue.obs["section"] != "S2"].copy(), tissue[tissue.obs["section"] == "S2"].copy()


def _fit(adata, cache=None, epochs=2, train_kwargs=None, **kwargs):
    setup(adata, patch_size=32)
    torch.manual_seed(0)
    model = NH2ST(adata, **HEAD, **kwargs)
    model.train(max_epochs=epochs, progress=False, feature_cache=cache, **(train_kwargs or {}))
    return model


def _check_predicts(model, test, tta=None):
    pred = model.get_predicted_expression(test, tta=tta)
    assert pred.shape == (test.n_obs, HEAD["n_genes"])
    assert np.isfinite(pred.to_numpy()).all()
    assert pred.to_numpy().std(0).max() > 0  # the image reaches the prediction
    return pred


def test_hf_hub_id_from_the_offline_cache(small, hf_cache, tmp_path, encoder_calls):
    train, test = small
    model = _fit(train, tmp_path / "features", encoder=f"hf-hub:{REPO}")
    net = model.module
    assert net.settings.encoder == f"hf-hub:{REPO}" and net.trunk_mode == "frozen"
    assert net.image_size == 32  # the encoder's input size, not the recipe's
    assert net.encoder_info.mean == (0.6, 0.5, 0.7) and net.encoder_info.std == (0.2, 0.25, 0.2)
    for key, value in hf_cache.state_dict().items():  # the hub's weights, not a random ViT
        torch.testing.assert_close(net.trunk.state_dict()[key], value, rtol=0, atol=0)
    # the encoder's own normalisation is applied: the maps equal the ViT on (x - mean) / std
    patches = model._training_data().reader.read(np.arange(4))
    x = (patches.float() / 255 - torch.tensor((0.6, 0.5, 0.7)).view(1, 3, 1, 1)) / torch.tensor(
        (0.2, 0.25, 0.2)).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(net.trunk_features(patches)[:, :, 0, 0], hf_cache.eval()(x), rtol=1e-4, atol=1e-5)
    pred = _check_predicts(model, test)

    # predict through the cache: computed once per section, then read; the same values as without it
    encoder_calls.clear()
    cached = model.get_predicted_expression(test, feature_cache=tmp_path / "features")
    again = model.get_predicted_expression(test, feature_cache=tmp_path / "features")
    assert encoder_calls == [test.n_obs]
    np.testing.assert_allclose(cached.to_numpy(), pred.to_numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(again.to_numpy(), cached.to_numpy())
    model.get_predicted_expression(train, feature_cache=tmp_path / "features", tta=False)
    assert encoder_calls == [test.n_obs]  # the training sections' entries serve prediction too

    # a second train() on the same data runs the encoder on no patch; its maps equal fresh ones
    encoder_calls.clear()
    again = _fit(train, tmp_path / "features", encoder=f"hf-hub:{REPO}")
    assert encoder_calls == []
    torch.testing.assert_close(again._data.fmaps, model._data.fmaps, rtol=0, atol=0)
    fresh = _fit(train, None, encoder=f"hf-hub:{REPO}")
    torch.testing.assert_close(fresh._data.fmaps, model._data.fmaps, rtol=0, atol=0)

    # saved without the encoder's weights (rebuilt from the cache), reloaded, same predictions
    model.save(tmp_path / "m")
    assert os.path.getsize(tmp_path / "m" / "model.pt") < 0.5 * sum(
        v.numel() * v.element_size() for v in hf_cache.state_dict().values())
    loaded = NH2ST.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.get_predicted_expression(test).to_numpy(), pred.to_numpy(), rtol=1e-5, atol=1e-6)


def test_another_weights_file_or_patch_size_recomputes(small, hf_cache, tmp_path, encoder_calls):
    train, _ = small
    first, second = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save(hf_cache.state_dict(), first)
    torch.save(tiny_vit(1).state_dict(), second)
    cache = tmp_path / "features"
    _fit(train, cache, encoder=f"hf-hub:{REPO}", encoder_weights=first)
    assert sum(encoder_calls) == train.n_obs
    encoder_calls.clear()
    _fit(train, cache, encoder=f"hf-hub:{REPO}", encoder_weights=first)
    assert encoder_calls == []
    model = _fit(train, cache, encoder=f"hf-hub:{REPO}", encoder_weights=second)
    assert sum(encoder_calls) == train.n_obs
    assert "b.pth" in model.weights_source_
    encoder_calls.clear()
    setup(train, patch_size=40)  # another physical patch: other pixels reach the encoder
    model = NH2ST(train, **HEAD, encoder=f"hf-hub:{REPO}", encoder_weights=first)
    model.train(max_epochs=1, progress=False, feature_cache=cache)
    assert sum(encoder_calls) == train.n_obs


def test_loading_checks_and_names_the_encoder(small, hf_cache, tmp_path, monkeypatch):
    train, _ = small
    weights = tmp_path / "w.pth"
    torch.save(hf_cache.state_dict(), weights)
    model = _fit(train, None, epochs=1, encoder=f"hf-hub:{REPO}", encoder_weights=weights)
    model.save(tmp_path / "m")
    os.rename(weights, tmp_path / "moved.pth")  # another machine: the weights live elsewhere
    with pytest.raises(FileNotFoundError, match=r"hf-hub:testorg/tiny-vit.*encoder_weights=PATH"):
        NH2ST.load(tmp_path / "m")
    NH2ST.load(tmp_path / "m", encoder_weights=tmp_path / "moved.pth")  # found again
    torch.save(tiny_vit(7).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other weights"):
        NH2ST.load(tmp_path / "m", encoder_weights=tmp_path / "other.pth")
    # a hub id that is not in the cache: named, with how to get it
    with pytest.raises(FileNotFoundError, match=r"hf-hub:testorg/absent.*Download it once online"):
        NH2ST(train, **HEAD, encoder="hf-hub:testorg/absent")


class TinyMapEncoder(nn.Module):
    """A user's encoder: (B, 3, 48, 48) -> (B, 8, 3, 3) maps."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(3))

    def forward(self, x):
        return self.conv(x)


def test_a_user_module(small, tmp_path):
    train, test = small
    torch.manual_seed(2)
    encoder = TinyMapEncoder()
    model = _fit(train, None, encoder=encoder, image_size=48, pooling="flatten")
    info = model.module.encoder_info
    assert (info.output, info.out_channels, info.map_side, info.input_size) == ("map", 8, 3, 48)
    assert model.module.path_head.proj.in_features == 8 * 3 * 3
    assert model.module.trunk is encoder
    pred = _check_predicts(model, test)
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match=r"TinyMapEncoder.*encoder=<an instance"):
        NH2ST.load(tmp_path / "m")
    loaded = NH2ST.load(tmp_path / "m", encoder=TinyMapEncoder())  # a fresh instance: weights from the file
    np.testing.assert_allclose(loaded.get_predicted_expression(test).to_numpy(), pred.to_numpy(), rtol=1e-5, atol=1e-6)


def test_a_timm_name_with_random_weights_is_saved_whole(small, tmp_path):
    train, test = small
    # a ViT at 224 px on a CPU: one view per patch (the views are tested elsewhere)
    model = _fit(train, None, epochs=1, train_kwargs={"augment": "none"}, encoder="vit_tiny_patch16_224",
                 encoder_weights="random", image_size=224)
    assert model.module.settings.encoder == "timm:vit_tiny_patch16_224"
    assert model.module.saves_trunk  # random weights cannot be rebuilt from a name
    pred = _check_predicts(model, test, tta=False)
    model.save(tmp_path / "m")
    loaded = NH2ST.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.get_predicted_expression(test, tta=False).to_numpy(), pred.to_numpy(),
                               rtol=1e-5, atol=1e-6)


def test_a_lazyslide_registry_key_with_a_local_weights_file(small, tmp_path):
    pytest.importorskip("lazyslide_models")
    import timm
    from timm.layers import SwiGLUPacked

    train, test = small
    # GigaPath-Flash's architecture (a ViT-S/16 with SwiGLU), random weights written as its checkpoint
    torch.manual_seed(4)
    vit = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, img_size=224, patch_size=16, embed_dim=384,
        depth=12, num_heads=6, mlp_ratio=2048 / 384.0, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU,
        init_values=1e-5, global_pool="token", class_token=True, reg_tokens=0,
    )
    weights = tmp_path / "gigapath_flash.bin"
    torch.save(vit.state_dict(), weights)
    # a full-size ViT on a CPU: one view per patch in training and prediction (the views are tested elsewhere)
    model = _fit(train, tmp_path / "features", epochs=1, train_kwargs={"augment": "none"}, encoder="gigapath-flash",
                 encoder_weights=weights)
    net = model.module
    assert net.settings.encoder == "lazyslide:gigapath-flash"
    assert (net.image_size, net.encoder_info.out_channels) == (224, 384)
    torch.testing.assert_close(net.trunk.model.state_dict()["blocks.0.attn.qkv.weight"],
                               vit.state_dict()["blocks.0.attn.qkv.weight"], rtol=0, atol=0)
    pred = _check_predicts(model, test, tta=False)
    model.save(tmp_path / "m")
    loaded = NH2ST.load(tmp_path / "m")
    assert "gigapath_flash.bin" in loaded.weights_source_
    np.testing.assert_allclose(loaded.get_predicted_expression(test, tta=False).to_numpy(), pred.to_numpy(),
                               rtol=1e-5, atol=1e-5)


def test_predict_slide_streams_tiles_through_the_encoder(small, hf_cache, tmp_path):
    pytest.importorskip("lazyslide")
    from helpers import slide_tissue, write_slide

    train, _ = small
    model = _fit(train, None, epochs=1, encoder=f"hf-hub:{REPO}")
    path = write_slide(tmp_path / "slide.tif", slide_tissue(1024), mpp=0.5)
    batches = []
    model.module.trunk.register_forward_hook(lambda mod, args, out: batches.append(len(args[0])))
    sd = model.predict_slide(path, tile_size_um=32.0, pitch_um=40.0, batch_size=16, tta=False, progress=False)
    table = sd.tables["nh2st"]
    assert table.uns["st_predict"]["image_size"] == 32  # tiles read at the encoder's input size
    assert sum(batches) == table.n_obs > 16 and max(batches) <= 16  # every tile, in batches
    assert np.isfinite(table.X).all() and table.X.std(0).max() > 0


def test_command_line_trains_and_predicts_with_a_hub_encoder(small, hf_cache, tmp_path, encoder_calls):
    import anndata as ad

    from st_predict.cli._main import main

    train, test = small
    train.write_h5ad(tmp_path / "train.h5ad")
    test.write_h5ad(tmp_path / "test.h5ad")
    cache = str(tmp_path / "features")
    args = ["--patch-size", "32", "--n-genes", "20", "--epochs", "1", "--quiet", "--model-kwargs",
            '{"latent_dim": 32, "n_heads": 4}', "--encoder", f"hf-hub:{REPO}", "--feature-cache", cache]
    assert main(["train", str(tmp_path / "train.h5ad"), "--out", str(tmp_path / "m"), *args]) == 0
    assert sum(encoder_calls) == train.n_obs
    loaded = NH2ST.load(tmp_path / "m")
    assert loaded.module.settings.encoder == f"hf-hub:{REPO}" and loaded.module.trunk_mode == "frozen"
    for _ in range(2):
        assert main(["predict", str(tmp_path / "m"), str(tmp_path / "test.h5ad"), "--out", str(tmp_path / "p.h5ad"),
                     "--feature-cache", cache, "--overwrite", "--quiet"]) == 0
    assert sum(encoder_calls) == train.n_obs + test.n_obs  # the second predict read the cache
    pred = ad.read_h5ad(tmp_path / "p.h5ad").obsm["nh2st"]
    np.testing.assert_allclose(pred.to_numpy(), loaded.get_predicted_expression(test).to_numpy(), rtol=1e-5, atol=1e-5)


def test_fine_tuning_the_last_blocks_of_a_hub_encoder(small, hf_cache, tmp_path):
    """trunk='finetune' trains a hub encoder end to end (saved with the model); finetune_blocks=1 trains only
    its last transformer block and final norm."""
    train, test = small
    before = {k: v.clone() for k, v in hf_cache.state_dict().items()}
    model = _fit(train, None, epochs=2, encoder=f"hf-hub:{REPO}", trunk="finetune", finetune_blocks=1)
    after = model.module.trunk.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("blocks.1.") for k in changed) and any(k.startswith("norm.") for k in changed)
    assert not any(k.startswith(("blocks.0.", "patch_embed.", "cls_token", "pos_embed")) for k in changed)
    assert model.module.saves_trunk  # fine-tuned weights cannot be rebuilt from the hub
    pred = _check_predicts(model, test)
    model.save(tmp_path / "m")
    loaded = NH2ST.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.get_predicted_expression(test).to_numpy(), pred.to_numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="has 2 blocks"):
        NH2ST(train, **HEAD, encoder=f"hf-hub:{REPO}", trunk="finetune", finetune_blocks=3)


@pytest.fixture
def phikon_cache(tmp_path, monkeypatch):
    """A tiny random ViT written as the Hub repo ``owkin/phikon`` (the registry's Phikon card loads it with
    transformers, ``ViTModel`` plus its own ``AutoImageProcessor``; no ``img_size``) in a local HF cache, offline.
    The processor resizes to 32 px and normalises with mean (0.6, 0.5, 0.7), std (0.2, 0.25, 0.2)."""
    pytest.importorskip("lazyslide_models")
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64), add_pooling_layer=False)
    repo = tmp_path / "hf" / "hub" / "models--owkin--phikon"
    snapshot = repo / "snapshots" / ("1" * 40)
    vit.save_pretrained(snapshot)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.6, 0.5, 0.7],
                      image_std=[0.2, 0.25, 0.2]).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return vit.eval()


def test_a_registry_card_with_its_own_processor_is_normalised_once(small, phikon_cache, tmp_path):
    """Phikon's card has no img_size and normalises in its own image processor: its input size and normalisation
    come from that processor, and the patches reach the ViT normalised once (not rescaled and normalised again)."""
    train, test = small
    model = _fit(train, epochs=1, encoder="phikon")
    net = model.module
    assert net.settings.encoder == "lazyslide:phikon" and net.trunk_mode == "frozen" and net.image_size == 32
    assert net.encoder_info.mean == (0.6, 0.5, 0.7) and net.encoder_info.std == (0.2, 0.25, 0.2)
    seen = []  # what the card's ViT receives
    net.trunk.model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["pixel_values"]),
                                              with_kwargs=True)
    patches = model._training_data().reader.read(np.arange(4))
    with torch.no_grad():
        out = net.trunk_features(patches)[:, :, 0, 0]
    x = (patches.float() / 255 - torch.tensor((0.6, 0.5, 0.7)).view(1, 3, 1, 1)) / torch.tensor(
        (0.2, 0.25, 0.2)).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[-1].float(), x, rtol=1e-5, atol=1e-5)  # once: exactly (x / 255 - mean) / std
    with torch.no_grad():
        torch.testing.assert_close(out, phikon_cache(pixel_values=x).last_hidden_state[:, 0], rtol=1e-4, atol=1e-5)
    pred = _check_predicts(model, test)
    model.save(tmp_path / "m")
    np.testing.assert_allclose(NH2ST.load(tmp_path / "m").get_predicted_expression(test).to_numpy(), pred.to_numpy(),
                               rtol=1e-5, atol=1e-5)


def test_a_bug_inside_the_encoder_keeps_its_traceback(small, monkeypatch, tmp_path, capsys):
    """build_encoder turns only missing or unreadable weights into its 'download the weights' error; anything else
    is a bug, raised as it is, and the command line shows its traceback and exits 1."""
    from st_predict.cli import main
    from st_predict.nn import ENCODER_SOURCES, build_encoder

    def broken(self, name, weights, image_size, load_weights):
        return {}["a bug"]  # a KeyError in st_predict's own code

    monkeypatch.setattr(type(ENCODER_SOURCES["timm:"]), "build", broken)
    with pytest.raises(KeyError, match="a bug"):
        build_encoder("timm:vit_tiny_patch16_224", "random")
    train, _ = small
    train.write_h5ad(tmp_path / "train.h5ad")
    code = main(["train", str(tmp_path / "train.h5ad"), "--out", str(tmp_path / "m"), "--patch-size", "32",
                 "--epochs", "1", "--quiet", "--encoder", "timm:vit_tiny_patch16_224", "--encoder-weights",
                 str(tmp_path / "train.h5ad")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "KeyError: 'a bug'" in err and "download" not in err.lower()
