"""Building blocks of NH2ST (pure torch)."""

from ._attention import CrossAttentionBlock
from ._augment import apply_dihedral, dihedral_views, random_dihedral, stain_jitter
from ._bins import BIN_LOSSES, BinHead, count_nll, disc_weights, fine_and_final
from ._encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    GeneTokenizer,
    PathologyHead,
    Translator,
    TwoLayerMLP,
    build_resnet18_trunk,
    load_trunk_weights,
    prepare_patches,
)
from ._hypergraph import DenseGraphConv, HypergraphConv, NeighbourhoodEncoder, knn_adjacency, knn_hyperedges
from ._image_encoders import ENCODER_SOURCES as _ENCODER_SOURCES
from ._image_encoders import (
    EncoderInfo,
    EncoderSource,
    EncoderSpec,
    build_encoder,
    canonical_name,
    encoder_name,
    register_source,
    registry_vision_keys,
    source_of,
)
from ._losses import info_nce

#: The registered encoder sources (:class:`EncoderSource`) by name prefix: ``"resnet18"``, ``"lazyslide:"``,
#: ``"hf-hub:"``, ``"timm:"`` and ``"module:"`` (:func:`register_source` adds one).
ENCODER_SOURCES = _ENCODER_SOURCES

__all__ = [
    "apply_dihedral",
    "BIN_LOSSES",
    "BinHead",
    "count_nll",
    "disc_weights",
    "fine_and_final",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CrossAttentionBlock",
    "DenseGraphConv",
    "ENCODER_SOURCES",
    "EncoderInfo",
    "EncoderSource",
    "EncoderSpec",
    "GeneTokenizer",
    "HypergraphConv",
    "NeighbourhoodEncoder",
    "PathologyHead",
    "Translator",
    "TwoLayerMLP",
    "build_encoder",
    "build_resnet18_trunk",
    "canonical_name",
    "dihedral_views",
    "encoder_name",
    "info_nce",
    "knn_adjacency",
    "knn_hyperedges",
    "load_trunk_weights",
    "prepare_patches",
    "random_dihedral",
    "register_source",
    "registry_vision_keys",
    "source_of",
    "stain_jitter",
]
