"""Prediction from spots' patches: the patch reader of new data, batched trunk passes, and, for a network
that predicts from each spot's neighbourhood (``context="neighbors"``), the neighbours and the latents they
need."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from st_predict._utils import InputError, MissingKeyError, index_batches, run_batches, thread_limits
from st_predict.pp import (
    N_NEIGHBORS_STORED,
    context_neighbors,
    make_patch_reader,
    spot_coordinates,
    spot_libraries,
)


class InferenceMixin:
    """:meth:`_inference`, the one loop behind :meth:`get_predicted_expression` and
    :meth:`get_latent_representation`."""

    def _reader_for(self, adata: AnnData, keys: dict | None = None):
        """Patches of ``adata``'s spots: the setup's keys unless ``keys`` names others; the patch is
        the model's :attr:`patch_geometry_` on ``adata``'s sections."""
        setup, library_key = self._prediction_keys(adata, keys)
        if self.patch_geometry_ is None:
            raise InputError("This model has no patch geometry (it was neither set up nor loaded).")
        libraries = spot_libraries(adata, library_key)
        sizes = self.patch_geometry_.pixels_for(adata, libraries)
        return make_patch_reader(adata, setup["spatial_key"], setup["image_key"], library_key, sizes,
                                 self.module.image_size)

    def _prediction_keys(self, adata: AnnData, keys: dict | None) -> tuple[dict, str | None]:
        """The setup's keys with ``keys``' replacements, and the library column to use on ``adata`` (``None``
        for single-section data without the column)."""
        setup = {**self.registry_["setup_args"], **{k: v for k, v in (keys or {}).items() if v is not None}}
        library_key = setup["library_key"]
        if library_key is not None and library_key not in adata.obs:
            if keys and keys.get("library_key"):
                raise MissingKeyError(f"adata.obs has no column {library_key!r} (library_key).")
            library_key = None  # single-section data without the column: spot_libraries checks uns
        return setup, library_key

    def spot_neighbors(self, adata: AnnData, library_key: str | None = None,
                       spatial_key: str | None = None) -> np.ndarray:
        """``(n_obs, K)`` row indices of each spot's ``K`` nearest spots of the same section in ``adata``
        (squidpy's graph on these spots), the neighbourhood a ``context="neighbors"`` network predicts from.
        A section with ``K`` spots or fewer pads its spots' lists with the spot itself."""
        setup, lib_key = self._prediction_keys(adata, {"library_key": library_key, "spatial_key": spatial_key})
        coords = spot_coordinates(adata, setup["spatial_key"])
        k = self.module.n_neighbors
        # as training reads them (the first K of the registered 25 nearest): the same neighbours on the same spots,
        # ties at the K-th distance included
        return context_neighbors(coords, spot_libraries(adata, lib_key), max(k, N_NEIGHBORS_STORED))[:, :k]

    def _target(self, adata: AnnData | None) -> AnnData:
        if adata is None:
            adata = self.adata if self.adata is not None else self._predict_adata
        if adata is None:
            raise InputError("This model was loaded without AnnData: pass adata=.")
        return adata

    def _inference(
        self, adata, indices, batch_size, what: str, progress: bool = False, keys: dict | None = None,
        tta: bool = False, trunk_features: torch.Tensor | None = None, feature_cache=None,
    ) -> tuple[np.ndarray, pd.Index]:
        adata = self._target(adata)
        if feature_cache is not None and feature_cache is not False and trunk_features is None:
            if self.module.trunk_mode != "frozen":
                raise InputError("feature_cache is for a frozen encoder (trunk='frozen').")
            with thread_limits():
                trunk_features = self.encoder_maps(self._reader_for(adata, keys), 8 if tta else 1, feature_cache,
                                                   self.module.device, batch_size, progress)
        cache = trunk_features
        if cache is None and adata is self.adata and self._data is not None and not any((keys or {}).values()):
            cache = self._data.fmaps
        if cache is not None and len(cache) != adata.n_obs:
            raise InputError(f"trunk_features has {len(cache)} rows for {adata.n_obs} spots.")
        reader = None if cache is not None else self._reader_for(adata, keys)
        n_obs = adata.n_obs
        indices = np.arange(n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= n_obs):
            raise InputError(f"indices must be in [0, {n_obs}).")
        module = self.module
        context = what == "expression" and module.context != "patch"
        neighbors = None
        if context:  # the neighbours' latents are needed too
            neighbors = self.spot_neighbors(adata, (keys or {}).get("library_key"), (keys or {}).get("spatial_key"))
            rows = np.unique(np.concatenate([indices, neighbors[indices].ravel()]))
        else:
            rows = indices

        def one_batch(idx: np.ndarray) -> torch.Tensor:
            if cache is not None:
                return self._from_fmaps(cache[torch.as_tensor(idx)].to(module.device), "latent" if context else what, tta)
            batch = {"patches": reader.read(idx).to(module.device)}
            if what == "expression" and not context:
                return module.predict_expression(batch, tta=tta)
            return module.latent(batch, tta=tta)

        with thread_limits():
            out = run_batches(one_batch, index_batches(rows, batch_size), len(rows), module, progress,
                              f"Predicting {len(indices)} spots")
            if context and out is not None:
                out = self._translate_neighborhoods(out, rows, indices, neighbors, batch_size)
        width = len(self.genes_) if what == "expression" else module.path_head.proj.out_features
        arr = out.numpy() if out is not None else np.zeros((0, width), dtype=np.float32)
        return arr, adata.obs_names[indices]

    def _translate_neighborhoods(self, latents: torch.Tensor, rows: np.ndarray, targets: np.ndarray,
                                 neighbors: np.ndarray, batch_size: int) -> torch.Tensor:
        """Predictions of ``targets`` from the latents of ``rows`` (which hold every target and its neighbours)."""
        module = self.module
        where = np.full(len(neighbors), -1, dtype=np.int64)
        where[rows] = np.arange(len(rows))
        h = latents.to(module.device)

        def one_batch(t: np.ndarray) -> torch.Tensor:
            nodes = torch.as_tensor(where[np.concatenate([t[:, None], neighbors[t]], axis=1)])
            return module.predict_from_latents(h[nodes[:, 0]], h[nodes])

        out = run_batches(one_batch, index_batches(targets, batch_size), len(targets), module)
        return out if out is not None else torch.zeros((0, len(self.genes_)))

    def _from_fmaps(self, fm: torch.Tensor, what: str, tta: bool) -> torch.Tensor:
        module = self.module
        if fm.ndim == 5:  # (m, 8, C, h, w): the 8 views of a frozen trunk's cache
            if tta:
                if what == "expression":
                    return torch.stack([module.predict_expression({"fmaps": fm[:, v]}) for v in range(fm.shape[1])]).mean(0)
                return torch.stack([module.latent({"fmaps": fm[:, v]}) for v in range(fm.shape[1])]).mean(0)
            fm = fm[:, 0]
        if what == "expression":
            return module.predict_expression({"fmaps": fm})
        return module.latent({"fmaps": fm})
