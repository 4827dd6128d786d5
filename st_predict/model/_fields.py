"""The data facts NH2ST reads, registered once in the scvi-tools registry: the sections, each spot's spatial
neighbours, and the patch (image, geometry, spot pitch). Every reader asks the registry (:func:`setup_facts`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import rich.table
from anndata import AnnData
from scvi.data.fields import BaseAnnDataField

from st_predict._utils import REGISTRY_KEYS, InputError
from st_predict.pp import (
    PatchGeometry,
    make_patch_reader,
    section_images,
    section_pixel_sizes,
    spot_coordinates,
    spot_libraries,
)


def _pitch_um(first_distances: np.ndarray, libraries: np.ndarray, pixel_sizes: dict) -> float | None:
    """Median distance in micrometres from each spot to its nearest spot of the section (``None`` when a pixel
    size is unknown or no spot has a neighbour)."""
    if any(v is None for v in pixel_sizes.values()) or first_distances is None:
        return None
    mpp = np.array([pixel_sizes[str(lib)] for lib in libraries], dtype=np.float64)
    d = np.asarray(first_distances, dtype=np.float64) * mpp
    d = d[np.isfinite(d)]
    return float(np.median(d)) if len(d) else None


class PatchField(BaseAnnDataField):
    """The patch of every spot, resolved once when the AnnData is set up: the image it is cropped from
    (``uns["spatial"][section]["images"][image_key]``), its side (:class:`~st_predict.pp.PatchGeometry`:
    micrometres where the pixel sizes are known), the pixels that side takes on each section, and the training
    data's spot pitch (from the registered neighbour distances). ``transfer_field`` gives the pixels of the same
    physical patch on another AnnData's sections."""

    def __init__(self, image_key: str, spatial_key: str, library_key: str | None, patch_size: float | None,
                 patch_size_um: float | None, neighbors_key: str | None):
        super().__init__()
        self._image_key, self._spatial_key, self._library_key = image_key, spatial_key, library_key
        self._patch_size, self._patch_size_um, self._neighbors_key = patch_size, patch_size_um, neighbors_key

    registry_key = REGISTRY_KEYS.PATCH_KEY
    attr_name = "uns"
    attr_key = "spatial"
    is_empty = False

    def _sections(self, adata: AnnData) -> tuple[np.ndarray, list[str]]:
        libraries = spot_libraries(adata, self._library_key)
        return libraries, [str(s) for s in pd.unique(libraries)]

    def _state(self, adata: AnnData, geometry: PatchGeometry, pitch_um: float | None) -> dict:
        libraries, sections = self._sections(adata)
        sizes = section_pixel_sizes(adata, libraries)
        pixels = geometry.pixels(sizes)
        make_patch_reader(adata, self._spatial_key, self._image_key, self._library_key, pixels, out_size=32)  # checks
        return {"image_key": self._image_key, "spatial_key": self._spatial_key, "library_key": self._library_key,
                "size_um": geometry.size_um, "size_px": geometry.size_px, "sections": sections,
                "pixel_sizes": {str(k): v for k, v in sizes.items()}, "patch_px": pixels, "spot_pitch_um": pitch_um}

    def validate_field(self, adata: AnnData) -> None:
        spot_coordinates(adata, self._spatial_key)
        libraries, _ = self._sections(adata)
        # each section's uns["spatial"] entry and image first: a missing entry is the real error, not the pixel size
        # it would then lack
        section_images(adata, libraries, self._image_key)

    def register_field(self, adata: AnnData) -> dict:
        self.validate_field(adata)
        libraries, _ = self._sections(adata)
        geometry = PatchGeometry.resolve(adata, libraries, self._patch_size, self._patch_size_um)
        distances = adata.obsm.get(f"{self._neighbors_key}_distances") if self._neighbors_key else None
        first = None if distances is None or np.asarray(distances).shape[1] == 0 else np.asarray(distances)[:, 0]
        return self._state(adata, geometry, _pitch_um(first, libraries, section_pixel_sizes(adata, libraries)))

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        """The same physical patch (and the training data's pitch) on ``adata_target``'s sections."""
        self.validate_field(adata_target)
        geometry = PatchGeometry(state_registry["size_um"], state_registry["size_px"])
        return self._state(adata_target, geometry, state_registry.get("spot_pitch_um"))

    def get_summary_stats(self, state_registry: dict) -> dict:
        return {"n_sections": len(state_registry["sections"])}

    def view_state_registry(self, state_registry: dict) -> rich.table.Table | None:
        geometry = PatchGeometry(state_registry["size_um"], state_registry["size_px"])
        pitch = state_registry.get("spot_pitch_um")
        t = rich.table.Table(title=f"patch State Registry: {geometry}, image {state_registry['image_key']!r}, "
                             f"spot pitch {'unknown' if pitch is None else f'{pitch:.4g} um'}")
        for col in ("Section", "um per pixel", "Patch (pixels)"):
            t.add_column(col, justify="center", no_wrap=True, overflow="fold")
        for sec in state_registry["sections"]:
            mpp = state_registry["pixel_sizes"].get(sec)
            t.add_row(sec, "unknown" if mpp is None else f"{mpp:.4g}", f"{state_registry['patch_px'][sec]:.4g}")
        return t


@dataclass(frozen=True)
class SetupFacts:
    """What the registry says about the training AnnData, read once per model: each spot's section, the
    sections in order, the patch and its pixels per section, the spot pitch, and the stored neighbours."""

    libraries: np.ndarray
    sections: list[str]
    geometry: PatchGeometry
    patch_px: dict
    spot_pitch_um: float | None
    neighbors: np.ndarray | None  # (n_obs, K_stored) row positions, nearest first

    def neighbors_for(self, k: int) -> np.ndarray:
        """The first ``k`` neighbours of each spot; every section must have more than ``k`` spots."""
        from st_predict.pp import spatial_knn

        counts = pd.Series(self.libraries).value_counts()
        small = counts[counts < k + 1]
        if len(small):
            spatial_knn(np.zeros((len(self.libraries), 2)), self.libraries, k)  # raises the error that names them
        if self.neighbors is None or self.neighbors.shape[1] < k:
            have = 0 if self.neighbors is None else self.neighbors.shape[1]
            raise InputError(
                f"The registered neighbours hold {have} per spot but the model needs K = {k}: set up with "
                f"setup_anndata(..., n_neighbors={k}), or run st_predict.pp.spatial_neighbors(adata, n_neighs={k}) "
                "before setup_anndata."
            )
        return np.ascontiguousarray(self.neighbors[:, :k])


def setup_facts(manager) -> SetupFacts:
    """The :class:`SetupFacts` of a registered AnnData (an :class:`~scvi.data.AnnDataManager`)."""
    registry = manager.registry
    fields = registry["field_registries"]
    patch = fields[REGISTRY_KEYS.PATCH_KEY]["state_registry"]
    sections = list(patch["sections"])
    if patch["library_key"] is None:
        libraries = np.full(manager.adata.n_obs, sections[0], dtype=object)
    else:
        mapping = np.asarray(fields[REGISTRY_KEYS.LIBRARY_KEY]["state_registry"]["categorical_mapping"]).astype(str)
        codes = np.asarray(manager.get_from_registry(REGISTRY_KEYS.LIBRARY_KEY)).ravel().astype(np.int64)
        libraries = mapping[codes].astype(object)
    neighbors = None
    if REGISTRY_KEYS.NEIGHBOR_INDICES_KEY in fields:
        neighbors = np.asarray(manager.get_from_registry(REGISTRY_KEYS.NEIGHBOR_INDICES_KEY), dtype=np.int64)
    return SetupFacts(np.asarray(libraries).astype(str), sections, PatchGeometry(patch["size_um"], patch["size_px"]),
                      dict(patch["patch_px"]), patch.get("spot_pitch_um"), neighbors)
