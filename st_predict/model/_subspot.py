"""Below the spot: a head on the trained network's finer feature map, fitted to the spots' measured counts
(``train_bins``), and expression on a lattice of square bins near every spot (``predict_bins``)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from st_predict._utils import (
    REGISTRY_KEYS,
    InputError,
    MissingKeyError,
    footprint_fraction,
    interval_overlap,
    quiet_logger,
    spot_shape,
    thread_limits,
)

logger = logging.getLogger(__name__)

#: stride of the trunk map the bins are read from (a ResNet's layer2)
BIN_STRIDE = 8


def _spot_diameters(adata: AnnData, sections) -> dict[str, float]:
    """Each section's spot diameter in full-resolution pixels (``scalefactors["spot_diameter_fullres"]``)."""
    out = {}
    for sec in sections:
        entry = adata.uns.get("spatial", {}).get(str(sec), {})
        value = entry.get("scalefactors", {}).get("spot_diameter_fullres")
        if value is None or not np.isfinite(float(value)) or float(value) <= 0:
            raise MissingKeyError(f"Section {sec!r} has no spot diameter: sub-spot bins are tied to the spot's disc, "
                                  f"read from adata.uns['spatial'][{str(sec)!r}]['scalefactors']['spot_diameter_fullres'].")
        out[str(sec)] = float(value)
    return out


def _spot_squares(adata: AnnData, sections) -> dict[str, bool]:
    """Whether each section's spots are squares (Visium HD bins, side ``spot_diameter_fullres``) rather than
    discs (:func:`st_predict._utils.spot_shape`)."""
    return {str(s): spot_shape(adata.uns.get("spatial", {}).get(str(s), {})) == "square" for s in sections}


def _footprints(adata: AnnData, rows: np.ndarray, libraries: np.ndarray, patch_px: dict, diam: dict,
                map_size, footprint_key: str | None, square: dict | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """The footprints (fraction of each map cell inside the spot) of ``adata``'s spots ``rows`` and each row's
    index into them: one disc (or where ``square[section]``, one square) per section, or with ``footprint_key``
    each spot's union of them at ``obsm[footprint_key]`` ``(n, k, 2)`` offsets in pixels
    (:func:`st_predict.pp.pool_spots`)."""
    from st_predict.nn import disc_weights

    h, w = map_size
    square = square or {}
    cells = {s: w / float(patch_px[s]) for s in dict.fromkeys(libraries[rows])}  # map cells per pixel
    if footprint_key is None:
        secs = list(cells)
        fps = [disc_weights(h, w, diam[s] / 2 * cells[s], square=square.get(s, False)) for s in secs]
        return torch.stack(fps), np.array([secs.index(libraries[r]) for r in rows], dtype=np.int64)
    if footprint_key not in adata.obsm:
        raise MissingKeyError(f"adata.obsm has no {footprint_key!r} (footprint_key): each spot's member offsets.")
    off = np.asarray(adata.obsm[footprint_key], np.float64)
    if off.ndim != 3 or off.shape[0] != adata.n_obs or off.shape[2] != 2:
        raise InputError(f"adata.obsm[{footprint_key!r}] must be (n_obs, k, 2) offsets in pixels, got {off.shape}.")
    fps = []
    for r in rows:
        s, o = libraries[r], off[r][np.isfinite(off[r]).all(1)]
        reach = float(np.abs(o).max(initial=0.0)) + diam[s] / 2 * (np.sqrt(2) if square.get(s) else 1.0)
        if reach > 1.05 * float(patch_px[s]) / 2:
            raise InputError(f"The footprint of spot {adata.obs_names[r]!r} reaches {reach:.0f} px from its centre, "
                             f"beyond the {float(patch_px[s]):.0f}-px patch: set the model up with a larger patch.")
        fps.append(disc_weights(h, w, diam[s] / 2 * cells[s], centres=o * cells[s], square=square.get(s, False)))
    return torch.stack(fps), np.arange(len(rows), dtype=np.int64)


class SubspotMixin:
    """:meth:`train_bins` and :meth:`predict_bins` of :class:`~st_predict.NH2ST`."""

    #: the sub-spot head: its weights and settings (``None`` until :meth:`train_bins`)
    bins_: dict | None = None

    @property
    def has_bins(self) -> bool:
        """Whether :meth:`train_bins` has fitted a sub-spot head."""
        return self.bins_ is not None

    def _bin_module(self):
        from st_predict.module import BinModule

        cfg = self.bins_["config"]
        bins = BinModule(len(self.genes_), cfg["fine_channels"], cfg["final_channels"], torch.ones(len(self.genes_)),
                         torch.zeros(cfg["n_footprints"], *cfg["map_size"]), cfg["hidden"], cfg["loss"], BIN_STRIDE)
        bins.load_state_dict(self.bins_["state"])
        return bins.to(self.module.device).eval()

    def train_bins(self, max_epochs: int = 30, batch_size: int = 32, lr: float = 3e-3, weight_decay: float = 0.1,
                   bin_loss: str = "nb", hidden: int = 64, augment: bool = True, footprint_key: str | None = None,
                   accelerator: str = "auto", devices="auto", progress: bool = False) -> None:
        """Fit the sub-spot head of this trained model: per-gene densities on the cells of the trunk's stride-8
        map of each training patch, whose sum over the spot's disc must explain the spot's measured counts.

        The trained network stays as it is (its trunk is read, not trained). The head's densities are shares of
        the library per unit of area; a spot's expected counts are its library times the mean density over its
        disc (a sum of rates, never a mean of logs), scored by a negative binomial with one dispersion per gene
        (``bin_loss="nb"``; spot counts are overdispersed) or a Poisson (``"poisson"``).

        Parameters
        ----------
        max_epochs, batch_size, lr, weight_decay
            Passes over the training spots, spots per step, AdamW's learning rate and weight decay.
        bin_loss
            ``"nb"`` or ``"poisson"``.
        hidden
            Width of the head.
        augment
            Flip and rotate each patch and its footprint alike at random.
        footprint_key
            ``obsm`` key of each spot's footprint as member offsets ``(n, k, 2)`` in pixels (the union of their
            discs; :func:`st_predict.pp.pool_spots` writes ``"footprint"``); ``None``: the spot's own disc.
        accelerator, devices, progress
            As Lightning's ``Trainer``.
        """
        import lightning.pytorch as pl
        import scipy.sparse as sp

        from st_predict.module import BinModule
        from st_predict.train import BinTrainingPlan

        self._check_if_trained(warn=False)
        if not self.registry_["setup_args"]["is_count_data"]:
            raise InputError("train_bins fits the spots' counts: this model was set up with is_count_data=False.")
        for name, value in (("max_epochs", max_epochs), ("batch_size", batch_size), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise InputError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.module.trunk_mode == "frozen":
            raise InputError("train_bins reads the trunk's stride-8 map, which a frozen encoder's feature cache does "
                             "not keep: train the model with trunk='finetune' (the ResNet18).")
        data = self._training_data()
        patches = self.training_patches()
        counts = sp.csr_matrix(self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY), dtype=np.float64)
        gene_idx = self.adata.var_names.get_indexer(list(self.genes_))
        x = counts[:, gene_idx]
        library = np.asarray((x if self._library_size == "selected_genes" else counts).sum(1), np.float64).ravel()
        x = np.asarray(x.todense(), np.float32)
        if np.any(library <= 0):
            raise InputError(f"{int((library <= 0).sum())} training spots have no counts: their bins explain nothing.")
        module = self.module
        with torch.no_grad():
            probe = BinModule(len(self.genes_), 1, 1, torch.ones(len(self.genes_)), torch.ones(1, 1, 1))
            fine, final = probe.features(module.eval(), patches[np.arange(min(2, len(library)))].to(module.device))
        map_size = tuple(fine.shape[-2:])
        libraries = np.asarray(data.libraries).astype(str)
        sections = list(dict.fromkeys(libraries))
        diam, square = _spot_diameters(self.adata, sections), _spot_squares(self.adata, sections)
        patch_px = self._facts.patch_px
        radius = {s: diam[s] / 2 / float(patch_px[s]) * map_size[1] for s in sections}
        footprints, fp_index = _footprints(self.adata, np.arange(len(library)), libraries, patch_px, diam, map_size,
                                           footprint_key, square)
        share0 = torch.from_numpy(x.sum(0) / library.sum()).float()
        bins = BinModule(len(self.genes_), fine.shape[1], final.shape[1], share0, footprints, hidden, bin_loss, BIN_STRIDE)
        plan = BinTrainingPlan(bins, module, lr=lr, weight_decay=weight_decay, augment=augment)
        xt, lt, ft = torch.from_numpy(x), torch.from_numpy(library).float(), torch.from_numpy(fp_index)

        def collate(idx):
            idx = np.sort(np.asarray(idx, np.int64))
            return {"patches": torch.as_tensor(patches[idx]), "counts": xt[idx], "library": lt[idx], "footprint": ft[idx]}

        loader = torch.utils.data.DataLoader(np.arange(len(library)), batch_size=batch_size, shuffle=True,
                                             collate_fn=collate, drop_last=len(library) > batch_size)
        # Lightning's "GPU available" and tips: only with progress
        with quiet_logger("lightning.pytorch", logging.INFO if progress else logging.WARNING), thread_limits():
            trainer = pl.Trainer(max_epochs=max_epochs, accelerator=accelerator, devices=devices, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=bool(progress), enable_model_summary=False)
            trainer.fit(plan, loader)
        module.eval()
        self.bins_ = {"state": {k: v.detach().cpu().clone() for k, v in bins.state_dict().items()},
                      "config": {"fine_channels": int(fine.shape[1]), "final_channels": int(final.shape[1]),
                                 "map_size": list(map_size), "n_footprints": len(footprints), "footprint_key": footprint_key, "hidden": int(hidden),
                                 "loss": bin_loss, "sections": sections, "radius_cells": radius, "square": square,
                                 "max_epochs": int(max_epochs), "lr": float(lr), "weight_decay": float(weight_decay)},
                      "history": [float(v) for v in plan.history]}

    def predict_bins(self, adata: AnnData | None = None, bin_um: float | None = None, reconcile: bool = True,
                     footprint_key: str | None = None, batch_size: int = 64) -> AnnData:
        """Expression on square bins near every spot of ``adata`` (default: the training AnnData).

        Each section is cut into a lattice of squares of ``bin_um`` micrometres (default: the head's native cell,
        the patch's side over the stride-8 map's size), origin at pixel 0. A bin belongs to its nearest spot
        when it lies inside that spot's patch; its densities are the area-weighted mean of the cells of that
        spot's map it covers. With ``reconcile`` each patch's densities are scaled per gene so that their mean
        over the spot's disc is the model's spot prediction (the head then says only where inside the spot);
        without, they are the head's own.

        Returns
        -------
        AnnData (bins x genes): ``X`` = ``log1p(1e4 * density)`` (the counts per 10k a spot would have if all
        of it were like this bin: the spots' scale), ``layers["share"]`` the densities, ``obs`` with
        ``section``, ``spot`` (the nearest spot's name), ``spot_distance`` (px), ``spot_weight`` (the bin's
        fraction inside that spot's disc), ``bin_row``/``bin_col`` (lattice indices), ``obsm["spatial"]`` bin
        centres in the section's full-resolution pixels (x, y), ``uns["spatial"]`` the sections' images with
        ``spot_diameter_fullres`` = the bin's side, and ``uns["st_predict"]["bins"]`` the settings.
        """
        from scipy.spatial import cKDTree

        from st_predict.pp import section_pixel_sizes, spot_coordinates, spot_libraries

        if not self.has_bins:
            raise InputError("This model has no sub-spot head: call model.train_bins() after model.train().")
        adata = self._target(adata)
        setup, library_key = self._prediction_keys(adata, None)
        libraries = spot_libraries(adata, library_key).astype(str)
        coords = spot_coordinates(adata, setup["spatial_key"])
        sections = list(dict.fromkeys(libraries))
        patch_px = self.patch_geometry_.pixels_for(adata, libraries)
        diam, square = _spot_diameters(adata, sections), _spot_squares(adata, sections)
        mpp = section_pixel_sizes(adata, libraries)
        h, w = self.bins_["config"]["map_size"]
        side = {}
        for s in sections:
            native = float(patch_px[s]) / w
            if bin_um is None:
                side[s] = native
            elif mpp[s] is None:
                raise InputError(f"bin_um={bin_um!r} needs section {s!r}'s pixel size (uns['spatial'][{s!r}]"
                                 "['metadata']['pixel_size_um']); pass bin_um=None for the native cell.")
            else:
                side[s] = float(bin_um) / mpp[s]
            if side[s] < native * 0.999:
                logger.warning("Section %r: bins of %.3g px are finer than the head's native cell (%.3g px); they "
                               "repeat its cells.", str(s), side[s], native)
        # the bins of each spot: lattice squares inside its patch whose centre is nearest to it
        plan = []
        for s in sections:
            rows = np.flatnonzero(libraries == s)
            tree = cKDTree(coords[rows])
            b, half = side[s], float(patch_px[s]) / 2
            for r in rows:
                cx, cy = coords[r]
                cols = np.arange(np.ceil((cx - half) / b - 1e-9), np.floor((cx + half) / b + 1e-9))
                rws = np.arange(np.ceil((cy - half) / b - 1e-9), np.floor((cy + half) / b + 1e-9))
                if len(cols) == 0 or len(rws) == 0:
                    continue
                gy, gx = np.meshgrid(rws, cols, indexing="ij")
                centres = np.stack([(gx.ravel() + 0.5) * b, (gy.ravel() + 0.5) * b], 1)
                keep = rows[tree.query(centres)[1]] == r
                plan.append((r, gy.ravel()[keep].astype(np.int64), gx.ravel()[keep].astype(np.int64)))
        n_bins = int(sum(len(p[1]) for p in plan))
        genes = list(self.genes_)
        share = np.zeros((n_bins, len(genes)), np.float32)
        bin_rc = np.zeros((n_bins, 2), np.int64)
        owner = np.zeros(n_bins, np.int64)
        spot_pred = None
        if reconcile:
            spot_pred = self.get_predicted_expression(adata, return_numpy=True, batch_size=batch_size)
        bins = self._bin_module()
        reader = self._reader_for(adata)
        module = self.module.eval()
        pos = 0
        with thread_limits(), torch.no_grad():
            for start in range(0, len(plan), batch_size):
                chunk = plan[start: start + batch_size]
                idx = np.array([p[0] for p in chunk])
                fine, final = bins.features(module, reader.read(idx).to(module.device))
                rho = bins.rates(fine, final)
                if reconcile:
                    fps, where = _footprints(adata, idx, libraries, patch_px, diam, (h, w), footprint_key, square)
                    fp = fps[torch.from_numpy(where)].to(rho)
                    target = torch.from_numpy(np.expm1(spot_pred[idx]) / 1e4).to(rho)
                    rho = rho * (target / bins.spot_share(rho, fp).clamp_min(1e-12))[:, :, None, None]
                rho = rho.cpu().numpy().astype(np.float64)
                for (r, by, bx), dens in zip(chunk, rho, strict=True):
                    s = libraries[r]
                    b, cell = side[s], float(patch_px[s]) / w
                    x0, y0 = coords[r][0] - float(patch_px[s]) / 2, coords[r][1] - float(patch_px[s]) / 2
                    oy = interval_overlap(by * b, b, y0, cell, h)
                    ox = interval_overlap(bx * b, b, x0, cell, w)
                    vals = np.einsum("bi,gij,bj->bg", oy, dens, ox)
                    share[pos: pos + len(by)] = vals
                    bin_rc[pos: pos + len(by)] = np.stack([by, bx], 1)
                    owner[pos: pos + len(by)] = r
                    pos += len(by)
        sec_of = libraries[owner]
        b_of = np.array([side[s] for s in sec_of])
        centres = np.stack([(bin_rc[:, 1] + 0.5) * b_of, (bin_rc[:, 0] + 0.5) * b_of], 1)
        dist = np.linalg.norm(centres - coords[owner], axis=1)
        weight = footprint_fraction(centres, b_of, coords[owner], np.array([diam[s] / 2 for s in sec_of]),
                                    np.array([square[s] for s in sec_of]))
        obs = pd.DataFrame({"section": pd.Categorical(sec_of, categories=sections),
                            "spot": np.asarray(adata.obs_names)[owner], "spot_distance": dist, "spot_weight": weight,
                            "bin_row": bin_rc[:, 0], "bin_col": bin_rc[:, 1]},
                           index=[f"{s}_bin{r}_{c}" for s, r, c in zip(sec_of, bin_rc[:, 0], bin_rc[:, 1], strict=True)])
        out = AnnData(X=np.log1p(1e4 * share).astype(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
        out.layers["share"] = share
        out.obsm["spatial"] = centres
        spatial = adata.uns.get("spatial", {})
        out.uns["spatial"] = {s: {"images": dict(spatial.get(s, {}).get("images", {})),
                                  "scalefactors": {**spatial.get(s, {}).get("scalefactors", {}), "spot_diameter_fullres": side[s]},
                                  "metadata": dict(spatial.get(s, {}).get("metadata", {}))} for s in sections}
        out.uns["st_predict"] = {"bins": {"bin_um": -1.0 if bin_um is None else float(bin_um), "reconcile": bool(reconcile),
                                          "bin_px": {s: side[s] for s in sections},
                                          "native_cell_px": {s: float(patch_px[s]) / w for s in sections},
                                          "scale": "log1p(1e4 * share of the spot's library per unit of area)"}}
        return out
