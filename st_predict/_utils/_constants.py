"""Keys that st_predict reads from and writes to AnnData, and the defaults every entry point shares."""

from typing import NamedTuple


class _RegistryKeys(NamedTuple):
    X_KEY: str = "X"
    SPATIAL_KEY: str = "spatial"
    LIBRARY_KEY: str = "library"
    NEIGHBOR_INDICES_KEY: str = "neighbor_indices"
    NEIGHBOR_DISTANCES_KEY: str = "neighbor_distances"
    PATCH_KEY: str = "patch"


REGISTRY_KEYS = _RegistryKeys()

#: Default ``adata.obsm`` key (and whole-slide table name) for predicted expression.
PREDICTED_KEY = "nh2st"
#: The same for a pretrained predictor (:class:`~st_predict.Pretrained`).
PRETRAINED_KEY = "pretrained"
#: Default obs column of sections written by st_predict's readers and the synthetic generator.
SECTION_KEY = "section"
#: Default patch side in full-resolution pixels (``setup_anndata(patch_size=)``).
PATCH_SIZE_PX = 224
#: Default number of predicted genes (``NH2ST(n_genes=)``).
N_GENES = 250
#: Default patches per forward pass when predicting (spots and whole-slide tiles alike).
PREDICT_BATCH_SIZE = 64
#: Default trunk weights (``NH2ST(encoder_weights=)``).
DEFAULT_WEIGHTS = "imagenet"
