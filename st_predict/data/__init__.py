"""Data: readers, the SpatialData front end and the synthetic tissue generator."""

from ._her2st import fetch_her2st, read_her2st
from ._sections import select_sections
from ._spatialdata import from_spatialdata
from ._synthetic import synthetic_spatialdata, synthetic_tissue

__all__ = ["fetch_her2st", "from_spatialdata", "read_her2st", "select_sections", "synthetic_spatialdata", "synthetic_tissue"]
