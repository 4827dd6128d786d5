"""Keys that st_predict reads from and writes to AnnData."""

from typing import NamedTuple


class _RegistryKeys(NamedTuple):
    X_KEY: str = "X"
    SPATIAL_KEY: str = "spatial"
    LIBRARY_KEY: str = "library"


REGISTRY_KEYS = _RegistryKeys()

#: Default ``adata.obsm`` key for predicted expression.
PREDICTED_KEY = "nh2st"
#: Default obs column of sections written by st_predict's readers and the synthetic generator.
SECTION_KEY = "section"
