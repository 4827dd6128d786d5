import os

import pytest

os.environ.setdefault("MPLBACKEND", "agg")

@pytest.fixture(scope="session")
def tissue():
    """Three 10 x 10 synthetic sections, 60 genes, 32 px spot spacing (read-only: copy before use)."""
    from st_predict.data import synthetic_tissue

    return synthetic_tissue(n_sections=3, n_rows=10, n_cols=10, n_genes=60, seed=0)


@pytest.fixture
def split(tissue):
    """(train = S0 + S1, test = S2) copies of the synthetic tissue."""
    train = tissue[tissue.obs["section"] != "S2"].copy()
    test = tissue[tissue.obs["section"] == "S2"].copy()
    return train, test


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """``helpers.tiny_vit`` (seed 0) saved as the Hub repo testorg/tiny-vit in an HF cache, with
    HF_HUB_OFFLINE=1 and the encoder's own normalisation (mean 0.6/0.5/0.7, std 0.2/0.25/0.2)."""
    import timm
    from helpers import TINY_VIT, tiny_vit

    net = tiny_vit(0)
    repo = tmp_path / "hf" / "hub" / "models--testorg--tiny-vit"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    cfg = {**net.pretrained_cfg, "input_size": (3, 32, 32), "mean": (0.6, 0.5, 0.7), "std": (0.2, 0.25, 0.2)}
    cfg = {k: v for k, v in cfg.items() if k not in ("hf_hub_id", "url")}
    timm.models.save_for_hf(net, str(snapshot), model_config={"pretrained_cfg": cfg}, model_args=TINY_VIT,
                            safe_serialization=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    # huggingface_hub reads these once, at import
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return net


@pytest.fixture
def encoder_calls(monkeypatch):
    """The number of spots each call of the frozen-encoder path (``compute_fmaps`` in training and prediction)
    runs through the encoder, in order: a cache hit adds nothing."""
    import st_predict.model._training as training

    seen = []
    real = training.compute_fmaps

    def counting(module, read_patches, n_spots=None, **kwargs):
        seen.append(n_spots)
        return real(module, read_patches, n_spots, **kwargs)

    monkeypatch.setattr(training, "compute_fmaps", counting)
    return seen

