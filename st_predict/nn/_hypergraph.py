"""Dense, batched hypergraph (and graph) convolutions over each spot's neighbourhood.

Every target spot owns a small node set (itself plus its K spatial neighbours), so a batch is a
stack of ``B`` graphs with the same number of nodes ``V = K + 1``. All operations here are dense
tensor maths over ``(B, V, ...)`` tensors: no per-sample Python loops, no sparse scatter.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from st_predict._utils import InputError


def _topk_similar(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(B, V, k)`` of each node's ``k`` most cosine-similar *other* nodes."""
    n_nodes = x.shape[1]
    if not 0 <= k <= n_nodes - 1:
        raise InputError(
            f"Cannot pick {k} similar nodes among the {n_nodes - 1} other nodes of a neighbourhood "
            f"(hyperedge degree {k + 1} > K + 1 = {n_nodes})."
        )
    xn = F.normalize(x.detach(), dim=-1)
    sim = xn @ xn.transpose(1, 2)
    eye = torch.eye(n_nodes, dtype=torch.bool, device=x.device)
    sim = sim.masked_fill(eye, float("-inf"))
    return sim.topk(k, dim=-1).indices


def knn_hyperedges(x: torch.Tensor, degree: int) -> torch.Tensor:
    r"""Incidence matrices of NH2ST's feature-similarity hypergraphs (Eq. 3).

    One hyperedge per node: :math:`e_j = \{v_j\} \cup` the ``degree - 1`` nodes most cosine-similar
    to :math:`v_j`.

    Parameters
    ----------
    x
        Node features ``(B, V, D)``.
    degree
        Number of nodes in each hyperedge (the paper's :math:`\tau`), ``1 <= degree <= V``.

    Returns
    -------
    Incidence ``H`` of shape ``(B, V, E)`` with ``E = V``; ``H[b, v, j] = 1`` iff node ``v`` is in
    hyperedge ``e_j``. Each column sums to ``degree``.
    """
    batch, n_nodes, _ = x.shape
    if degree < 1:
        raise InputError(f"Hyperedge degree must be >= 1, got {degree}.")
    members = _topk_similar(x, degree - 1)  # (B, E=V, degree-1): members of hyperedge j
    incidence = torch.zeros(batch, n_nodes, n_nodes, dtype=x.dtype, device=x.device)
    # incidence[b, members[b, j, m], j] = 1: node members[b, j, m] belongs to hyperedge j
    edge_idx = torch.arange(n_nodes, device=x.device).view(1, n_nodes, 1).expand_as(members)
    b_idx = torch.arange(batch, device=x.device).view(batch, 1, 1).expand_as(members)
    incidence[b_idx, members, edge_idx] = 1.0
    diag = torch.arange(n_nodes, device=x.device)
    incidence[:, diag, diag] = 1.0
    return incidence


def knn_adjacency(x: torch.Tensor, n_similar: int) -> torch.Tensor:
    """Symmetric adjacency ``(B, V, V)`` linking each node to its ``n_similar`` most cosine-similar
    other nodes (the "graph instead of hypergraph" ablation), without self-loops."""
    batch, n_nodes, _ = x.shape
    members = _topk_similar(x, n_similar)
    adj = torch.zeros(batch, n_nodes, n_nodes, dtype=x.dtype, device=x.device)
    b_idx = torch.arange(batch, device=x.device).view(batch, 1, 1).expand_as(members)
    row = torch.arange(n_nodes, device=x.device).view(1, n_nodes, 1).expand_as(members)
    adj[b_idx, row, members] = 1.0
    return torch.maximum(adj, adj.transpose(1, 2))


def _safe_pow(deg: torch.Tensor, power: float) -> torch.Tensor:
    out = deg.pow(power)
    return out.masked_fill(deg == 0, 0.0)


class HypergraphConv(nn.Module):
    r"""Batched dense hypergraph convolution.

    ``normalization="rw"`` (default) is torch_geometric's ``HypergraphConv`` form

    .. math:: X' = D_v^{-1} H W D_e^{-1} H^\top X \Theta + b,

    ``"sym"`` is HGNN's :math:`D_v^{-1/2} H W D_e^{-1} H^\top D_v^{-1/2} X \Theta + b`, with
    :math:`W` the hyperedge weights (ones by default), :math:`D_v` node degrees
    (:math:`\sum_e W_e H_{ve}`) and :math:`D_e` hyperedge degrees (:math:`\sum_v H_{ve}`).
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, normalization: Literal["rw", "sym"] = "rw"):
        super().__init__()
        if normalization not in ("rw", "sym"):
            raise InputError(f"normalization must be 'rw' or 'sym', got {normalization!r}.")
        self.normalization = normalization
        self.lin = nn.Linear(in_dim, out_dim, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_dim)) if bias else None

    def forward(
        self, x: torch.Tensor, incidence: torch.Tensor, edge_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x``: ``(B, V, in)``; ``incidence``: ``(B, V, E)``; ``edge_weight``: ``(B, E)`` or None."""
        x = self.lin(x)
        if edge_weight is None:
            edge_weight = torch.ones(incidence.shape[0], incidence.shape[2], dtype=x.dtype, device=x.device)
        node_deg = (incidence * edge_weight.unsqueeze(1)).sum(-1)  # (B, V)
        edge_deg = incidence.sum(1)  # (B, E)
        if self.normalization == "sym":
            x = x * _safe_pow(node_deg, -0.5).unsqueeze(-1)
        edges = incidence.transpose(1, 2) @ x * _safe_pow(edge_deg, -1.0).unsqueeze(-1)  # (B, E, out)
        out = incidence @ (edges * edge_weight.unsqueeze(-1))
        power = -0.5 if self.normalization == "sym" else -1.0
        out = out * _safe_pow(node_deg, power).unsqueeze(-1)
        if self.bias is not None:
            out = out + self.bias
        return out


class DenseGraphConv(nn.Module):
    r"""Batched GCN layer :math:`X' = \hat D^{-1/2}(A + I)\hat D^{-1/2} X \Theta + b` (Kipf & Welling)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__()
        self.lin = nn.Linear(in_dim, out_dim, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_dim)) if bias else None

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, V, in)``; ``adjacency``: ``(B, V, V)`` without self-loops."""
        eye = torch.eye(adjacency.shape[-1], dtype=adjacency.dtype, device=adjacency.device)
        a_hat = adjacency + eye
        d = _safe_pow(a_hat.sum(-1), -0.5)
        out = d.unsqueeze(-1) * (a_hat @ (d.unsqueeze(-1) * self.lin(x)))
        if self.bias is not None:
            out = out + self.bias
        return out


class NeighbourhoodEncoder(nn.Module):
    """``L`` layers of (hyper)graph convolution over each spot's neighbourhood, then mean pooling.

    The (hyper)graph is built once, from the input node features (Eq. 3), and shared by all layers.

    Parameters
    ----------
    dim
        Node feature size (input = hidden = output).
    n_layers
        Number of convolution layers ``L`` (>= 1).
    degree
        Hyperedge degree (``graph="hypergraph"``), or 1 + the number of similar nodes each node is
        linked to (``graph="graph"``).
    graph
        ``"hypergraph"`` (NH2ST) or ``"graph"`` (the paper's graph ablation: a GCN on the
        symmetrised k-nearest-feature graph).
    normalization
        Hypergraph normalisation, see :class:`HypergraphConv`.
    dropout
        Dropout between layers.
    """

    def __init__(
        self,
        dim: int,
        n_layers: int = 2,
        degree: int = 4,
        graph: Literal["hypergraph", "graph"] = "hypergraph",
        normalization: Literal["rw", "sym"] = "rw",
        dropout: float = 0.0,
    ):
        super().__init__()
        if n_layers < 1:
            raise InputError(f"n_hgnn_layers must be >= 1, got {n_layers}.")
        if graph not in ("hypergraph", "graph"):
            raise InputError(f"graph must be 'hypergraph' or 'graph', got {graph!r}.")
        self.graph = graph
        self.degree = degree
        if graph == "hypergraph":
            self.convs = nn.ModuleList(
                [HypergraphConv(dim, dim, normalization=normalization) for _ in range(n_layers)]
            )
        else:
            self.convs = nn.ModuleList([DenseGraphConv(dim, dim) for _ in range(n_layers)])
        self.dropout = nn.Dropout(dropout)

    def structure(self, x: torch.Tensor) -> torch.Tensor:
        """The incidence (hypergraph) or adjacency (graph) built from node features ``x``."""
        if self.graph == "hypergraph":
            return knn_hyperedges(x, self.degree)
        return knn_adjacency(x, self.degree - 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(pooled (B, dim), node features (B, V, dim))``."""
        struct = self.structure(x)
        for i, conv in enumerate(self.convs):
            x = conv(x, struct)
            x = torch.relu(x)
            if i < len(self.convs) - 1:
                x = self.dropout(x)
        return x.mean(1), x
