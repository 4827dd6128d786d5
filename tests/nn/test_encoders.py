"""Tests for the trunk, its weight loading, the pathology head, the MLPs and the gene tokenizer."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18

from st_predict.nn import GeneTokenizer, PathologyHead, TwoLayerMLP, build_resnet18_trunk, load_trunk_weights

IMAGENET_FILE = "resnet18-f37072fd.pth"


# -- trunk ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "out"), [(224, 7), (64, 2)])
def test_trunk_output_shape(size, out):
    torch.manual_seed(0)
    trunk = build_resnet18_trunk().eval()
    with torch.no_grad():
        fmap = trunk(torch.randn(2, 3, size, size))
    assert fmap.shape == (2, 512, out, out)


def test_trunk_is_resnet18_without_pool_and_fc():
    trunk = build_resnet18_trunk()
    ref = resnet18()
    n_ref = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("fc."))
    assert sum(p.numel() for p in trunk.parameters()) == n_ref
    assert len(trunk) == 8


# -- load_trunk_weights --------------------------------------------------------------------------


def _resnet_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = resnet18().state_dict()
    # non-default BatchNorm buffers, so that loading buffers is checked too
    state["bn1.running_mean"] = torch.randn(64)
    state["layer4.1.bn2.running_var"] = torch.rand(512) + 0.5
    return state


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A private, empty torch hub cache; any download attempt fails like an offline machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # restored after the test

    def _no_network(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    assert torch.hub.get_dir() == str(tmp_path / "hub")
    return tmp_path / "hub" / "checkpoints"


def test_load_imagenet_weights_from_hub_cache(offline_hub):
    state = _resnet_state(1)
    offline_hub.mkdir(parents=True)
    torch.save(state, offline_hub / IMAGENET_FILE)
    torch.manual_seed(2)
    trunk = build_resnet18_trunk()
    assert not torch.equal(trunk[0].weight, state["conv1.weight"])
    desc = load_trunk_weights(trunk, "imagenet")
    assert "IMAGENET1K_V1" in desc
    torch.testing.assert_close(trunk[0].weight.detach(), state["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(trunk[1].running_mean, state["bn1.running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(trunk[7][1].bn2.running_var, state["layer4.1.bn2.running_var"], rtol=0, atol=0)
    torch.testing.assert_close(
        trunk[6][0].downsample[0].weight.detach(), state["layer3.0.downsample.0.weight"], rtol=0, atol=0
    )


def test_load_imagenet_weights_offline_falls_back_to_random(offline_hub):
    torch.manual_seed(3)
    trunk = build_resnet18_trunk()
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    with pytest.warns(UserWarning, match="RANDOMLY") as record:
        desc = load_trunk_weights(trunk, "imagenet")
    assert "random" in desc
    # the failure came from the (patched) download, i.e. the cache was looked up and missed
    assert any("offline" in str(w.message) for w in record)
    for k, v in trunk.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not (offline_hub / IMAGENET_FILE).exists()


@pytest.mark.parametrize("weights", [None, "random"])
def test_load_random_keeps_trunk(weights):
    torch.manual_seed(4)
    trunk = build_resnet18_trunk()
    before = trunk[0].weight.detach().clone()
    desc = load_trunk_weights(trunk, weights)
    assert "random" in desc
    assert torch.equal(trunk[0].weight, before)


@pytest.mark.parametrize("layout", ["prefixed", "nested", "trunk", "ciga"])
def test_load_weights_from_user_file(tmp_path, layout):
    state = _resnet_state(5)
    if layout == "ciga":
        # the layout of Ciga et al.'s tenpercent_resnet18.ckpt (the NH2ST authors' trunk): a Lightning
        # checkpoint whose state dict keys carry "model.resnet.", with the SSL projection's fc beside them
        fc = {"model.resnet.fc.1.weight": torch.randn(512, 512), "model.resnet.fc.1.bias": torch.zeros(512)}
        obj = {
            "epoch": 20, "global_step": 1000, "pytorch-lightning_version": "1.0.0",
            "state_dict": {**{"model.resnet." + k: v for k, v in state.items() if not k.startswith("fc.")}, **fc},
            "optimizer_states": [], "lr_schedulers": [],
        }
    elif layout == "prefixed":
        obj = {"module.model." + k: v for k, v in state.items()}
    elif layout == "nested":
        obj = {"state_dict": {"module.model." + k: v for k, v in state.items()}, "epoch": 3}
    else:  # a trunk's own state dict (nn.Sequential indices), e.g. from a previous NH2ST run
        src = build_resnet18_trunk()
        load_trunk_weights(src, _save(tmp_path / "src.pt", state))
        obj = {"trunk." + k: v for k, v in src.state_dict().items()}
    path = _save(tmp_path / f"my_ssl_{layout}.ckpt", obj)
    torch.manual_seed(6)
    trunk = build_resnet18_trunk()
    desc = load_trunk_weights(trunk, path)
    assert path.name in desc
    layer4 = trunk[7][0].conv1.weight.detach()
    torch.testing.assert_close(layer4, state["layer4.0.conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(trunk[1].running_mean, state["bn1.running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(trunk[0].weight.detach(), state["conv1.weight"], rtol=0, atol=0)


def _save(path, obj):
    torch.save(obj, path)
    return path


def test_load_weights_rejects_non_matching_file(tmp_path):
    trunk = build_resnet18_trunk()
    with pytest.raises(ValueError):
        load_trunk_weights(trunk, _save(tmp_path / "other.pt", {"encoder.foo.weight": torch.zeros(3, 3)}))
    # a partial ResNet18 (layer4 missing) is refused rather than silently half-loaded
    state = {k: v for k, v in resnet18().state_dict().items() if not k.startswith("layer4.")}
    with pytest.raises(ValueError, match="lacks"):
        load_trunk_weights(trunk, _save(tmp_path / "partial.pt", state))
    with pytest.raises(ValueError):
        load_trunk_weights(trunk, _save(tmp_path / "list.pt", [1, 2, 3]))


def test_load_weights_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_trunk_weights(build_resnet18_trunk(), tmp_path / "nope.pth")


# -- PathologyHead -------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["flatten", "avg"])
def test_pathology_head_shapes(pooling):
    torch.manual_seed(7)
    head = PathologyHead(map_size=2, latent_dim=32, pooling=pooling, with_tokens=True)
    fmap = torch.randn(3, 512, 2, 2)
    assert head(fmap).shape == (3, 32)
    assert head.tokens(fmap).shape == (3, 4, 32)
    assert head.proj.in_features == (512 * 4 if pooling == "flatten" else 512)


def test_pathology_head_pooling_semantics():
    torch.manual_seed(8)
    fmap = torch.randn(3, 512, 2, 2)
    flipped = fmap.flip(-1)
    avg = PathologyHead(2, 16, "avg")
    torch.testing.assert_close(avg(fmap), avg.proj(fmap.mean((2, 3))))
    torch.testing.assert_close(avg(flipped), avg(fmap))  # average pooling ignores positions
    flat = PathologyHead(2, 16, "flatten")
    torch.testing.assert_close(flat(fmap), flat.proj(fmap.reshape(3, -1)))
    assert not torch.allclose(flat(flipped), flat(fmap))


def test_pathology_head_tokens_are_per_position():
    torch.manual_seed(9)
    head = PathologyHead(2, 16, with_tokens=True)
    fmap = torch.randn(2, 512, 2, 2)
    tokens = head.tokens(fmap)
    for i in range(2):
        for j in range(2):
            expected = head.token_proj(fmap[:, :, i, j]) + head.token_pos[0, 2 * i + j]
            torch.testing.assert_close(tokens[:, 2 * i + j], expected)


def test_pathology_head_errors():
    with pytest.raises(RuntimeError, match="tokens"):
        PathologyHead(2, 16).tokens(torch.randn(1, 512, 2, 2))
    with pytest.raises(ValueError, match="pooling"):
        PathologyHead(2, 16, pooling="max")


# -- TwoLayerMLP ---------------------------------------------------------------------------------


def _linearity_gap(activation: str) -> float:
    torch.manual_seed(10)
    mlp = TwoLayerMLP(6, 16, 4, activation=activation).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    a, b = 1.7, -2.3
    f0 = mlp(torch.zeros(1, 6, dtype=torch.float64))
    lhs = mlp(a * x + b * y) - f0
    rhs = a * (mlp(x) - f0) + b * (mlp(y) - f0)
    return (lhs - rhs).abs().max().item()


def test_two_layer_mlp_without_activation_is_linear():
    assert _linearity_gap("none") < 1e-10


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_two_layer_mlp_with_activation_is_not_linear(activation):
    assert _linearity_gap(activation) > 1e-2


def test_two_layer_mlp_structure_and_errors():
    mlp = TwoLayerMLP(6, 16, 4, activation="relu")
    assert mlp(torch.randn(3, 6)).shape == (3, 4)
    assert isinstance(mlp[1], torch.nn.ReLU)
    assert (mlp[0].in_features, mlp[0].out_features, mlp[-1].out_features) == (6, 16, 4)
    with pytest.raises(ValueError, match="activation"):
        TwoLayerMLP(6, 16, 4, activation="tanh")


# -- GeneTokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_genes", "n_tokens"), [(12, 4), (10, 4), (7, 7), (9, 1)])
def test_gene_tokenizer_shape_and_locality(n_genes, n_tokens):
    torch.manual_seed(11)
    tok = GeneTokenizer(n_genes, n_tokens, latent_dim=8)
    y = torch.randn(3, n_genes)
    out = tok(y)
    assert out.shape == (3, n_tokens, 8)
    # near-equal contiguous groups (sizes differ by at most one), as torch.tensor_split makes them
    owners = torch.cat([torch.full((len(g),), t) for t, g in enumerate(torch.tensor_split(torch.arange(n_genes), n_tokens))])
    for gene in range(n_genes):
        y2 = y.clone()
        y2[:, gene] += 1.0
        diff = (tok(y2) - out).abs().amax(dim=(0, 2))  # (n_tokens,)
        owner = int(owners[gene])
        assert diff[owner] > 1e-4, (gene, owner)
        others = torch.cat([diff[:owner], diff[owner + 1 :]])
        assert torch.all(others == 0), (gene, diff)


def test_gene_tokenizer_group_zero_only_moves_token_zero():
    torch.manual_seed(12)
    tok = GeneTokenizer(10, 4, latent_dim=8)
    y = torch.randn(2, 10)
    y2 = y.clone()
    y2[:, 1] = 5.0  # gene 1 belongs to group 0 (genes 0..2)
    a, b = tok(y), tok(y2)
    torch.testing.assert_close(a[:, 1:], b[:, 1:], rtol=0, atol=0)
    assert not torch.allclose(a[:, 0], b[:, 0])


def test_gene_tokenizer_accepts_non_contiguous_input():
    # the module feeds expression[:, 0] (a strided view) to the tokenizer
    torch.manual_seed(13)
    tok = GeneTokenizer(12, 4, latent_dim=8)
    y = torch.randn(3, 5, 12)
    torch.testing.assert_close(tok(y[:, 0]), tok(y[:, 0].contiguous()))


def test_gene_tokenizer_every_token_sees_a_gene():
    torch.manual_seed(14)
    tok = GeneTokenizer(17, 16, latent_dim=4)
    y = torch.randn(3, 17)
    out = tok(y)
    varies = (out - out[:1]).abs().amax(dim=(0, 2)) > 0  # does token t change across samples?
    assert bool(varies.all()), f"constant tokens: {(~varies).nonzero().flatten().tolist()}"


@pytest.mark.parametrize("n_tokens", [0, 13])
def test_gene_tokenizer_rejects_bad_token_count(n_tokens):
    with pytest.raises(ValueError, match="n_gene_tokens"):
        GeneTokenizer(12, n_tokens, 8)


def test_offline_imagenet_is_tried_and_said_once_and_blamed_on_the_caller(offline_hub, monkeypatch, capsys):
    import warnings

    calls = []

    def _no_network(url, dst, *args, **kwargs):
        calls.append(url)
        raise OSError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        load_trunk_weights(build_resnet18_trunk(), "imagenet")
        desc = load_trunk_weights(build_resnet18_trunk(), "imagenet")
    assert "random" in desc and len(calls) == 1  # the second trunk does not try the network again
    assert [str(w.message).count("RANDOMLY") for w in record] == [1]
    assert record[0].filename == __file__  # the line that called st_predict, not st_predict's or torch's
    assert "Downloading" not in capsys.readouterr().out  # torch.hub's line is not printed when nothing came
    # weights put into the cache afterwards are found
    offline_hub.mkdir(parents=True, exist_ok=True)
    torch.save(_resnet_state(1), offline_hub / IMAGENET_FILE)
    assert "IMAGENET1K_V1" in load_trunk_weights(build_resnet18_trunk(), "imagenet")
