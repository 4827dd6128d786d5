"""Tests for the dense batched (hyper)graph layers of :mod:`st_predict.nn._hypergraph`."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from st_predict.nn import DenseGraphConv, HypergraphConv, NeighbourhoodEncoder, knn_adjacency, knn_hyperedges


@pytest.fixture(scope="module")
def pyg_hypergraph_conv():
    # torch_geometric's import emits third-party FutureWarnings (torch.jit.script) that the
    # project-wide ``filterwarnings = error`` would turn into errors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        geometric_conv = pytest.importorskip("torch_geometric.nn.conv")
    return geometric_conv.HypergraphConv


def _brute_force_similar(x: np.ndarray, k: int) -> list[list[set[int]]]:
    """For each graph b and node j, the set of the k most cosine-similar other nodes."""
    out = []
    for xb in x:
        xn = xb / np.linalg.norm(xb, axis=1, keepdims=True)
        sim = xn @ xn.T
        per_node = []
        for j in range(xb.shape[0]):
            others = [v for v in range(xb.shape[0]) if v != j]
            ranked = sorted(others, key=lambda v: -sim[j, v])
            per_node.append(set(ranked[:k]))
        out.append(per_node)
    return out


def _dense_to_hyperedge_index(incidence: torch.Tensor) -> torch.Tensor:
    """PyG's ``hyperedge_index`` (row 0 = node, row 1 = hyperedge) of one ``(V, E)`` incidence."""
    nodes, edges = incidence.nonzero(as_tuple=True)
    return torch.stack([nodes, edges])


# -- knn_hyperedges -------------------------------------------------------------------------------


@pytest.mark.parametrize("degree", [1, 2, 4, 7])
def test_knn_hyperedges_columns_are_self_plus_most_similar(degree):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    inc = knn_hyperedges(x, degree)
    assert inc.shape == (3, 7, 7)
    assert inc.dtype == x.dtype
    assert set(torch.unique(inc).tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(inc.sum(1), torch.full((3, 7), float(degree), dtype=torch.float64))
    expected = _brute_force_similar(x.numpy(), degree - 1)
    for b in range(3):
        for j in range(7):
            members = set(inc[b, :, j].nonzero().flatten().tolist())
            assert j in members
            assert members - {j} == expected[b][j], (b, j)


def test_knn_hyperedges_depends_on_each_graph_separately():
    # hyperedges of graph 0 must not change when graph 1 changes
    torch.manual_seed(1)
    x = torch.randn(2, 6, 4)
    inc = knn_hyperedges(x, 3)
    x2 = x.clone()
    x2[1] = torch.randn(6, 4)
    inc2 = knn_hyperedges(x2, 3)
    torch.testing.assert_close(inc2[0], inc[0])


@pytest.mark.parametrize("degree", [0, 8, 20])
def test_knn_hyperedges_rejects_bad_degree(degree):
    with pytest.raises(ValueError):
        knn_hyperedges(torch.randn(2, 7, 3), degree)


# -- HypergraphConv ------------------------------------------------------------------------------


def _random_incidences(batch: int, n_nodes: int, n_edges: int, gen: torch.Generator) -> torch.Tensor:
    inc = (torch.rand(batch, n_nodes, n_edges, generator=gen) < 0.4).float()
    # make sure every hyperedge has at least one node (PyG infers the edge count from the index)
    for b in range(batch):
        for e in range(n_edges):
            if inc[b, :, e].sum() == 0:
                inc[b, int(torch.randint(n_nodes, (1,), generator=gen)), e] = 1.0
    return inc


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("kind", ["knn", "random"])
def test_hypergraph_conv_rw_matches_torch_geometric(pyg_hypergraph_conv, kind):
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(2)
    batch, n_nodes, in_dim, out_dim = 3, 6, 5, 4
    x = torch.randn(batch, n_nodes, in_dim)
    if kind == "knn":
        inc = knn_hyperedges(x, 3)
    else:
        inc = _random_incidences(batch, n_nodes, 5, gen)
        inc[0, 2, :] = 0.0  # an isolated node (degree 0): output is the bias alone
    ours = HypergraphConv(in_dim, out_dim, normalization="rw")
    with torch.no_grad():
        ours.bias.copy_(torch.randn(out_dim))
    ref = pyg_hypergraph_conv(in_dim, out_dim)
    with torch.no_grad():
        ref.lin.weight.copy_(ours.lin.weight)
        ref.bias.copy_(ours.bias)
    out = ours(x, inc)
    assert out.shape == (batch, n_nodes, out_dim)
    for b in range(batch):
        expected = ref(x[b], _dense_to_hyperedge_index(inc[b]), num_edges=inc.shape[2])
        torch.testing.assert_close(out[b], expected)
    if kind == "random":
        torch.testing.assert_close(out[0, 2], ours.bias.detach())


def test_hypergraph_conv_rw_with_edge_weights_matches_formula():
    # X' = Dv^-1 H W De^-1 H^T X Theta + b with Dv = sum_e W_e H_ve (the documented formula)
    torch.manual_seed(3)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    inc = torch.tensor(
        [[[1, 0, 1], [1, 1, 0], [0, 1, 0], [1, 0, 1], [0, 1, 1]],
         [[1, 1, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1], [1, 1, 1]]],
        dtype=torch.float64,
    )
    w = torch.tensor([[0.5, 2.0, 1.5], [1.0, 3.0, 0.25]], dtype=torch.float64)
    conv = HypergraphConv(3, 4).double()
    with torch.no_grad():
        conv.bias.copy_(torch.randn(4))
    out = conv(x, inc, w)
    theta = conv.lin.weight.detach().T
    for b in range(2):
        h = inc[b]
        wm = torch.diag(w[b])
        dv = torch.diag(1.0 / (h @ w[b]))
        de = torch.diag(1.0 / h.sum(0))
        expected = dv @ h @ wm @ de @ h.T @ x[b] @ theta + conv.bias.detach()
        torch.testing.assert_close(out[b].detach(), expected)


@pytest.mark.parametrize("weighted", [False, True])
def test_hypergraph_conv_sym_matches_hand_computation(weighted):
    torch.manual_seed(4)
    # 4 nodes, 4 hyperedges: {0, 1, 2}, {1, 2, 3}, {0, 3}, {1} (node degrees 2, 3, 2, 2)
    h = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 1], [1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.float64)
    x = torch.randn(1, 4, 3, dtype=torch.float64)
    w = torch.tensor([2.0, 0.5, 1.0, 1.5] if weighted else [1.0] * 4, dtype=torch.float64)
    conv = HypergraphConv(3, 2, normalization="sym").double()
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([0.3, -0.7]))
    out = conv(x, h[None], w[None] if weighted else None)
    # explicit degree matrices
    dv = torch.zeros(4, 4, dtype=torch.float64)
    for v in range(4):
        dv[v, v] = sum(w[e] * h[v, e] for e in range(4))
    de = torch.zeros(4, 4, dtype=torch.float64)
    for e in range(4):
        de[e, e] = sum(h[v, e] for v in range(4))
    dv_inv_sqrt = torch.diag(torch.diag(dv) ** -0.5)
    de_inv = torch.diag(1.0 / torch.diag(de))
    theta = conv.lin.weight.detach().T
    operator = dv_inv_sqrt @ h @ torch.diag(w) @ de_inv @ h.T @ dv_inv_sqrt
    expected = operator @ x[0] @ theta + conv.bias.detach()
    torch.testing.assert_close(out[0].detach(), expected)
    # and "sym" is really a different operator from "rw" on this irregular hypergraph
    rw = HypergraphConv(3, 2, normalization="rw").double()
    rw.load_state_dict(conv.state_dict())
    assert not torch.allclose(rw(x, h[None], w[None] if weighted else None), out)


def test_hypergraph_conv_rejects_unknown_normalization():
    with pytest.raises(ValueError, match="normalization"):
        HypergraphConv(3, 3, normalization="left")


# -- graph ablation ------------------------------------------------------------------------------


@pytest.mark.parametrize("n_similar", [1, 3])
def test_knn_adjacency_symmetric_zero_diagonal_contains_knn(n_similar):
    torch.manual_seed(5)
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    adj = knn_adjacency(x, n_similar)
    assert adj.shape == (3, 7, 7)
    assert set(torch.unique(adj).tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(adj, adj.transpose(1, 2))
    assert torch.all(torch.diagonal(adj, dim1=1, dim2=2) == 0)
    expected = _brute_force_similar(x.numpy(), n_similar)
    for b in range(3):
        for i in range(7):
            for j in range(7):
                linked = j in expected[b][i] or i in expected[b][j]
                assert adj[b, i, j].item() == float(linked), (b, i, j)


def test_dense_graph_conv_matches_hand_computation():
    torch.manual_seed(6)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    adj = knn_adjacency(x, 2)
    conv = DenseGraphConv(3, 4).double()
    with torch.no_grad():
        conv.bias.copy_(torch.randn(4))
    out = conv(x, adj)
    theta = conv.lin.weight.detach().T
    for b in range(2):
        a_hat = adj[b] + torch.eye(5, dtype=torch.float64)
        d = torch.zeros(5, 5, dtype=torch.float64)
        for i in range(5):
            d[i, i] = a_hat[i].sum() ** -0.5
        expected = d @ a_hat @ d @ x[b] @ theta + conv.bias.detach()
        torch.testing.assert_close(out[b].detach(), expected)


# -- NeighbourhoodEncoder ------------------------------------------------------------------------


@pytest.mark.parametrize(("graph", "norm"), [("hypergraph", "rw"), ("hypergraph", "sym"), ("graph", "rw")])
def test_neighbourhood_encoder_pools_and_composes_layers(graph, norm):
    torch.manual_seed(7)
    enc = NeighbourhoodEncoder(8, n_layers=2, degree=3, graph=graph, normalization=norm)
    for conv in enc.convs:
        with torch.no_grad():
            conv.bias.copy_(torch.randn(8) * 0.1)
    x = torch.randn(4, 6, 8)
    pooled, nodes = enc(x)
    assert pooled.shape == (4, 8)
    assert nodes.shape == (4, 6, 8)
    torch.testing.assert_close(pooled, nodes.mean(1))
    # the structure is built once from the input features and shared by all layers
    struct = knn_hyperedges(x, 3) if graph == "hypergraph" else knn_adjacency(x, 2)
    torch.testing.assert_close(enc.structure(x), struct)
    h = x
    for conv in enc.convs:
        h = torch.relu(conv(h, struct))
    torch.testing.assert_close(nodes, h)


@pytest.mark.parametrize("graph", ["hypergraph", "graph"])
def test_neighbourhood_encoder_gradients_reach_all_parameters(graph):
    torch.manual_seed(8)
    enc = NeighbourhoodEncoder(8, n_layers=2, degree=3, graph=graph)
    x = torch.randn(4, 6, 8, requires_grad=True)
    pooled, _ = enc(x)
    (pooled**2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in enc.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_neighbourhood_encoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_hgnn_layers"):
        NeighbourhoodEncoder(8, n_layers=0)
    with pytest.raises(ValueError, match="graph"):
        NeighbourhoodEncoder(8, graph="tree")
