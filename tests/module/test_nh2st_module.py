"""Tests for :class:`st_predict.module.NH2STModule`, its batches (:class:`NH2STCollate`) and
:func:`st_predict.nn.random_dihedral`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from st_predict.module import NH2STModule
from st_predict.nn import DenseGraphConv, HypergraphConv, info_nce
from st_predict.nn._augment import random_dihedral
from st_predict.train import NH2STCollate

N_SPOTS, N_GENES, IMAGE, LATENT = 24, 12, 64, 32
TARGETS = [3, 7, 11, 0, 20, 15]
LAMBDA_Q, LAMBDA_N = 0.7, 0.3


def _neighbors(k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(N_SPOTS):
        others = torch.tensor([j for j in range(N_SPOTS) if j != i])
        rows.append(others[torch.randperm(N_SPOTS - 1, generator=gen)[:k]])
    return torch.stack(rows)


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    return {
        "expression": torch.randn(N_SPOTS, N_GENES),
        "fmaps": torch.randn(N_SPOTS, 512, IMAGE // 32, IMAGE // 32),
        "patches": torch.randint(0, 256, (N_SPOTS, 3, IMAGE, IMAGE), dtype=torch.uint8),
        "neighbors": {4: _neighbors(4, 1), 8: _neighbors(8, 2)},
    }


def _fmap_batch(data, k: int | None = 4, targets=TARGETS) -> dict[str, torch.Tensor]:
    neighbors = data["neighbors"][k] if k else None
    return NH2STCollate(data["expression"], neighbors, fmaps=data["fmaps"])(targets)


def _patch_batch(data, k: int | None = 4, targets=TARGETS) -> dict[str, torch.Tensor]:
    neighbors = data["neighbors"][k] if k else None
    return NH2STCollate(data["expression"], neighbors, patches=data["patches"])(targets)


def _module(**kwargs) -> NH2STModule:
    torch.manual_seed(kwargs.pop("seed", 0))
    defaults = {
        "n_genes": N_GENES, "latent_dim": LATENT, "image_size": IMAGE, "n_heads": 4, "n_neighbors": 4, "hyperedge_degree": 3,
        "translator_hidden": 16, "n_gene_tokens": 4, "lambda_query": LAMBDA_Q, "lambda_neighbor": LAMBDA_N,
        "temperature": 0.1, "trunk": "frozen",
        # each spot from its own patch (test_context.py covers the neighbourhood translator)
        "context": "patch",
        # no dropout anywhere unless a test asks for it (the default recipe drops genes and translator inputs)
        "gene_dropout": 0.0, "translator_dropout": None,
    }
    defaults.update(kwargs)
    return NH2STModule(**defaults)


def _assert_grad(param: torch.nn.Parameter, name: str) -> None:
    assert param.grad is not None, f"{name} got no gradient"
    assert param.grad.abs().sum() > 0, f"{name} got a zero gradient"


# -- loss and ablations --------------------------------------------------------------------------


def test_loss_terms_are_finite_and_combine_as_eq5(data):
    module = _module()
    module.train()
    losses = module.loss(_fmap_batch(data))
    assert set(losses) == {"loss", "mse", "nce_query", "nce_neighbor"}
    for key, value in losses.items():
        assert value.ndim == 0, key
        assert torch.isfinite(value), key
    assert losses["nce_query"] > 0 and losses["nce_neighbor"] > 0
    expected = losses["mse"] + LAMBDA_Q * losses["nce_query"] + LAMBDA_N * losses["nce_neighbor"]
    torch.testing.assert_close(losses["loss"], expected)


def test_forward_terms_match_their_definitions(data):
    module = _module()
    batch = _fmap_batch(data)
    out = module(batch)
    target_maps = data["fmaps"][TARGETS]
    pred = module.translator(module.path_head(target_maps))
    torch.testing.assert_close(out["prediction"], pred)
    torch.testing.assert_close(out["h_path"], module.path_head(target_maps))
    torch.testing.assert_close(out["mse"], F.mse_loss(pred, data["expression"][TARGETS]))
    torch.testing.assert_close(out["nce_query"], info_nce(out["z_path"], out["z_gene"], 0.1))
    with torch.no_grad():
        torch.testing.assert_close(module.predict_expression({"fmaps": target_maps}), pred)


def test_neighbor_branch_uses_neighbours_only_in_its_own_term(data):
    module = _module()
    batch = _fmap_batch(data)
    ref = module.loss(batch)
    # change the expression of a neighbour node (not a target): only the neighbour term moves
    perturbed = dict(batch)
    perturbed["expression"] = batch["expression"].clone()
    perturbed["expression"][:, 1:] += 3.0 * torch.randn_like(batch["expression"][:, 1:])
    new = module.loss(perturbed)
    torch.testing.assert_close(new["mse"], ref["mse"])
    torch.testing.assert_close(new["nce_query"], ref["nce_query"])
    assert not torch.allclose(new["nce_neighbor"], ref["nce_neighbor"])
    # same for the pathology side: change the maps of spots that are only neighbours
    only_neighbours = torch.ones(batch["fmaps"].shape[0], dtype=torch.bool)
    only_neighbours[batch["node_map"][:, 0]] = False
    assert only_neighbours.any()
    perturbed = dict(batch)
    perturbed["fmaps"] = batch["fmaps"].clone()
    perturbed["fmaps"][only_neighbours] = torch.randn_like(batch["fmaps"][only_neighbours])
    new = module.loss(perturbed)
    torch.testing.assert_close(new["mse"], ref["mse"])
    torch.testing.assert_close(new["nce_query"], ref["nce_query"])
    assert not torch.allclose(new["nce_neighbor"], ref["nce_neighbor"])


ABLATIONS = {
    "default": {},
    "query_only": {"use_neighbor_branch": False},
    "attn_cross": {"attention": "cross"},
    "attn_self": {"attention": "self"},
    "attn_none": {"attention": "none"},
    "tokens_cross": {"attention_mode": "tokens"},
    "tokens_self": {"attention_mode": "tokens", "attention": "self"},
    "no_contrastive": {"contrastive": False},
    "graph": {"graph": "graph"},
    "hg_sym": {"hypergraph_norm": "sym"},
    "shared_attention": {"share_attention": True},
    "symmetric_nce": {"symmetric_nce": True},
    "avg_pooling": {"pooling": "avg"},
    "no_activation": {"activation": "none"},
    "k4": {"n_neighbors": 4},
    "k8": {"n_neighbors": 8},
    "hgnn1": {"n_hgnn_layers": 1},
    "hgnn3": {"n_hgnn_layers": 3},
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_ablation_runs_forward_and_backward(data, name):
    kwargs = ABLATIONS[name]
    module = _module(**kwargs)
    module.train()
    k = kwargs.get("n_neighbors", 4) if kwargs.get("use_neighbor_branch", True) else None
    batch = _fmap_batch(data, k)
    assert batch["node_map"].shape == (len(TARGETS), (k or 0) + 1)
    out = module(batch)
    for key in ("loss", "mse", "nce_query", "nce_neighbor"):
        assert out[key].ndim == 0 and torch.isfinite(out[key]), key
    torch.testing.assert_close(
        out["loss"], out["mse"] + LAMBDA_Q * out["nce_query"] + LAMBDA_N * out["nce_neighbor"]
    )
    out["loss"].backward()
    _assert_grad(module.path_head.proj.weight, "path_head.proj")
    _assert_grad(module.translator[-1].weight, "translator")
    for p in module.trunk.parameters():
        assert p.grad is None

    contrastive = kwargs.get("contrastive", True)
    neighbor = kwargs.get("use_neighbor_branch", True)
    attention = kwargs.get("attention", "cross")
    if contrastive:
        assert out["nce_query"] > 0
        sym = kwargs.get("symmetric_nce", False)
        torch.testing.assert_close(out["nce_query"], info_nce(out["z_path"], out["z_gene"], 0.1, sym))
        _assert_grad(module.gene_encoder[0].weight, "gene_encoder")
    else:
        assert out["nce_query"].item() == 0.0 and out["nce_neighbor"].item() == 0.0
        torch.testing.assert_close(out["loss"], out["mse"])
        assert module.attn_query is None and module.hgnn_path is None
        assert module.gene_encoder is None  # no parameters that the loss cannot use
    if contrastive and neighbor:
        assert out["nce_neighbor"] > 0
        for enc_name in ("hgnn_path", "hgnn_gene"):
            enc = getattr(module, enc_name)
            assert len(enc.convs) == kwargs.get("n_hgnn_layers", 2)
            _assert_grad(enc.convs[0].lin.weight, f"{enc_name}.convs[0]")
    if not neighbor:
        assert out["nce_neighbor"].item() == 0.0
        assert module.hgnn_path is None and module.attn_neighbor is None
    if contrastive and attention != "none":
        _assert_grad(module.attn_query.v_proj.weight, "attn_query")
    if attention == "none" and contrastive:
        assert module.attn_query is None and module.attn_neighbor is None
        torch.testing.assert_close(out["z_path"], out["h_path"])  # no refinement at all
        torch.testing.assert_close(out["z_gene"], module.gene_encoder(batch["expression"][:, 0]))
    if kwargs.get("attention_mode") == "tokens":
        _assert_grad(module.gene_tokenizer.weight, "gene_tokenizer")
        _assert_grad(module.path_head.token_proj.weight, "path_head.token_proj")
    else:
        assert module.gene_tokenizer is None and module.path_head.token_proj is None

    # construction details of the switches
    if name == "graph":
        assert all(isinstance(c, DenseGraphConv) for c in module.hgnn_path.convs)
    if name in ("default", "hg_sym"):
        assert all(isinstance(c, HypergraphConv) for c in module.hgnn_gene.convs)
        assert module.hgnn_gene.convs[0].normalization == kwargs.get("hypergraph_norm", "rw")
    if name == "shared_attention":
        assert module.attn_neighbor is module.attn_query
    if name == "default":
        assert module.attn_neighbor is not module.attn_query
    if name == "avg_pooling":
        assert module.path_head.proj.in_features == 512
    if name == "no_activation":
        assert isinstance(module.gene_encoder[1], torch.nn.Identity)
        assert isinstance(module.translator[1], torch.nn.Identity)


def test_self_and_cross_attention_differ(data):
    batch = _fmap_batch(data)
    cross = _module(attention="cross", seed=5)
    self_ = _module(attention="self", seed=5)
    self_.load_state_dict(cross.state_dict())
    out_c, out_s = cross(batch), self_(batch)
    torch.testing.assert_close(out_c["mse"], out_s["mse"])
    assert not torch.allclose(out_c["z_path"], out_s["z_path"])


def test_symmetric_nce_changes_the_loss(data):
    batch = _fmap_batch(data)
    one = _module(seed=6)
    both = _module(symmetric_nce=True, seed=6)
    both.load_state_dict(one.state_dict())
    a, b = one.loss(batch), both.loss(batch)
    assert not torch.allclose(a["nce_query"], b["nce_query"])


def test_forward_rejects_wrong_neighbourhood_size(data):
    module = _module(n_neighbors=8)
    with pytest.raises(ValueError, match="K \\+ 1"):
        module(_fmap_batch(data, 4))
    with pytest.raises(ValueError, match="disagree"):
        batch = _fmap_batch(data, 4)
        module(dict(batch, expression=batch["expression"][:, :3]))


# -- trunk modes ---------------------------------------------------------------------------------


def test_frozen_trunk_gets_no_gradient_and_stays_in_eval(data):
    module = _module(trunk="frozen")
    module.train()
    assert module.training and module.path_head.training
    assert not module.trunk.training
    assert all(not m.training for m in module.trunk.modules())
    assert all(not p.requires_grad for p in module.trunk.parameters())
    running = module.trunk[1].running_mean.clone()
    batch = _patch_batch(data)
    out = module(batch)
    out["loss"].backward()
    for name, p in module.trunk.named_parameters():
        assert p.grad is None, name
    _assert_grad(module.path_head.proj.weight, "path_head.proj")
    torch.testing.assert_close(module.trunk[1].running_mean, running, rtol=0, atol=0)
    module.eval()
    assert not module.trunk.training and not module.path_head.training
    module.train()
    assert not module.trunk.training


def test_frozen_trunk_is_in_eval_mode_right_after_construction(data):
    module = _module(trunk="frozen")
    running = module.trunk[1].running_mean.clone()
    module.loss(_patch_batch(data))
    assert not module.trunk.training
    torch.testing.assert_close(module.trunk[1].running_mean, running, rtol=0, atol=0)


def test_finetuned_trunk_gets_gradients(data):
    module = _module(trunk="finetune")
    module.train()
    assert module.trunk.training
    batch = _patch_batch(data)
    assert batch["patches"].dtype == torch.uint8 and batch["patches"].shape[1:] == (3, IMAGE, IMAGE)
    module.loss(batch)["loss"].backward()
    _assert_grad(module.trunk[0].weight, "trunk.conv1")
    _assert_grad(module.trunk[7][1].conv2.weight, "trunk.layer4")


def test_predict_expression_from_patches(data):
    module = _module(trunk="finetune").eval()
    patches = data["patches"][:5]
    pred = module.predict_expression({"patches": patches})
    assert pred.shape == (5, N_GENES)
    assert not pred.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(pred, module.translator(module.path_head(module.trunk_features(patches))))
        # uint8 patches are scaled to [0, 1] and normalised with the ImageNet statistics
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        fmaps = module.trunk((patches.float() / 255.0 - mean) / std)
        torch.testing.assert_close(pred, module.translator(module.path_head(fmaps)))
        torch.testing.assert_close(module.predict_expression({"patches": patches.float() / 255.0}), pred)
        torch.testing.assert_close(module.predict_expression({"fmaps": fmaps}), pred)
        torch.testing.assert_close(module.latent({"patches": patches}), module.path_head(fmaps))
    with pytest.raises(ValueError, match="image_size"):
        module.predict_expression({"patches": torch.zeros(1, 3, 32, 32, dtype=torch.uint8)})
    with pytest.raises(KeyError):
        module.predict_expression({"expression": torch.zeros(1, N_GENES)})


def test_fit_targets_standardises_and_starts_at_the_mean(data):
    y = data["expression"] * torch.linspace(0.5, 3.0, N_GENES) + torch.linspace(-1.0, 4.0, N_GENES)
    y[:, 0] = 2.5  # a gene constant on the training spots keeps scale 1
    module = _module().eval()
    assert not module.targets_fitted
    module.fit_targets(y)
    assert module.targets_fitted
    torch.testing.assert_close(module.target_shift, y.mean(0))
    expected_sd = y.std(0)
    expected_sd[0] = 1.0
    torch.testing.assert_close(module.target_scale, expected_sd)
    # standardise <-> unstandardise round-trips, and the standardised targets are 0/1 per gene
    z = module.standardize(y)
    torch.testing.assert_close(module.unstandardize(z), y)
    torch.testing.assert_close(z[:, 1:].mean(0), torch.zeros(N_GENES - 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(z[:, 1:].std(0), torch.ones(N_GENES - 1), atol=1e-5, rtol=0)
    # the untrained model predicts the per-gene mean, on the data's scale
    torch.testing.assert_close(module.predict_expression({"fmaps": data["fmaps"][:3]}), y.mean(0).expand(3, -1))
    # the MSE is taken on the standardised scale, the prediction reported on the data's scale
    batch = _fmap_batch(data)
    batch["expression"] = y[torch.tensor(TARGETS)][:, None].expand(-1, 5, -1).clone()
    out = module(batch)
    torch.testing.assert_close(out["prediction"], y.mean(0).expand(len(TARGETS), -1))
    torch.testing.assert_close(out["mse"], (module.standardize(batch["expression"][:, 0]) ** 2).mean())


def test_fit_targets_without_standardising_sets_the_output_bias(data):
    module = _module(standardize_targets=False, activation="none").eval()
    mean = data["expression"].mean(0)
    module.fit_targets(data["expression"])
    torch.testing.assert_close(module.target_shift, torch.zeros(N_GENES))
    torch.testing.assert_close(module.target_scale, torch.ones(N_GENES))
    torch.testing.assert_close(module.translator[-1].bias, mean)
    with pytest.raises(ValueError, match="n_spots"):
        module.fit_targets(data["expression"][:, :3])


def test_linear_translator():
    module = _module(translator_hidden=0, contrastive=False)
    linears = [m for m in module.translator if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == LATENT and linears[0].out_features == N_GENES


# -- constructor validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 48}, "image_size"),
        ({"image_size": 16}, "image_size"),
        ({"image_size": 100}, "image_size"),
        ({"n_neighbors": 4, "hyperedge_degree": 6}, "hyperedge_degree"),
        ({"n_neighbors": 4, "hyperedge_degree": 0}, "hyperedge_degree"),
        ({"attention": "bogus"}, "attention"),
        ({"attention_mode": "matrix"}, "attention_mode"),
        ({"trunk": "thawed"}, "trunk"),
        ({"temperature": 0.0}, "temperature"),
        ({"n_neighbors": 0}, "n_neighbors"),
        ({"n_genes": 0}, "n_genes"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _module(**kwargs)


def test_hyperedge_degree_k_plus_one_is_allowed_and_unchecked_without_neighbours():
    assert _module(n_neighbors=4, hyperedge_degree=5).hgnn_path.degree == 5
    assert _module(use_neighbor_branch=False, hyperedge_degree=50).hgnn_path is None


# -- NH2STCollate --------------------------------------------------------------------------------


def test_collate_fmaps_node_map_reproduces_per_node_maps(data):
    neighbors = data["neighbors"][4]
    batch = NH2STCollate(data["expression"], neighbors, fmaps=data["fmaps"])(TARGETS)
    targets = torch.tensor(TARGETS)
    nodes = torch.cat([targets[:, None], neighbors[targets]], dim=1)
    assert batch["node_map"].shape == (len(TARGETS), 5)
    assert batch["node_map"].dtype == torch.long
    # distinct spots are stored once
    assert batch["fmaps"].shape[0] == len(set(nodes.flatten().tolist())) < nodes.numel()
    torch.testing.assert_close(batch["fmaps"][batch["node_map"]], data["fmaps"][nodes], rtol=0, atol=0)
    # node 0 is the target
    target_rows = batch["fmaps"][batch["node_map"][:, 0]]
    torch.testing.assert_close(target_rows, data["fmaps"][targets], rtol=0, atol=0)
    assert batch["index"].tolist() == TARGETS
    assert batch["expression"].shape == (len(TARGETS), 5, N_GENES)
    torch.testing.assert_close(batch["expression"], data["expression"][nodes], rtol=0, atol=0)
    torch.testing.assert_close(batch["expression"][:, 0], data["expression"][targets], rtol=0, atol=0)


def test_collate_patches_once_per_distinct_spot(data):
    neighbors = data["neighbors"][4]
    batch = NH2STCollate(None, neighbors, patches=data["patches"])(TARGETS)
    targets = torch.tensor(TARGETS)
    nodes = torch.cat([targets[:, None], neighbors[targets]], dim=1)
    assert batch["patches"].shape[0] == len(set(nodes.flatten().tolist()))
    assert torch.equal(batch["patches"][batch["node_map"]], data["patches"][nodes])
    assert torch.equal(batch["node_index"][batch["node_map"]], nodes)
    assert "expression" not in batch and "fmaps" not in batch and "patch_rows" not in batch


def test_collate_cached_neighbours_sends_only_target_patches(data):
    neighbors = data["neighbors"][4]
    batch = NH2STCollate(data["expression"], neighbors, patches=data["patches"], neighbor_patches=False)(TARGETS)
    assert batch["patches"].shape[0] == len(TARGETS)
    torch.testing.assert_close(batch["patch_rows"], batch["node_map"][:, 0])
    assert torch.equal(batch["patches"], data["patches"][TARGETS])
    assert torch.equal(batch["node_index"][batch["patch_rows"]], torch.tensor(TARGETS))


def test_collate_without_neighbours_and_errors(data):
    batch = NH2STCollate(data["expression"], None, fmaps=data["fmaps"])(TARGETS)
    assert batch["node_map"].shape == (len(TARGETS), 1)
    assert batch["expression"].shape == (len(TARGETS), 1, N_GENES)
    target_rows = batch["fmaps"][batch["node_map"][:, 0]]
    torch.testing.assert_close(target_rows, data["fmaps"][TARGETS], rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one"):
        NH2STCollate(data["expression"], None)
    with pytest.raises(ValueError, match="exactly one"):
        NH2STCollate(data["expression"], None, fmaps=data["fmaps"], patches=data["patches"])
    with pytest.raises(ValueError, match="augment"):
        NH2STCollate(data["expression"], None, fmaps=data["fmaps"], augment="mixup")


def test_collate_augment_is_seeded_and_dihedral(data):
    def make():
        return NH2STCollate(data["expression"], data["neighbors"][4], fmaps=data["fmaps"], augment=True, seed=3)

    a, b = make()(TARGETS), make()(TARGETS)
    torch.testing.assert_close(a["fmaps"], b["fmaps"], rtol=0, atol=0)
    plain = _fmap_batch(data)
    torch.testing.assert_close(a["node_map"], plain["node_map"])
    for row, ref in zip(a["fmaps"], plain["fmaps"], strict=True):
        assert any(torch.equal(row, t) for t in _dihedral_variants(ref))


# -- random_dihedral -----------------------------------------------------------------------------


def _dihedral_variants(item: torch.Tensor) -> list[torch.Tensor]:
    return [torch.rot90(t, k, dims=(-2, -1)) for t in (item, item.flip(-1)) for k in range(4)]


def test_random_dihedral_transforms_each_item_as_a_whole():
    x = torch.randperm(16 * 2 * 5 * 5).view(16, 2, 5, 5).float()  # all values distinct
    x_before = x.clone()
    out = random_dihedral(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)  # input untouched
    used = set()
    for i in range(16):
        assert torch.equal(out[i].flatten().sort().values, x[i].flatten().sort().values)
        matches = [c for c, t in enumerate(_dihedral_variants(x[i])) if torch.equal(out[i], t)]
        assert len(matches) == 1, i  # one of the 8 dihedral transforms, same for every channel
        used.add(matches[0])
    assert len(used) >= 2
    # a fixed generator seed gives a reproducible result
    again = random_dihedral(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, out, rtol=0, atol=0)


def test_random_dihedral_preserves_uint8_patches():
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=gen)
    out = random_dihedral(x, gen)
    assert out.dtype == torch.uint8
    for i in range(16):
        assert torch.equal(out[i].flatten().sort().values, x[i].flatten().sort().values)
    assert math.isclose(out.float().sum().item(), x.float().sum().item())


def test_cached_neighbours_run_only_target_patches_through_the_trunk(data):
    torch.manual_seed(0)
    module = NH2STModule(N_GENES, latent_dim=32, image_size=64, n_heads=4, n_neighbors=4, hyperedge_degree=3,
                         trunk="finetune", neighbor_trunk_grad=False, context="patch")
    module.train()
    collate = NH2STCollate(data["expression"], data["neighbors"][4], patches=data["patches"], neighbor_patches=False)
    batch = collate(TARGETS)
    cache = torch.randn(N_SPOTS, 512, 2, 2)
    batch["fmaps"] = cache[batch["node_index"]]
    calls = []
    original = module.trunk_features

    def spy(p):
        calls.append((p.shape[0], torch.is_grad_enabled()))
        return original(p)

    module.trunk_features = spy
    out = module(batch)
    assert calls == [(len(TARGETS), True)]  # one batched trunk call, the targets only
    # the live maps replace the cached ones on the targets' rows; the others come from the cache
    assert out["live_fmaps"].shape == (len(TARGETS), 512, 2, 2)
    out["loss"].backward()
    assert module.trunk[0].weight.grad is not None and module.trunk[0].weight.grad.abs().sum() > 0
    fmaps, live = module.node_fmaps(batch)
    others = torch.ones(len(batch["node_index"]), dtype=torch.bool)
    others[batch["patch_rows"]] = False
    torch.testing.assert_close(fmaps[others], batch["fmaps"][others])
    module.eval()
    calls.clear()
    module.predict_expression({"patches": data["patches"][:10]})
    assert calls == [(10, False)]


def test_batch_norm_scaling_of_a_finetuned_trunk_is_standard_in_training_mode(data):
    torch.manual_seed(0)
    module = NH2STModule(N_GENES, latent_dim=32, image_size=64, n_heads=4, trunk="finetune").train()
    # trunk maps on a scale far from 0/1 (as a trunk in training mode gives): the scaled input of the
    # projection is still standardised, batch by batch
    fmaps = 7.0 + 7.0 * torch.randn(N_SPOTS, 512, 2, 2)
    scaled = module.path_head.scaled(fmaps)
    torch.testing.assert_close(scaled.mean(0), torch.zeros(512), atol=1e-4, rtol=0)
    torch.testing.assert_close(scaled.std(0, unbiased=False), torch.ones(512), atol=1e-2, rtol=0)
    with pytest.raises(RuntimeError, match="fixed"):
        module.path_head.fit_input_scaling(fmaps)


def test_a_batch_of_one_spot_skips_the_contrastive_terms(data):
    module = _module()
    out = module(_fmap_batch(data, targets=[5]))
    assert out["nce_query"].item() == 0.0 and out["nce_neighbor"].item() == 0.0
    torch.testing.assert_close(out["loss"], out["mse"])


def test_no_unused_trainable_parameters(data):
    """Every trainable parameter gets a gradient from one training step (DDP needs this)."""
    for kwargs in ({}, {"use_neighbor_branch": False}, {"contrastive": False}, {"attention": "none"},
                   {"cross_residual": True}, {"attention": "self"}, {"context": "neighbors"}):
        module = _module(trunk="finetune", **kwargs).train()
        module.fit_targets(data["expression"])
        batch = _patch_batch(data, None if kwargs.get("use_neighbor_branch") is False else 4)
        module.loss(batch)["loss"].backward()
        unused = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, (kwargs, unused)
