"""The NH2ST network and its loss, in pure torch (no AnnData, no scvi-tools).

A batch is a dict of tensors (see :class:`~st_predict.train.NH2STCollate`):

``"patches"``
    ``(U, 3, S, S)`` uint8 RGB patches of the ``U`` distinct spots in the batch (end-to-end
    training and inference), **or**
``"fmaps"``
    ``(U, 512, S/32, S/32)`` cached trunk feature maps of those spots (``trunk="frozen"``).
``"node_map"``
    ``(B, V)`` long: for each of the ``B`` target spots, the rows of ``patches``/``fmaps`` of its
    nodes; column 0 is the target itself, columns 1..K its spatial neighbours (``V = K + 1``; ``V = 1``
    without the neighbour branch). Spots shared by several neighbourhoods are encoded once.
``"expression"``
    ``(B, V, n)`` float: normalised expression of the same nodes (absent at inference).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from st_predict.nn import (
    CrossAttentionBlock,
    GeneTokenizer,
    NeighbourhoodEncoder,
    PathologyHead,
    TwoLayerMLP,
    build_resnet18_trunk,
    info_nce,
    prepare_patches,
)


class NH2STModule(nn.Module):
    """NH2ST (Qu et al.): query branch + neighbour branch + translator.

    Parameters
    ----------
    n_genes
        Number of predicted genes ``n``.
    latent_dim
        Latent size ``N``.
    image_size
        Side in pixels of the patches fed to the trunk (multiple of 32; 224 in the paper).
    trunk
        ``"frozen"`` (trunk fixed in eval mode; batches may carry cached ``fmaps``) or ``"finetune"``
        (trained end to end from ``patches``, as the paper).
    pooling
        How the trunk map becomes ``h^p``: ``"avg"`` (global average) or ``"flatten"`` (authors' code).
    attention
        ``"cross"`` (NH2ST), ``"self"`` (ablation: each modality attends to itself) or ``"none"``
        (contrastive loss directly on the encoder outputs).
    attention_mode
        ``"vector"``: each modality is one vector, as in Eq. 1 (the softmax over one key is 1, so
        attention degenerates to a projection). ``"tokens"``: the pooled vector attends over the other
        modality's tokens (the ``h*w`` trunk-map positions and gene-group tokens in the query branch,
        the ``K+1`` hypergraph node features in the neighbour branch).
    n_heads
        Attention heads.
    share_attention
        One cross-attention block for both branches (authors' code) instead of one per branch.
    use_neighbor_branch
        ``False`` gives the "query branch only" ablation.
    n_neighbors
        ``K``: spatial neighbours per spot in the neighbour branch.
    hyperedge_degree
        Nodes per hyperedge (self + ``degree - 1`` most similar), at most ``K + 1``.
    n_hgnn_layers
        ``L``: (hyper)graph convolution layers.
    graph
        ``"hypergraph"`` (NH2ST) or ``"graph"`` (ablation).
    hypergraph_norm
        ``"rw"`` (torch_geometric's ``HypergraphConv``) or ``"sym"`` (HGNN).
    contrastive
        ``False`` drops both InfoNCE terms (ablation); only the translator's MSE trains the model.
    symmetric_nce
        Symmetric (both anchors) InfoNCE instead of the paper's pathology-anchored Eq. 2.
    temperature
        InfoNCE temperature ``tau``.
    lambda_query, lambda_neighbor
        Weights ``lambda_1``, ``lambda_2`` of the query and neighbour contrastive losses (Eq. 5).
    translator_hidden
        Hidden width of the translator ``N -> hidden -> n``.
    activation
        Nonlinearity inside the ST encoder and the translator (``"none"``: authors' code).
    dropout
        Dropout in the MLPs, attention and HGNN.
    n_gene_tokens
        Gene-group tokens in ``attention_mode="tokens"``.
    neighbor_trunk_grad
        With ``trunk="finetune"``: ``True`` (the paper) backpropagates through the trunk for every
        node's patch; ``False`` runs the neighbours' patches through the trunk without gradient (only
        the target patches train it), about 3x faster end-to-end training on CPU.
    """

    def __init__(
        self,
        n_genes: int,
        latent_dim: int = 512,
        image_size: int = 224,
        trunk: Literal["frozen", "finetune"] = "frozen",
        pooling: Literal["flatten", "avg"] = "avg",
        attention: Literal["cross", "self", "none"] = "cross",
        attention_mode: Literal["vector", "tokens"] = "vector",
        n_heads: int = 8,
        share_attention: bool = False,
        use_neighbor_branch: bool = True,
        n_neighbors: int = 8,
        hyperedge_degree: int = 4,
        n_hgnn_layers: int = 2,
        graph: Literal["hypergraph", "graph"] = "hypergraph",
        hypergraph_norm: Literal["rw", "sym"] = "rw",
        contrastive: bool = True,
        symmetric_nce: bool = False,
        temperature: float = 0.05,
        lambda_query: float = 1.0,
        lambda_neighbor: float = 0.5,
        translator_hidden: int = 256,
        activation: Literal["relu", "gelu", "none"] = "relu",
        dropout: float = 0.0,
        n_gene_tokens: int = 16,
        neighbor_trunk_grad: bool = True,
    ):
        super().__init__()
        _check_choice("trunk", trunk, ("frozen", "finetune"))
        _check_choice("attention", attention, ("cross", "self", "none"))
        _check_choice("attention_mode", attention_mode, ("vector", "tokens"))
        if n_genes < 1:
            raise ValueError(f"n_genes must be >= 1, got {n_genes}.")
        if image_size < 32 or image_size % 32:
            raise ValueError(f"image_size must be a positive multiple of 32, got {image_size}.")
        if use_neighbor_branch:
            if n_neighbors < 1:
                raise ValueError(f"n_neighbors (K) must be >= 1, got {n_neighbors}.")
            if not 1 <= hyperedge_degree <= n_neighbors + 1:
                raise ValueError(
                    f"hyperedge_degree must be between 1 and K + 1 = {n_neighbors + 1}, got {hyperedge_degree}."
                )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.n_genes = n_genes
        self.image_size = image_size
        self.trunk_mode = trunk
        self.attention = attention
        self.attention_mode = attention_mode
        self.use_neighbor_branch = use_neighbor_branch
        self.n_neighbors = n_neighbors if use_neighbor_branch else 0
        self.contrastive = contrastive
        self.symmetric_nce = symmetric_nce
        self.temperature = temperature
        self.lambda_query = lambda_query
        self.lambda_neighbor = lambda_neighbor
        self.neighbor_trunk_grad = neighbor_trunk_grad
        self.map_size = image_size // 32
        tokens = attention_mode == "tokens" and attention != "none"

        # channels-last convolutions run ~1.5x faster on CPU (and on tensor cores)
        self.trunk = build_resnet18_trunk()
        if trunk == "frozen":
            self.trunk.requires_grad_(False)
            self.trunk.eval()  # fixed BatchNorm statistics from the start, not only after .train()/.eval()
        self.path_head = PathologyHead(self.map_size, latent_dim, pooling, with_tokens=tokens)
        self.gene_encoder = TwoLayerMLP(n_genes, latent_dim, latent_dim, activation, dropout)
        self.translator = TwoLayerMLP(latent_dim, translator_hidden, n_genes, activation, dropout)
        self.gene_tokenizer = GeneTokenizer(n_genes, n_gene_tokens, latent_dim) if tokens else None

        if contrastive and attention != "none":
            self.attn_query = CrossAttentionBlock(latent_dim, n_heads, dropout=dropout)
        else:
            self.attn_query = None
        if use_neighbor_branch and contrastive:
            hg = {"n_layers": n_hgnn_layers, "degree": hyperedge_degree, "graph": graph}
            hg.update(normalization=hypergraph_norm, dropout=dropout)
            self.hgnn_path = NeighbourhoodEncoder(latent_dim, **hg)
            self.hgnn_gene = NeighbourhoodEncoder(latent_dim, **hg)
            if attention == "none":
                self.attn_neighbor = None
            elif share_attention:
                self.attn_neighbor = self.attn_query
            else:
                self.attn_neighbor = CrossAttentionBlock(latent_dim, n_heads, dropout=dropout)
        else:
            self.hgnn_path = self.hgnn_gene = self.attn_neighbor = None

    # -- scvi-tools expects these two from a module ---------------------------------------------
    @property
    def device(self) -> torch.device:
        """Device of the module's parameters."""
        return next(self.parameters()).device

    def on_load(self, model, **kwargs) -> None:
        return None

    def train(self, mode: bool = True) -> NH2STModule:
        """Set train/eval mode; a frozen trunk always stays in eval mode (fixed BatchNorm statistics)."""
        super().train(mode)
        if self.trunk_mode == "frozen":
            self.trunk.eval()
        return self

    @torch.no_grad()
    def init_output_bias(self, mean_expression: torch.Tensor) -> None:
        """Start the translator at the per-gene mean (its last bias), so training begins from the
        mean predictor instead of from zero."""
        self.translator[-1].bias.copy_(mean_expression.to(self.translator[-1].bias))

    # -- encoders --------------------------------------------------------------------------------
    def trunk_features(self, patches: torch.Tensor) -> torch.Tensor:
        """Trunk feature maps ``(U, 512, S/32, S/32)`` of uint8 (or [0, 1] float) RGB ``patches``."""
        if patches.shape[-1] != self.image_size or patches.shape[-2] != self.image_size:
            raise ValueError(
                f"Patches are {tuple(patches.shape[-2:])} px but the trunk was built for "
                f"{self.image_size} px (image_size)."
            )
        x = prepare_patches(patches)
        if self.trunk_mode == "frozen":
            with torch.no_grad():
                return self.trunk(x)
        return self.trunk(x)

    def _fmaps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "fmaps" in batch:
            return batch["fmaps"]
        if "patches" not in batch:
            raise KeyError("A batch needs 'patches' or 'fmaps'.")
        patches = batch["patches"]
        if self.neighbor_trunk_grad or self.trunk_mode == "frozen" or not self.training or "node_map" not in batch:
            return self.trunk_features(patches)
        # end-to-end training where only the target spots' patches backpropagate into the trunk
        is_target = torch.zeros(patches.shape[0], dtype=torch.bool, device=patches.device)
        is_target[batch["node_map"][:, 0]] = True
        with torch.no_grad():
            rest = self.trunk_features(patches[~is_target])
        fmaps = rest.new_empty((patches.shape[0], *rest.shape[1:]))
        fmaps = fmaps.index_put((~is_target,), rest).index_put((is_target,), self.trunk_features(patches[is_target]))
        return fmaps

    @torch.no_grad()
    def predict_expression(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inference path ``y_hat = translator(head(trunk(x)))`` for every row of the batch's
        ``patches``/``fmaps``: no expression, no neighbours needed."""
        return self.translator(self.path_head(self._fmaps(batch)))

    @torch.no_grad()
    def latent(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pathology latent ``h^p`` ``(U, N)`` of every row of ``patches``/``fmaps``."""
        return self.path_head(self._fmaps(batch))

    def _attend(self, block, hp, hg, ctx_p, ctx_g):
        if block is None:
            return hp, hg
        if self.attention == "self":  # ablation: each modality attends to itself
            ctx_p, ctx_g = ctx_g, ctx_p
        if ctx_p.shape == ctx_g.shape:
            # both directions through the same block in one call (one pass over its weights)
            z = block(torch.cat([hp, hg]).unsqueeze(1), torch.cat([ctx_g, ctx_p])).squeeze(1)
            return z[: hp.shape[0]], z[hp.shape[0] :]
        return block(hp.unsqueeze(1), ctx_g).squeeze(1), block(hg.unsqueeze(1), ctx_p).squeeze(1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training forward pass: predictions, all latents, and every loss term."""
        fmaps = self._fmaps(batch)
        node_map = batch["node_map"]
        y = batch["expression"]
        if node_map.ndim != 2 or y.shape[:2] != node_map.shape:
            raise ValueError(f"node_map {tuple(node_map.shape)} and expression {tuple(y.shape)} disagree.")
        need_nodes = self.use_neighbor_branch and self.contrastive
        if need_nodes and node_map.shape[1] != self.n_neighbors + 1:
            raise ValueError(
                f"The neighbour branch needs K + 1 = {self.n_neighbors + 1} nodes per spot, got {node_map.shape[1]}."
            )
        h_all = self.path_head(fmaps)  # (U, N)
        hp_s = h_all[node_map[:, 0]]
        y_s = y[:, 0]
        pred = self.translator(hp_s)
        out = {"prediction": pred, "h_path": hp_s, "mse": F.mse_loss(pred, y_s)}
        zero = pred.new_zeros(())
        out["nce_query"] = zero
        out["nce_neighbor"] = zero
        if self.contrastive:
            # encode each node's expression once; the target is node 0
            g_nodes = self.gene_encoder(y if self.use_neighbor_branch else y[:, :1])
            hg_s = g_nodes[:, 0]
            tokens = self.attention_mode == "tokens" and self.attention != "none"
            if tokens:
                ctx_p = self.path_head.tokens(fmaps)[node_map[:, 0]]
                ctx_g = self.gene_tokenizer(y_s)
            else:
                ctx_p, ctx_g = hp_s.unsqueeze(1), hg_s.unsqueeze(1)
            zp, zg = self._attend(self.attn_query, hp_s, hg_s, ctx_p, ctx_g)
            out["nce_query"] = info_nce(zp, zg, self.temperature, self.symmetric_nce)
            out["z_path"], out["z_gene"] = zp, zg
            if self.use_neighbor_branch:
                h_nodes = h_all[node_map]  # (B, V, N)
                hp_n, nodes_p = self.hgnn_path(h_nodes)
                hg_n, nodes_g = self.hgnn_gene(g_nodes)
                if tokens:
                    ctx_p, ctx_g = nodes_p, nodes_g
                else:
                    ctx_p, ctx_g = hp_n.unsqueeze(1), hg_n.unsqueeze(1)
                zp_n, zg_n = self._attend(self.attn_neighbor, hp_n, hg_n, ctx_p, ctx_g)
                out["nce_neighbor"] = info_nce(zp_n, zg_n, self.temperature, self.symmetric_nce)
        out["loss"] = out["mse"] + self.lambda_query * out["nce_query"] + self.lambda_neighbor * out["nce_neighbor"]
        return out

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Eq. 5: ``lambda_1 * L^s + lambda_2 * L^n + MSE`` and its terms (scalar tensors)."""
        out = self.forward(batch)
        return {k: out[k] for k in ("loss", "mse", "nce_query", "nce_neighbor")}


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")
