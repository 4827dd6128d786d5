"""The tests' Visium HD folders: :func:`st_predict.data.write_synthetic_visium_hd` and its constants (importable
because pyproject sets pytest's pythonpath to tests/)."""

from st_predict.data import write_synthetic_visium_hd as write_space_ranger_hd
from st_predict.data._synthetic_hd import (
    GENES,
    HIRES_SCALEF,
    LOWRES_SCALEF,
    MICRONS_PER_PIXEL,
    barcode,
    bin_side_px,
)

__all__ = ["GENES", "HIRES_SCALEF", "LOWRES_SCALEF", "MICRONS_PER_PIXEL", "barcode", "bin_side_px", "write_space_ranger_hd"]
