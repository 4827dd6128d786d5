"""The settings of the NH2ST network (:class:`~st_predict.module.NH2STModule`), each with its default: the
``"default"`` recipe's (:data:`st_predict.model.RECIPES`). Pure Python, so the command line reads the defaults
without importing torch."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from st_predict._utils import InputError

#: ``NetworkSettings.context`` values: what the translator sees at training and at inference
CONTEXTS = ("patch", "neighbors")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise InputError(f"{name} must be one of {list(choices)}, got {value!r}.")


@dataclass(frozen=True)
class NetworkSettings:
    """Settings of the NH2ST network (:class:`~st_predict.module.NH2STModule`); the defaults are the
    ``"default"`` recipe's (:data:`st_predict.model.RECIPES`). Immutable: derive variants with
    :func:`dataclasses.replace` or :meth:`replace`.

    Parameters
    ----------
    latent_dim
        Latent size ``N``.
    encoder
        The image trunk's canonical name: ``"resnet18"`` (the paper's), ``"lazyslide:<key>"`` (a
        lazyslide-models vision model, e.g. ``"lazyslide:uni"``), ``"timm:<name>"``,
        ``"hf-hub:<org>/<name>"`` or ``"module:<class>"`` (a user's module). Set through
        :class:`~st_predict.NH2ST`'s ``encoder=`` argument, which also accepts the short forms.
    image_size
        Side in pixels of the patches fed to the trunk: a multiple of 32 for the ResNet18, the
        encoder's own input size for any other. The ResNet18's speed/accuracy knob: 64 trains end to
        end on a laptop CPU in minutes; 224 is the paper's (a GPU job).
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
        ``False``: Eq. 1 as written, ``z^p = phi(h^p, h^g)`` built from the attended context only, so
        the two embeddings InfoNCE compares each carry one modality and only the image can match
        them. ``True``: the authors' code, ``z^p = h^p + phi(...)``; each side then carries its
        partner's features and InfoNCE is solved without the image (kept for comparison).
    n_heads
        Attention heads.
    share_attention
        One cross-attention block for both branches (authors' code) instead of one per branch.
    use_neighbor_branch
        ``False`` gives the "query branch only" ablation.
    context
        What the translator predicts from, at training and at inference. ``"patch"``: the target spot's
        pathology latent ``h_s^p`` alone, ``y_hat = translator(h_s^p)`` (the paper: only the query branch
        runs at inference; each spot is predicted from its own patch). ``"neighbors"``: also the pathology
        neighbourhood ``h_n^p``, the hypergraph over the target's and its ``K`` spatial neighbours' patch
        features (the image half of the neighbour branch, built from images alone), pooled:
        ``y_hat = translator([h_s^p, h_n^p])``. Prediction then needs the neighbours' patches too: spots
        take their ``K`` nearest spots of the same section (squidpy's graph on the spots predicted), a
        whole slide its neighbouring tiles. No expression is needed either way.
    n_neighbors
        ``K``: spatial neighbours per spot in the neighbour branch and, with ``context="neighbors"``, in
        the translator's neighbourhood.
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
        With ``trunk="finetune"``: ``False`` runs only the target spots' patches through the trunk;
        the neighbour branch reads the other nodes' trunk maps from a no-grad cache that each spot
        refreshes when it is a target (once per epoch). ``True`` (the paper) runs every node's patch
        through the trunk with gradient, about 5x the trunk work per step.
    finetune_blocks
        With ``trunk="finetune"``: train only the encoder's last ``finetune_blocks`` blocks (a ViT's
        transformer blocks and its final norm, a ResNet's ``layer1``-``layer4``), the rest fixed;
        ``None``: all of it. Fine-tuning the last blocks of a foundation model is a GPU job.
    gene_dropout
        Dropout of genes at the ST encoder's input during training (a masked gene is set to 0 on the
        standardised scale, i.e. to its mean; the others are scaled by ``1 / (1 - p)``), independently
        per spot and node. InfoNCE then has to match the image with the broad expression programme of
        a spot rather than with gene-level noise that no image can predict. 0: the paper (no masking).
    standardize_targets
        Train on per-gene standardised targets: mean and standard deviation of the training spots
        (:meth:`~st_predict.module.NH2STModule.fit_targets`, saved with the model), so every gene
        weighs the same in the MSE and in the ST encoder's input; predictions are mapped back to the
        data's scale. ``False``: the paper (raw ``log1p`` targets).
    """

    latent_dim: int = 512
    encoder: str = "resnet18"
    image_size: int = 64
    trunk: Literal["frozen", "finetune"] = "finetune"
    pooling: Literal["flatten", "avg"] = "avg"
    attention: Literal["cross", "self", "none"] = "cross"
    attention_mode: Literal["vector", "tokens"] = "vector"
    cross_residual: bool = False
    n_heads: int = 8
    share_attention: bool = False
    use_neighbor_branch: bool = True
    context: Literal["patch", "neighbors"] = "neighbors"
    n_neighbors: int = 8
    hyperedge_degree: int = 4
    n_hgnn_layers: int = 2
    graph: Literal["hypergraph", "graph"] = "hypergraph"
    hypergraph_norm: Literal["rw", "sym"] = "rw"
    contrastive: bool = True
    symmetric_nce: bool = False
    gather_negatives: bool = False
    temperature: float = 0.1
    lambda_query: float = 1.0
    lambda_neighbor: float = 0.5
    translator_hidden: int = 256
    activation: Literal["relu", "gelu", "none"] = "relu"
    dropout: float = 0.0
    translator_dropout: float | None = 0.2
    n_gene_tokens: int = 16
    neighbor_trunk_grad: bool = False
    finetune_blocks: int | None = None
    gene_dropout: float = 0.5
    standardize_targets: bool = True

    def __post_init__(self):
        _choice("trunk", self.trunk, ("frozen", "finetune"))
        _choice("pooling", self.pooling, ("flatten", "avg"))
        _choice("attention", self.attention, ("cross", "self", "none"))
        _choice("attention_mode", self.attention_mode, ("vector", "tokens"))
        _choice("graph", self.graph, ("hypergraph", "graph"))
        _choice("hypergraph_norm", self.hypergraph_norm, ("rw", "sym"))
        _choice("activation", self.activation, ("relu", "gelu", "none"))
        _choice("context", self.context, CONTEXTS)
        if not isinstance(self.encoder, str) or not self.encoder:
            raise InputError(f"encoder must be a name, got {self.encoder!r}.")
        if self.image_size < 8:
            raise InputError(f"image_size must be >= 8 px, got {self.image_size}.")
        if self.latent_dim < 1 or self.n_heads < 1 or self.latent_dim % self.n_heads:
            raise InputError(
                f"latent_dim ({self.latent_dim}) must be a positive multiple of n_heads ({self.n_heads})."
            )
        if self.use_neighbor_branch or self.context != "patch":
            if self.n_neighbors < 1:
                raise InputError(f"n_neighbors (K) must be >= 1, got {self.n_neighbors}.")
            if not 1 <= self.hyperedge_degree <= self.n_neighbors + 1:
                raise InputError(
                    f"hyperedge_degree must be between 1 and K + 1 = {self.n_neighbors + 1}, got "
                    f"{self.hyperedge_degree}."
                )
            if self.n_hgnn_layers < 1:
                raise InputError(f"n_hgnn_layers (L) must be >= 1, got {self.n_hgnn_layers}.")
        if self.finetune_blocks is not None and self.finetune_blocks < 0:
            raise InputError(f"finetune_blocks must be >= 0 (or None: all), got {self.finetune_blocks}.")
        if self.temperature <= 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}.")
        if not 0 <= self.gene_dropout < 1:
            raise InputError(f"gene_dropout must be in [0, 1), got {self.gene_dropout}.")
        for name in ("dropout", "translator_dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise InputError(f"{name} must be in [0, 1), got {value}.")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The setting names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @property
    def uses_neighbors(self) -> bool:
        """Whether a spot's ``K`` spatial neighbours take part: in training (the contrastive neighbour
        branch, or the translator's context) or at inference (``context="neighbors"``)."""
        return (self.use_neighbor_branch and self.contrastive) or self.context != "patch"

    def replace(self, **overrides) -> NetworkSettings:
        """A copy with ``overrides``; an unknown name is a ``TypeError`` that lists the settings."""
        return dataclasses.replace(self, **_known(type(self), overrides))

    @classmethod
    def from_dict(cls, values: Mapping) -> NetworkSettings:
        """Settings from a mapping (e.g. a saved model's), unknown names refused."""
        return cls(**_known(cls, values))

    def to_dict(self) -> dict:
        """The settings as a plain dict."""
        return dataclasses.asdict(self)

    def __setstate__(self, state: dict) -> None:
        # pickled before the translator had a context (save formats 1 and 2): it predicted from the patch
        # alone, whatever the default is now
        for key, value in {"context": "patch", **state}.items():
            object.__setattr__(self, key, value)


def _known(cls, values: Mapping) -> dict:
    unknown = sorted(set(values) - set(cls.names()))
    if unknown:
        raise TypeError(f"Unknown {cls.__name__} {unknown}; the settings are {list(cls.names())}.")
    return dict(values)
