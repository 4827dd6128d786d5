"""Data: readers (HER2ST, 10x Visium, HEST-1k), the SpatialData front end and the synthetic tissue generator."""

from ._her2st import fetch_her2st, read_her2st
from ._hest import read_hest
from ._images import read_fullres_image as read_image
from ._read import InputData, choose_image_key, downsample_images, read_h5ad, read_input
from ._sections import concat_sections, select_sections
from ._spatialdata import from_spatialdata
from ._synthetic import synthetic_spatialdata, synthetic_tissue
from ._synthetic_hd import write_synthetic_visium_hd
from ._synthetic_subspot import synthetic_subspot_tissue
from ._visium import read_visium
from ._visium_hd import read_visium_hd

__all__ = [
    "InputData",
    "choose_image_key",
    "concat_sections",
    "downsample_images",
    "fetch_her2st",
    "from_spatialdata",
    "read_h5ad",
    "read_her2st",
    "read_hest",
    "read_image",
    "read_input",
    "read_visium",
    "read_visium_hd",
    "select_sections",
    "synthetic_spatialdata",
    "synthetic_subspot_tissue",
    "synthetic_tissue",
    "write_synthetic_visium_hd",
]
