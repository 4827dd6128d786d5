"""The NH2ST network and its loss, in pure torch (no AnnData, no scvi-tools).

A batch is a dict of tensors (see :class:`~st_predict.train.NH2STCollate`). Its ``U`` rows are the
distinct spots of the batch (targets and their neighbours, each encoded once):

``"patches"``
    ``(P, 3, S, S)`` uint8 RGB patches to run through the trunk. Without ``"patch_rows"``, one per
    row (``P == U``): end-to-end training with gradient through every node (the paper), and
    inference.
``"patch_rows"``
    ``(P,)`` long: the rows the patches belong to (end-to-end training with cached neighbours: only
    the target spots' patches go through the trunk; the other rows come from ``"fmaps"``).
``"fmaps"``
    ``(U, 512, S/32, S/32)`` trunk feature maps of every row: a frozen trunk's cache, or the
    neighbour cache of end-to-end training (rows with a patch are replaced by the live maps).
``"node_map"``
    ``(B, V)`` long: for each of the ``B`` target spots, the rows of its nodes; column 0 is the
    target itself, columns 1..K its spatial neighbours (``V = K + 1``; ``V = 1`` without the
    neighbour branch).
``"expression"``
    ``(B, V, n)`` float: expression of the same nodes on the data's scale (``log1p`` counts per
    10k); absent at inference.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from st_predict._imaging import random_dihedral_views
from st_predict.nn import (
    CrossAttentionBlock,
    GeneTokenizer,
    NeighbourhoodEncoder,
    PathologyHead,
    Translator,
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
        Side in pixels of the patches fed to the trunk (multiple of 32). The speed/accuracy knob:
        64 trains end to end on a laptop CPU in minutes; 224 is the paper's (a GPU job).
    trunk
        ``"finetune"`` (trained end to end, as the paper) or ``"frozen"`` (fixed in eval mode;
        batches carry cached ``fmaps``, the fast path for a pretrained trunk).
    pooling
        How the trunk map becomes ``h^p``: ``"avg"`` (global average) or ``"flatten"`` (authors' code).
    attention
        ``"cross"`` (NH2ST), ``"self"`` (ablation: each modality attends to itself) or ``"none"``
        (contrastive loss directly on the encoder outputs).
    attention_mode
        ``"vector"``: each modality is one vector, as in Eq. 1 (the softmax over one key is 1).
        ``"tokens"``: the pooled vector attends over the other modality's tokens (the ``h*w``
        trunk-map positions and gene-group tokens in the query branch, the ``K+1`` hypergraph node
        features in the neighbour branch). With tokens the attention weights depend on the query, so
        some of the query's own modality reaches the refined embedding; the vector form is exact.
    cross_residual
        ``False`` (default): Eq. 1 as written, ``z^p = phi(h^p, h^g)`` built from the attended
        context only, so the two embeddings InfoNCE compares each carry one modality and only the
        image can match them. ``True``: the authors' code, ``z^p = h^p + phi(...)``; each side then
        carries its partner's features and InfoNCE is solved without the image (kept for comparison).
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
    gather_negatives
        Under DDP, training InfoNCE negatives from every process's batch (gathered with gradients), not
        only this process's: the negatives of single-process training with the global batch.
        Validation batches (of unequal sizes across processes) keep their own.
    temperature
        InfoNCE temperature ``tau``.
    lambda_query, lambda_neighbor
        Weights ``lambda_1``, ``lambda_2`` of the query and neighbour contrastive losses (Eq. 5).
    translator_hidden
        Hidden width of the translator ``N -> hidden -> n``; 0: a linear translator (ST-Net-style head).
    activation
        Nonlinearity inside the ST encoder and the translator (``"none"``: authors' code).
    dropout
        Dropout in the MLPs, attention and HGNN.
    translator_dropout
        Dropout before the translator's last layer (``None``: ``dropout``).
    n_gene_tokens
        Gene-group tokens in ``attention_mode="tokens"``.
    neighbor_trunk_grad
        With ``trunk="finetune"``: ``False`` (default) runs only the target spots' patches through the
        trunk; the neighbour branch reads the other nodes' trunk maps from a no-grad cache that each
        spot refreshes when it is a target (once per epoch). ``True`` (the paper) runs every node's
        patch through the trunk with gradient, about 5x the trunk work per step.
    gene_dropout
        Dropout of genes at the ST encoder's input during training (a masked gene is set to 0 on the
        standardised scale, i.e. to its mean; the others are scaled by ``1 / (1 - p)``), independently
        per spot and node. InfoNCE then has to
        match the image with the broad expression programme of a spot rather than with gene-level
        noise that no image can predict. 0: the paper (no masking).
    standardize_targets
        Train on per-gene standardised targets: mean and standard deviation of the training spots
        (:meth:`fit_targets`, saved with the model), so every gene weighs the same in the MSE and in
        the ST encoder's input; predictions are mapped back to the data's scale. ``False``: the
        paper (raw ``log1p`` targets).
    """

    def __init__(
        self,
        n_genes: int,
        latent_dim: int = 512,
        image_size: int = 64,
        trunk: Literal["frozen", "finetune"] = "finetune",
        pooling: Literal["flatten", "avg"] = "avg",
        attention: Literal["cross", "self", "none"] = "cross",
        attention_mode: Literal["vector", "tokens"] = "vector",
        cross_residual: bool = False,
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
        gather_negatives: bool = False,
        temperature: float = 0.05,
        lambda_query: float = 1.0,
        lambda_neighbor: float = 0.5,
        translator_hidden: int = 256,
        activation: Literal["relu", "gelu", "none"] = "relu",
        dropout: float = 0.0,
        translator_dropout: float | None = None,
        n_gene_tokens: int = 16,
        neighbor_trunk_grad: bool = False,
        gene_dropout: float = 0.0,
        standardize_targets: bool = True,
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
        if not 0 <= gene_dropout < 1:
            raise ValueError(f"gene_dropout must be in [0, 1), got {gene_dropout}.")
        self.gene_dropout = gene_dropout
        self.n_genes = n_genes
        self.image_size = image_size
        self.trunk_mode = trunk
        self.attention = attention
        self.attention_mode = attention_mode
        self.use_neighbor_branch = use_neighbor_branch
        self.n_neighbors = n_neighbors if use_neighbor_branch else 0
        self.contrastive = contrastive
        self.symmetric_nce = symmetric_nce
        self.gather_negatives = gather_negatives
        self.temperature = temperature
        self.lambda_query = lambda_query
        self.lambda_neighbor = lambda_neighbor
        self.neighbor_trunk_grad = neighbor_trunk_grad
        self.standardize_targets = standardize_targets
        self.map_size = image_size // 32
        tokens = attention_mode == "tokens" and attention != "none"

        self.trunk = build_resnet18_trunk()
        if trunk == "frozen":
            self.trunk.requires_grad_(False)
            self.trunk.eval()  # fixed BatchNorm statistics from the start, not only after .train()/.eval()
        self.path_head = PathologyHead(
            self.map_size, latent_dim, pooling, with_tokens=tokens,
            input_norm="fixed" if trunk == "frozen" else "batch",
        )
        self.translator = Translator(
            latent_dim, translator_hidden, n_genes, activation, dropout if translator_dropout is None else translator_dropout
        )
        self.register_buffer("target_shift", torch.zeros(n_genes))
        self.register_buffer("target_scale", torch.ones(n_genes))
        self.register_buffer("targets_fitted", torch.zeros((), dtype=torch.bool))

        # modules that only the contrastive terms use exist only when those terms do (no unused
        # trainable parameters, e.g. under DDP)
        self.gene_encoder = TwoLayerMLP(n_genes, latent_dim, latent_dim, activation, dropout) if contrastive else None
        self.gene_tokenizer = GeneTokenizer(n_genes, n_gene_tokens, latent_dim) if tokens and contrastive else None
        block = {"n_heads": n_heads, "dropout": dropout, "residual": cross_residual, "single_key": not tokens}
        self.attn_query = CrossAttentionBlock(latent_dim, **block) if contrastive and attention != "none" else None
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
                self.attn_neighbor = CrossAttentionBlock(latent_dim, **block)
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

    # -- targets ---------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_targets(self, expression: torch.Tensor) -> None:
        """Fit the target scale on the training spots' expression ``(n_spots, n)`` and start the
        translator at the per-gene mean.

        With ``standardize_targets``: shift = per-gene mean, scale = per-gene standard deviation (1
        for a gene constant on the training spots), and the translator's last layer is zeroed, so
        training starts from the mean predictor. Without: the translator's last bias is set to the
        mean. Called once, before the first training epoch (:attr:`targets_fitted`).
        """
        y = expression.to(self.target_shift.device, torch.float32)
        if y.ndim != 2 or y.shape[1] != self.n_genes:
            raise ValueError(f"Expected (n_spots, {self.n_genes}) expression, got {tuple(y.shape)}.")
        if y.shape[0] < 2:
            raise ValueError(f"Fitting the target scale needs at least 2 spots, got {y.shape[0]}.")
        mean = y.mean(0)
        if self.standardize_targets:
            sd = y.std(0)
            self.target_shift.copy_(mean)
            self.target_scale.copy_(torch.where(sd > 1e-6, sd, torch.ones_like(sd)))
            self.translator.start_at(torch.zeros_like(mean), zero_weights=True)
        else:
            self.translator.start_at(mean)
        self.targets_fitted.fill_(True)

    def standardize(self, expression: torch.Tensor) -> torch.Tensor:
        """Expression on the data's scale -> the scale the network trains on."""
        return (expression - self.target_shift) / self.target_scale

    def unstandardize(self, z: torch.Tensor) -> torch.Tensor:
        """The network's output -> expression on the data's scale (``log1p`` counts per 10k)."""
        return z * self.target_scale + self.target_shift

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

    def node_fmaps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Trunk maps of every row of the batch, and the live (trunk-computed) maps, if any."""
        patches, cached = batch.get("patches"), batch.get("fmaps")
        if patches is None and cached is None:
            raise KeyError("A batch needs 'patches' or 'fmaps'.")
        if patches is None:
            return cached, None
        live = self.trunk_features(patches)
        if cached is None or "patch_rows" not in batch:
            return live, live
        rows = batch["patch_rows"]
        return cached.to(live.dtype).index_put((rows,), live), live

    @torch.no_grad()
    def predict_expression(self, batch: dict[str, torch.Tensor], tta: bool = False) -> torch.Tensor:
        """Inference path ``y_hat = translator(head(trunk(x)))`` for every row of the batch's
        ``patches``/``fmaps``, on the data's scale: no expression, no neighbours needed.

        ``tta``: average the predictions of the 8 flips/90-degree rotations of each patch
        (test-time augmentation; ``patches`` only).
        """
        if tta and "patches" in batch:
            views = random_dihedral_views(batch["patches"])
            out = torch.stack([self.translator(self.path_head(self.trunk_features(v))) for v in views])
            return self.unstandardize(out.mean(0))
        fmaps, _ = self.node_fmaps(batch)
        return self.unstandardize(self.translator(self.path_head(fmaps)))

    @torch.no_grad()
    def latent(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pathology latent ``h^p`` ``(U, N)`` of every row of ``patches``/``fmaps``."""
        return self.path_head(self.node_fmaps(batch)[0])

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
        """Training forward pass: predictions, all latents, and every loss term.

        ``"prediction"`` is on the data's scale; ``"mse"`` is computed on the training scale
        (standardised targets when ``standardize_targets``). ``"live_fmaps"`` are the trunk maps
        computed from ``"patches"`` in this pass (for the neighbour cache), when there are any.
        """
        fmaps, live = self.node_fmaps(batch)
        node_map = batch["node_map"]
        y = batch["expression"]
        if node_map.ndim != 2 or y.shape[:2] != node_map.shape:
            raise ValueError(f"node_map {tuple(node_map.shape)} and expression {tuple(y.shape)} disagree.")
        need_nodes = self.use_neighbor_branch and self.contrastive
        if need_nodes and node_map.shape[1] != self.n_neighbors + 1:
            raise ValueError(
                f"The neighbour branch needs K + 1 = {self.n_neighbors + 1} nodes per spot, got {node_map.shape[1]}."
            )
        z = self.standardize(y)
        h_all = self.path_head(fmaps)  # (U, N)
        hp_s = h_all[node_map[:, 0]]
        z_s = z[:, 0]
        pred = self.translator(hp_s)
        out = {"prediction": self.unstandardize(pred.detach()), "h_path": hp_s, "mse": F.mse_loss(pred, z_s)}
        if live is not None:
            out["live_fmaps"] = live
        zero = pred.new_zeros(())
        out["nce_query"] = zero
        out["nce_neighbor"] = zero
        # InfoNCE needs a negative: a batch of one spot (e.g. a validation remainder) has none
        if self.contrastive and node_map.shape[0] >= 2:
            # encode each node's expression once; the target is node 0
            g_in = z if self.use_neighbor_branch else z[:, :1]
            g_nodes = self.gene_encoder(F.dropout(g_in, self.gene_dropout, self.training))
            hg_s = g_nodes[:, 0]
            tokens = self.attention_mode == "tokens" and self.attention != "none"
            if tokens:
                ctx_p = self.path_head.tokens(fmaps)[node_map[:, 0]]
                ctx_g = self.gene_tokenizer(z_s)
            else:
                ctx_p, ctx_g = hp_s.unsqueeze(1), hg_s.unsqueeze(1)
            zp, zg = self._attend(self.attn_query, hp_s, hg_s, ctx_p, ctx_g)
            out["nce_query"] = info_nce(zp, zg, self.temperature, self.symmetric_nce, self.gather_negatives and self.training)
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
                out["nce_neighbor"] = info_nce(zp_n, zg_n, self.temperature, self.symmetric_nce, self.gather_negatives and self.training)
        out["loss"] = out["mse"] + self.lambda_query * out["nce_query"] + self.lambda_neighbor * out["nce_neighbor"]
        return out

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Eq. 5: ``lambda_1 * L^s + lambda_2 * L^n + MSE`` and its terms (scalar tensors)."""
        out = self.forward(batch)
        return {k: out[k] for k in ("loss", "mse", "nce_query", "nce_neighbor")}


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")
