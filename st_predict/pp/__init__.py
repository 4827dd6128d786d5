"""Preprocessing: gene selection, normalisation, spatial neighbours, spot patches."""

from ._genes import (
    absent_genes_hint,
    check_expression,
    check_sections_have_counts,
    normalize_expression,
    select_genes,
)
from ._geometry import PatchGeometry, spot_pitch_um
from ._neighbors import N_NEIGHBORS_STORED as _N_NEIGHBORS_STORED
from ._neighbors import NEIGHBORS_KEY as _NEIGHBORS_KEY
from ._neighbors import (
    context_neighbors,
    grid_neighbors,
    padded_knn,
    spatial_knn,
    spatial_neighbors,
    stored_neighbors_match,
)
from ._patches import (
    PIXEL_SIZE_KEY,
    make_patch_reader,
    section_images,
    section_pixel_sizes,
    spot_coordinates,
    spot_libraries,
)
from ._pool import FOOTPRINT_KEY, pool_spots

#: ``obsm`` keys of :func:`spatial_neighbors`' arrays: ``f"{key_added}_indices"`` and ``f"{key_added}_distances"``.
NEIGHBORS_KEY = _NEIGHBORS_KEY
#: Neighbours per spot that :func:`spatial_neighbors` and ``setup_anndata`` store (the paper's largest K).
N_NEIGHBORS_STORED = _N_NEIGHBORS_STORED

__all__ = [
    "FOOTPRINT_KEY",
    "pool_spots",
    "absent_genes_hint",
    "NEIGHBORS_KEY",
    "N_NEIGHBORS_STORED",
    "PIXEL_SIZE_KEY",
    "PatchGeometry",
    "check_expression",
    "check_sections_have_counts",
    "context_neighbors",
    "grid_neighbors",
    "make_patch_reader",
    "padded_knn",
    "normalize_expression",
    "section_images",
    "section_pixel_sizes",
    "select_genes",
    "spatial_knn",
    "spatial_neighbors",
    "spot_coordinates",
    "spot_libraries",
    "spot_pitch_um",
    "stored_neighbors_match",
]
