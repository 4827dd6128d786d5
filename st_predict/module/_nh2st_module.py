"""The NH2ST network and its loss, in pure torch (no AnnData, no scvi-tools).

A batch is a dict of tensors (see :class:`~st_predict.dataloaders.NH2STCollate`). Its ``U`` rows are the
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

import re

import torch
import torch.nn.functional as F
from torch import nn

from st_predict._utils import InputError, MissingKeyError
from st_predict.module._config import NetworkSettings
from st_predict.nn import (
    CrossAttentionBlock,
    EncoderSpec,
    GeneTokenizer,
    NeighbourhoodEncoder,
    PathologyHead,
    Translator,
    TwoLayerMLP,
    build_encoder,
    dihedral_views,
    info_nce,
    prepare_patches,
    source_of,
)


def _external_trunk_not_missing(module, incompatible) -> None:
    """Loading a state dict without the trunk of a rebuilt encoder (see ``saves_trunk``) is complete."""
    if not module.saves_trunk:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not _TRUNK_KEY.search(k)]


def _train_last_blocks(trunk: nn.Module, n: int, spec: EncoderSpec) -> None:
    """Fix every weight of the encoder but those of its last ``n`` blocks (and a ViT's final norm), the blocks
    its registered source finds (:meth:`~st_predict.nn.EncoderSource.blocks`)."""
    blocks, tail = source_of(spec.name).blocks(trunk)
    if not blocks:
        raise InputError(f"finetune_blocks: the encoder {spec.name!r} has no transformer blocks or ResNet layers to "
                         "choose from; use finetune_blocks=None (all of it) or trunk='frozen'.")
    if n > len(blocks):
        raise InputError(f"finetune_blocks={n} but the encoder {spec.name!r} has {len(blocks)} blocks.")
    trunk.requires_grad_(False)
    for module in blocks[len(blocks) - n:] + (tail if n else []):
        module.requires_grad_(True)


_TRUNK_KEY = re.compile(r"(^|\.)trunk\.")


class NH2STModule(nn.Module):
    """NH2ST (Qu et al.): query branch + neighbour branch + translator.

    Parameters
    ----------
    n_genes
        Number of predicted genes ``n``.
    settings
        The network's settings (:class:`~st_predict.module.NetworkSettings`; default: the defaults,
        which are the ``"default"`` recipe's).
    encoder
        The image encoder and its spec, ``(backbone, spec)`` from :func:`st_predict.nn.build_encoder` (resolved
        once by :class:`~st_predict.NH2ST`). Default: the settings' encoder built without weights, for a source
        that can (the ResNet18, random); any other encoder must be given.
    **overrides
        Settings that replace those of ``settings``, e.g. ``NH2STModule(250, image_size=224)``.
    """

    def __init__(self, n_genes: int, settings: NetworkSettings | None = None,
                 encoder: tuple[nn.Module, EncoderSpec] | None = None, **overrides):
        super().__init__()
        if n_genes < 1:
            raise InputError(f"n_genes must be >= 1, got {n_genes}.")
        s = settings or NetworkSettings()
        if overrides:
            s = s.replace(**overrides)
        self.settings = s
        image_size, latent_dim, trunk, pooling = s.image_size, s.latent_dim, s.trunk, s.pooling
        attention, attention_mode, use_neighbor_branch = s.attention, s.attention_mode, s.use_neighbor_branch
        n_neighbors, contrastive, dropout = s.n_neighbors, s.contrastive, s.dropout
        self.gene_dropout = s.gene_dropout
        self.n_genes = n_genes
        self.image_size = image_size
        self.trunk_mode = trunk
        self.attention = attention
        self.attention_mode = attention_mode
        self.use_neighbor_branch = use_neighbor_branch
        self.context = s.context
        self.n_neighbors = n_neighbors if use_neighbor_branch or s.context != "patch" else 0
        self.contrastive = contrastive
        self.symmetric_nce = s.symmetric_nce
        self.gather_negatives = s.gather_negatives
        self.temperature = s.temperature
        self.lambda_query = s.lambda_query
        self.lambda_neighbor = s.lambda_neighbor
        self.neighbor_trunk_grad = s.neighbor_trunk_grad
        self.standardize_targets = s.standardize_targets
        if encoder is None:
            if not source_of(s.encoder).builds_offline:
                raise InputError(f"NH2STModule with encoder={s.encoder!r} needs encoder=build_encoder(...).")
            encoder = build_encoder(s.encoder, load_weights=False)
        self.trunk, self.encoder_info = encoder  # the encoder's spec (st_predict.nn.EncoderSpec)
        if self.encoder_info.name != s.encoder:
            raise InputError(f"settings.encoder={s.encoder!r} but the encoder given is {self.encoder_info.name!r}.")
        if trunk == "finetune" and self.encoder_info.inference_only:
            raise InputError(
                f"encoder {self.encoder_info.name!r} runs in inference mode (lazyslide-models) and cannot be fine-tuned; "
                "use trunk='frozen', or its timm / hf-hub id to fine-tune it."
            )
        self.encoder_info.check_image_size(image_size)
        self.map_size = self.encoder_info.map_size(image_size)
        tokens = attention_mode == "tokens" and attention != "none"
        if trunk == "frozen":
            self.trunk.requires_grad_(False)
            self.trunk.eval()  # fixed BatchNorm statistics from the start, not only after .train()/.eval()
        elif s.finetune_blocks is not None:
            _train_last_blocks(self.trunk, s.finetune_blocks, self.encoder_info)
        self.path_head = PathologyHead(
            self.map_size, latent_dim, pooling, in_channels=self.encoder_info.out_channels, with_tokens=tokens,
            input_norm="fixed" if trunk == "frozen" else "batch",
        )
        # with context="neighbors" the translator reads [h_s^p, h_n^p]: the target's latent and its pooled neighbourhood
        self.translator = Translator(
            latent_dim * (2 if s.context == "neighbors" else 1), s.translator_hidden, n_genes, s.activation,
            dropout if s.translator_dropout is None else s.translator_dropout,
        )
        self.register_buffer("target_shift", torch.zeros(n_genes))
        self.register_buffer("target_scale", torch.ones(n_genes))
        self.register_buffer("targets_fitted", torch.zeros((), dtype=torch.bool))

        # modules that only the contrastive terms use exist only when those terms do (no unused
        # trainable parameters, e.g. under DDP)
        self.gene_encoder = TwoLayerMLP(n_genes, latent_dim, latent_dim, s.activation, dropout) if contrastive else None
        self.gene_tokenizer = GeneTokenizer(n_genes, s.n_gene_tokens, latent_dim) if tokens and contrastive else None
        block = {"n_heads": s.n_heads, "dropout": dropout, "residual": s.cross_residual, "single_key": not tokens}
        self.attn_query = CrossAttentionBlock(latent_dim, **block) if contrastive and attention != "none" else None
        hg = {"n_layers": s.n_hgnn_layers, "degree": s.hyperedge_degree, "graph": s.graph,
              "normalization": s.hypergraph_norm, "dropout": dropout}
        # the pathology hypergraph serves the contrastive neighbour branch and the translator's context; both read
        # the same h_n^p
        self.hgnn_path = NeighbourhoodEncoder(latent_dim, **hg) if s.uses_neighbors else None
        if use_neighbor_branch and contrastive:
            self.hgnn_gene = NeighbourhoodEncoder(latent_dim, **hg)
            if attention == "none":
                self.attn_neighbor = None
            elif s.share_attention:
                self.attn_neighbor = self.attn_query
            else:
                self.attn_neighbor = CrossAttentionBlock(latent_dim, **block)
        else:
            self.hgnn_gene = self.attn_neighbor = None
        self.register_load_state_dict_post_hook(_external_trunk_not_missing)

    @property
    def saves_trunk(self) -> bool:
        """Whether the trunk's weights go into :meth:`state_dict` (saved models, checkpoints). A frozen
        encoder whose weights come back from its name (hub id, registry key, weights file) is not
        saved: it is rebuilt on loading, and its digest checked (:class:`~st_predict.model.NH2ST`)."""
        return not (self.trunk_mode == "frozen" and self.encoder_info.rebuildable)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if not self.saves_trunk:
            for key in [k for k in out if k.startswith(prefix + "trunk.")]:
                del out[key]
        return out

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
            raise InputError(f"Expected (n_spots, {self.n_genes}) expression, got {tuple(y.shape)}.")
        if y.shape[0] < 2:
            raise InputError(f"Fitting the target scale needs at least 2 spots, got {y.shape[0]}.")
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
        """Trunk feature maps ``(U, C, h, w)`` of uint8 (or [0, 1] float) RGB ``patches``: the
        ResNet18's ``(U, 512, S/32, S/32)``, an encoder's vectors as ``(U, D, 1, 1)``."""
        if patches.shape[-1] != self.image_size or patches.shape[-2] != self.image_size:
            raise InputError(
                f"Patches are {tuple(patches.shape[-2:])} px but the trunk was built for "
                f"{self.image_size} px (image_size)."
            )
        info = self.encoder_info
        x = prepare_patches(patches, info.mean, info.std)
        if not info.channels_last:  # prepare_patches gives channels-last memory: a ViT's patch embedding wants plain
            x = x.contiguous()
        if self.trunk_mode == "frozen":
            with torch.no_grad():
                return self._as_map(self.trunk(x))
        return self._as_map(self.trunk(x))

    @staticmethod
    def _as_map(out: torch.Tensor) -> torch.Tensor:
        """An encoder's vectors ``(B, D)`` as ``(B, D, 1, 1)`` maps."""
        return out[:, :, None, None] if out.ndim == 2 else out

    def node_fmaps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Trunk maps of every row of the batch, and the live (trunk-computed) maps, if any."""
        patches, cached = batch.get("patches"), batch.get("fmaps")
        if patches is None and cached is None:
            raise MissingKeyError("A batch needs 'patches' or 'fmaps'.")
        if patches is None:
            return cached, None
        live = self.trunk_features(patches)
        if cached is None or "patch_rows" not in batch:
            return live, live
        if cached.shape[-2:] == (1, 1) and live.shape[-2:] != (1, 1):
            # a cache of pooled maps (an average-pooling head without tokens reads only the maps' mean): the
            # live maps are pooled alike, which changes neither the head's input nor its gradient
            live = live.mean((-2, -1), keepdim=True)
        rows = batch["patch_rows"]
        return cached.to(live.dtype).index_put((rows,), live), live

    def translate(self, h_target: torch.Tensor, h_nodes: torch.Tensor | None = None) -> torch.Tensor:
        """The translator on the training scale: from the targets' latents ``(B, N)`` and, with
        ``context="neighbors"``, their neighbourhoods' node latents ``(B, K + 1, N)`` (node 0 the target)."""
        if self.context == "patch":
            return self.translator(h_target)
        if h_nodes is None:
            raise InputError(
                "This network predicts from each spot's neighbourhood (context='neighbors'): it needs the latents of "
                "the spot's K nearest spots too (predict and predict_slide find them; a batch needs 'node_map')."
            )
        return self.translator(torch.cat([h_target, self.hgnn_path(h_nodes)[0]], dim=-1))

    @torch.no_grad()
    def predict_from_latents(self, h_target: torch.Tensor, h_nodes: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted expression on the data's scale from pathology latents (see :meth:`translate`)."""
        return self.unstandardize(self.translate(h_target, h_nodes))

    @torch.no_grad()
    def predict_expression(self, batch: dict[str, torch.Tensor], tta: bool = False) -> torch.Tensor:
        """Inference path for the batch's targets, on the data's scale; no expression needed.

        With ``context="patch"`` (the paper) ``y_hat = translator(head(trunk(x)))`` for every row of the
        batch's ``patches``/``fmaps``, and no neighbours are needed. With ``context="neighbors"`` the batch
        also needs ``"node_map"`` ``(B, K + 1)`` (as in training: column 0 the target row, then its
        neighbours' rows), and one prediction is returned per row of ``node_map``.

        ``tta``: test-time augmentation over the 8 flips/90-degree rotations of each patch (``patches``
        only): the mean of the 8 predictions, or with ``context="neighbors"`` the prediction from each
        row's latent averaged over its 8 views.
        """
        if self.context != "patch":
            if "node_map" not in batch:
                return self.translate(self.latent(batch, tta))  # raises the error that names what is missing
            h_all = self.latent(batch, tta)
            node_map = batch["node_map"]
            return self.predict_from_latents(h_all[node_map[:, 0]], h_all[node_map])
        if tta and "patches" in batch:
            views = dihedral_views(batch["patches"])
            out = torch.stack([self.translator(self.path_head(self.trunk_features(v))) for v in views])
            return self.unstandardize(out.mean(0))
        fmaps, _ = self.node_fmaps(batch)
        return self.unstandardize(self.translator(self.path_head(fmaps)))

    @torch.no_grad()
    def latent(self, batch: dict[str, torch.Tensor], tta: bool = False) -> torch.Tensor:
        """Pathology latent ``h^p`` ``(U, N)`` of every row of ``patches``/``fmaps``; ``tta``: the mean of
        the latents of the 8 flips/rotations of each patch (``patches`` only)."""
        if tta and "patches" in batch:
            return torch.stack([self.path_head(self.trunk_features(v)) for v in dihedral_views(batch["patches"])]).mean(0)
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
            raise InputError(f"node_map {tuple(node_map.shape)} and expression {tuple(y.shape)} disagree.")
        need_nodes = (self.use_neighbor_branch and self.contrastive) or self.context != "patch"
        if need_nodes and node_map.shape[1] != self.n_neighbors + 1:
            raise InputError(
                f"The neighbour branch needs K + 1 = {self.n_neighbors + 1} nodes per spot, got {node_map.shape[1]}."
            )
        z = self.standardize(y)
        h_all = self.path_head(fmaps)  # (U, N)
        hp_s = h_all[node_map[:, 0]]
        z_s = z[:, 0]
        hp_n = nodes_p = None
        if self.hgnn_path is not None and node_map.shape[1] > 1:
            hp_n, nodes_p = self.hgnn_path(h_all[node_map])  # the pathology neighbourhood, from images alone
        pred = self.translator(hp_s if self.context == "patch" else torch.cat([hp_s, hp_n], dim=-1))
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

