"""Preprocessing: gene selection, normalisation, spatial neighbours, spot patches."""

from ._genes import check_expression, normalize_expression, select_genes
from ._neighbors import spatial_knn
from ._patches import make_patch_reader, section_images, spot_coordinates, spot_libraries

__all__ = [
    "check_expression",
    "make_patch_reader",
    "normalize_expression",
    "section_images",
    "select_genes",
    "spatial_knn",
    "spot_coordinates",
    "spot_libraries",
]
