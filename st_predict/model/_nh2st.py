"""NH2ST as an scvi-tools model: ``NH2ST.setup_anndata(adata); model = NH2ST(adata); model.train()``."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import rich.pretty  # noqa: F401  (scvi-tools' view_anndata_setup calls rich.pretty without importing it)
import torch
from anndata import AnnData
from scipy.spatial import cKDTree
from scvi import settings
from scvi.data import AnnDataManager
from scvi.data.fields import LayerField, ObsmField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin
from scvi.utils import setup_anndata_dsp

from st_predict._constants import PREDICTED_KEY, REGISTRY_KEYS
from st_predict._threads import interactive, limit_threads
from st_predict.model._docstrings import nh2st_dsp
from st_predict.module import NH2STModule
from st_predict.nn import load_trunk_weights
from st_predict.pp import (
    check_expression,
    check_sections_have_counts,
    make_patch_reader,
    normalize_expression,
    patch_size_pixels,
    section_pixel_sizes,
    select_genes,
    spatial_knn,
    spot_coordinates,
    spot_libraries,
)
from st_predict.train import (
    BestEpoch,
    EpochCheckpoint,
    NH2STCollate,
    NH2STDataModule,
    NH2STTrainingPlan,
    Recipe,
    compute_fmaps,
    get_recipe,
    split_validation,
)

logger = logging.getLogger(__name__)

# Set while ``NH2ST.load`` rebuilds a model: the trunk weights then come from the saved state dict,
# so ``__init__`` must not fetch pretrained weights.
_LOADING = contextvars.ContextVar("st_predict_loading", default=False)

#: Version of the saved-model layout (``model.pt``'s keys, the module's parameters and attributes).
#: Raised when a change means older releases cannot read new files or this release cannot read old
#: ones; models saved before versions were recorded are format 1.
SAVE_FORMAT = 1

#: keywords of :class:`NH2STModule` that a user (or a recipe) may set; ``n_genes`` comes from the data
MODULE_DEFAULTS = {
    name: p.default for name, p in inspect.signature(NH2STModule).parameters.items() if name != "n_genes"
}
MODULE_KEYWORDS = tuple(MODULE_DEFAULTS)
#: :meth:`NH2ST.train` settings that a recipe provides (``None`` in the call: the recipe's value)
TRAIN_KEYWORDS = (
    "max_epochs", "batch_size", "optimizer", "lr", "weight_decay", "schedule", "warmup", "lr_step_size",
    "lr_gamma", "augment", "validation", "best_epoch", "precision", "batches", "center_sections",
)


class _TrainingData:
    """What training needs from the registered AnnData, computed once per model."""

    def __init__(self, targets: torch.Tensor, neighbors: torch.Tensor | None, reader, libraries: np.ndarray):
        self.targets = targets
        self.neighbors = neighbors
        self.reader = reader
        self.libraries = libraries
        self.fmaps: torch.Tensor | None = None  # frozen trunk: cached maps (n, C, h, w) or (n, 8, C, h, w)
        self.patches: torch.Tensor | None = None  # end to end: uint8 patches at the trunk's resolution


@nh2st_dsp.dedent
class NH2ST(UnsupervisedTrainingMixin, BaseModelClass):
    """NH2ST :cite:p:`Qu2025`: spatial gene expression from H&E patches, trained with a query branch
    and a hypergraph neighbour branch aligned by cross-attention and contrastive learning.

    Only the translator path, ``translator(head(trunk(patch)))``, runs at inference, so
    :meth:`predict` works on slides with an H&E image and spot positions but no expression.

    Every setting of the network and of its training comes from a named ``recipe``; any keyword
    given here (or to :meth:`train`) overrides it. ``recipe="default"`` trains the ResNet18 end to end
    on 64 px patches, which fits ~900 spots on a laptop CPU in minutes; ``image_size=224`` gives
    the paper-scale network (a GPU job). ``recipe="paper"`` reproduces the paper's settings.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (``None`` only when loading).
    registry
        Saved registry (used by :meth:`load`).
    recipe
        ``"default"`` or ``"paper"`` (see :data:`st_predict.train.RECIPES`), or a
        :class:`~st_predict.train.Recipe`.
    n_genes
        Number of genes to predict: the most highly expressed genes detected in every section
        (ignored when ``genes`` is given).
    genes
        Explicit list of genes to predict (all must be in ``adata.var_names``).
    weights
        Trunk initialisation: ``"imagenet"`` (torchvision IMAGENET1K_V1 from the torch hub cache or
        the internet; falls back to random init with a loud warning), a path to a ResNet18 state dict
        (e.g. a histology self-supervised checkpoint), a state dict itself, or ``"random"``. Shown in
        the summary, saved.
    library_size
        Normalisation of count targets: library size over ``"all_genes"`` (scanpy's
        ``normalize_total``) or over the ``"selected_genes"`` (authors' code).
    tta
        Average predictions over the 8 flips/90-degree rotations of each patch (test-time
        augmentation); ``None``: the recipe's choice. :meth:`get_predicted_expression` can override it.
    **model_kwargs
        Settings of the network (:class:`~st_predict.module.NH2STModule`), each defaulting to the
        recipe's value:

        %(nh2st_module.model_parameters)s

    Notes
    -----
    Targets and predictions are ``log1p(counts / library size * 1e4)`` (natural log) of the selected
    genes, unless ``setup_anndata(is_count_data=False)`` said the data is already normalised, in which
    case they are on that scale.

    Examples
    --------
    >>> adata = st_predict.data.synthetic_tissue()
    >>> st_predict.NH2ST.setup_anndata(adata, library_key="section")
    >>> model = st_predict.NH2ST(adata)
    >>> model.train()
    >>> model.predict(new_adata, key_added="nh2st")  # new_adata needs an image and obsm["spatial"] only
    """

    _module_cls = NH2STModule
    _training_plan_cls = NH2STTrainingPlan

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        recipe: str | Recipe = "default",
        n_genes: int = 250,
        genes: Sequence[str] | None = None,
        weights: str | os.PathLike | Mapping | None = "imagenet",
        library_size: Literal["all_genes", "selected_genes"] = "all_genes",
        tta: bool | None = None,
        **model_kwargs,
    ):
        super().__init__(adata, registry)
        if library_size not in ("all_genes", "selected_genes"):
            raise ValueError(f"library_size must be 'all_genes' or 'selected_genes', got {library_size!r}.")
        unknown = sorted(set(model_kwargs) - set(MODULE_KEYWORDS))
        if unknown:
            raise TypeError(
                f"NH2ST got unknown keyword(s) {unknown}. Network settings are {list(MODULE_KEYWORDS)}; "
                f"training settings ({', '.join(TRAIN_KEYWORDS)}) go to model.train()."
            )
        the_recipe = get_recipe(recipe)
        # resolved once and saved as such: a loaded model rebuilds the same network even if the
        # recipe's defaults change in a later release
        model_kwargs = {**MODULE_DEFAULTS, **the_recipe.model, **model_kwargs}
        setup = self.registry_["setup_args"]
        if adata is not None:
            libraries = spot_libraries(adata, setup["library_key"])
            check_sections_have_counts(
                self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY), libraries,
                f"adata.layers[{setup['layer']!r}]" if setup.get("layer") else "adata.X",
            )
            genes = select_genes(
                self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY), adata.var_names, libraries,
                n_top=n_genes, genes=genes, is_count_data=setup["is_count_data"],
            )
        elif genes is None:
            raise ValueError("NH2ST without adata needs the gene list (genes=...).")
        genes = [str(g) for g in genes]
        from st_predict.train import RECIPES

        if RECIPES.get(the_recipe.name) == the_recipe:
            recipe = the_recipe.name  # saved by name; a custom Recipe is saved as it is
        tta = bool(the_recipe.train.get("tta", False)) if tta is None else bool(tta)
        self.genes_ = genes
        self.recipe_ = the_recipe
        self.tta_ = tta
        self.module = self._module_cls(n_genes=len(genes), **model_kwargs)
        if _LOADING.get():
            self.weights_source_ = "from saved model"
        else:
            self.weights_source_ = load_trunk_weights(self.module.trunk, weights)
        if isinstance(weights, Mapping):
            weights = "state dict"  # not saved twice: the trunk's weights are in the module
        self._data: _TrainingData | None = None
        self._predict_adata: AnnData | None = None
        self.validation_: dict | None = None
        self.train_sections_: list[str] | None = None
        self.best_epoch_: int | None = None
        self.train_settings_: dict | None = None
        self.init_params_ = self._get_init_params(locals())  # ``genes`` and ``model_kwargs`` resolved
        if adata is not None:
            self._training_data()  # check neighbours, patches and targets now, not at train()
            self.patch_size_um_, self.spot_pitch_um_ = self._physical_scale()
        else:
            self.patch_size_um_ = self.spot_pitch_um_ = None

    @property
    def module_kwargs(self) -> dict:
        """The network's settings, resolved (recipe + overrides)."""
        return dict(self.init_params_["kwargs"]["model_kwargs"])

    # -- summary ---------------------------------------------------------------------------------
    @property
    def summary_string(self) -> str:
        """One paragraph describing the model (shown by ``repr``)."""
        p = self.module_kwargs
        branch = (
            f"neighbour branch K={p['n_neighbors']}, {p['graph']} degree {p['hyperedge_degree']}, L={p['n_hgnn_layers']}"
            if p["use_neighbor_branch"]
            else "query branch only"
        )
        nce = (
            f"InfoNCE tau={p['temperature']}{' symmetric' if p['symmetric_nce'] else ''}"
            f"{' (residual form: solvable without the image)' if p['cross_residual'] else ''}, "
            f"lambda=({p['lambda_query']}, {p['lambda_neighbor']})"
            if p["contrastive"]
            else "no contrastive loss"
        )
        val = ""
        if self.validation_ is not None:
            v = self.validation_
            where = f"section(s) {', '.join(v['sections'])}" if v["kind"] == "section" else "random spots (leaky)"
            best = f", best epoch {self.best_epoch_}" if self.best_epoch_ else ""
            val = f"\nValidation: {where}{best}."
        return (
            f"NH2ST model (recipe {self.recipe_.name!r}): {len(self.genes_)} genes, latent {p['latent_dim']}, "
            f"ResNet18 trunk {p['trunk']} at {p['image_size']} px ({p['pooling']} pooling), weights: "
            f"{self.weights_source_}; {p['attention']}-attention ({p['attention_mode']}), {branch}; {nce}."
            f"{val}\nTraining status: {'Trained' if self.is_trained_ else 'Not Trained'}"
        )

    # -- setup -----------------------------------------------------------------------------------
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        library_key: str | None = None,
        image_key: str = "hires",
        spatial_key: str = "spatial",
        patch_size: float = 224,
        patch_size_um: float | None = None,
        is_count_data: bool = True,
        **kwargs,
    ):
        """%(summary)s.

        Checks everything training needs and says what is wrong by name: expression (finite; for
        counts also non-negative integers), ``adata.obsm[spatial_key]``, the image and scale factor
        of every section, and that every spot's patch lies inside its image. The only keys written
        are scvi-tools' ``adata.uns["_scvi_uuid"]`` and ``adata.uns["_scvi_manager_uuid"]``.

        Parameters
        ----------
        %(param_adata)s
        %(param_layer)s
        library_key
            Column of ``adata.obs`` naming each spot's section (library); its values are keys of
            ``adata.uns["spatial"]``. ``None``: a single section.
        image_key
            Image to crop: ``adata.uns["spatial"][library]["images"][image_key]``, with scale factor
            ``adata.uns["spatial"][library]["scalefactors"][f"tissue_{image_key}_scalef"]`` (1.0 for a
            full-resolution image). Images may be numpy or lazy (dask) arrays, ``(H, W, 3)``.
        spatial_key
            ``adata.obsm`` key of spot centres in full-resolution pixels (x = column, y = row).
        patch_size
            Patch side in full-resolution pixels, centred on each spot (224). Patches are resampled
            to the network's ``image_size``.
        patch_size_um
            Patch side in micrometres instead, converted with each section's pixel size
            (``adata.uns["spatial"][library]["metadata"]["pixel_size_um"]``, written by the readers),
            so sections scanned at different resolutions give the same physical patch.
        is_count_data
            ``True``: raw counts, normalised by the model to ``log1p(counts / library size * 1e4)``.
            ``False``: already normalised values, used as they are.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if adata.is_view:
            raise ValueError(
                "setup_anndata got a view of an AnnData (e.g. adata[mask]), which it cannot register: pass "
                "adata[mask].copy(), or st_predict.data.select_sections(adata, [...]) for whole sections "
                "(it keeps only their images)."
            )
        if adata.n_obs == 0:
            raise ValueError("The AnnData is empty (n_obs == 0): there are no spots to train on.")
        if adata.n_vars == 0:
            raise ValueError(
                "The AnnData has no genes (n_vars == 0). Training needs expression; to predict on an "
                "image-only AnnData, skip setup_anndata and call model.predict(adata)."
            )
        if layer is not None and layer not in adata.layers:
            raise KeyError(f"layer={layer!r} is not in adata.layers (layers: {list(adata.layers)}).")
        matrix = adata.layers[layer] if layer is not None else adata.X
        check_expression(matrix, f"adata.layers[{layer!r}]" if layer else "adata.X", is_count_data)
        spot_coordinates(adata, spatial_key)
        libraries = spot_libraries(adata, library_key)
        size = patch_size_pixels(adata, libraries, patch_size, patch_size_um)
        make_patch_reader(adata, spatial_key, image_key, library_key, size, out_size=32)  # validates
        anndata_fields = [
            # counts are checked by check_expression above (which accepts float counts with rounding
            # noise); scvi's own check would warn about those
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            ObsmField(REGISTRY_KEYS.SPATIAL_KEY, spatial_key),
        ]
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    # -- data ------------------------------------------------------------------------------------
    def _setup(self) -> dict:
        return self.registry_["setup_args"]

    def _patch_size(self, adata: AnnData, libraries: np.ndarray) -> float | dict[str, float]:
        setup = self._setup()
        return patch_size_pixels(adata, libraries, setup["patch_size"], setup.get("patch_size_um"))

    def _physical_scale(self) -> tuple[float | None, float | None]:
        """Micrometre size of the training patches and median spot pitch (when the pixel size is known)."""
        data = self._training_data()
        sizes = section_pixel_sizes(self.adata, data.libraries)
        if any(v is None for v in sizes.values()):
            return None, None
        setup = self._setup()
        if setup.get("patch_size_um") is not None:
            patch_um = float(setup["patch_size_um"])
        else:
            patch_um = float(np.median([setup["patch_size"] * v for v in sizes.values()]))
        coords = spot_coordinates(self.adata, setup["spatial_key"])
        dists = []
        for lib, mpp in sizes.items():
            xy = coords[data.libraries == lib]
            if len(xy) > 1:
                d, _ = cKDTree(xy).query(xy, k=2)
                dists.append(d[:, 1] * mpp)
        pitch = float(np.median(np.concatenate(dists))) if dists else None
        return patch_um, pitch

    def _training_data(self) -> _TrainingData:
        if self._data is not None:
            return self._data
        if self.adata is None:
            raise ValueError("This model has no training AnnData (it was loaded without one).")
        setup = self._setup()
        adata = self.adata
        counts = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        gene_idx = adata.var_names.get_indexer(self.genes_)
        if (gene_idx < 0).any():
            missing = [g for g, i in zip(self.genes_, gene_idx, strict=True) if i < 0]
            raise ValueError(f"{len(missing)} model genes are not in adata.var_names: {missing[:10]}")
        targets = normalize_expression(counts, gene_idx, setup["is_count_data"], self.init_params_["non_kwargs"]["library_size"])
        libraries = spot_libraries(adata, setup["library_key"])
        neighbors = None
        if self.module.use_neighbor_branch and self.module.contrastive:  # only the neighbour branch uses them
            coords = spot_coordinates(adata, setup["spatial_key"])
            neighbors = torch.from_numpy(spatial_knn(coords, libraries, self.module.n_neighbors))
        reader = make_patch_reader(
            adata, setup["spatial_key"], setup["image_key"], setup["library_key"],
            self._patch_size(adata, libraries), self.module.image_size,
        )
        self._data = _TrainingData(torch.from_numpy(targets), neighbors, reader, libraries)
        return self._data

    def _reader_for(self, adata: AnnData, keys: dict | None = None):
        setup = {**self._setup(), **{k: v for k, v in (keys or {}).items() if v is not None}}
        library_key = setup["library_key"]
        if library_key is not None and library_key not in adata.obs:
            if keys and keys.get("library_key"):
                raise KeyError(f"adata.obs has no column {library_key!r} (library_key).")
            library_key = None  # single-section data without the column: spot_libraries checks uns
        size = self._patch_size(adata, spot_libraries(adata, library_key))
        return make_patch_reader(adata, setup["spatial_key"], setup["image_key"], library_key, size, self.module.image_size)

    def training_patches(self, progress: bool = False) -> torch.Tensor:
        """uint8 patches ``(n_obs, 3, S, S)`` of every training spot at the network's resolution,
        cropped once (and kept) for end-to-end training."""
        data = self._training_data()
        if data.patches is None:
            n, chunk = len(data.targets), 256
            starts = range(0, n, chunk)
            if progress:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc="Cropping patches", unit="batch")
            data.patches = torch.cat([data.reader.read(np.arange(s, min(s + chunk, n))) for s in starts])
        return data.patches

    # -- training --------------------------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        validation: str | Sequence[str] | None = None,
        train_size: float = 1.0,
        optimizer: Literal["adamw", "adam"] | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        schedule: Literal["onecycle", "step", "constant"] | None = None,
        warmup: float | None = None,
        lr_step_size: int | None = None,
        lr_gamma: float | None = None,
        augment: str | bool | None = None,
        best_epoch: bool | None = None,
        precision: str | None = None,
        batches: Literal["section", "mixed"] | None = None,
        center_sections: bool | None = None,
        trunk_features: torch.Tensor | None = None,
        num_workers: int = 0,
        embed_batch_size: int = 16,
        progress: bool | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        plan_kwargs: dict | None = None,
        **trainer_kwargs,
    ):
        """Train NH2ST with PyTorch Lightning. Every setting left at ``None`` is the recipe's.

        End to end (``trunk="finetune"``), each spot's patch is cropped once at the network's
        resolution; with cached neighbours (``neighbor_trunk_grad=False``) the trunk maps of every
        spot are computed once before training and each spot refreshes its own when it is a target.
        With ``trunk="frozen"`` the trunk's maps (of the 8 flips/rotations when augmenting) are
        computed once per model (progress bar) and batches are read from that cache.

        Parameters
        ----------
        max_epochs
            Epochs.
        batch_size
            Target spots per batch; each brings its ``K`` neighbours. Must be >= 2 for the
            contrastive losses; the last incomplete training batch of an epoch is dropped.
        accelerator, devices
            Lightning's ``"cpu"``, ``"gpu"``, ``"auto"``...; several GPUs with ``strategy="ddp"``.
        validation
            ``None``: train on every spot. ``"section"``: hold out the last training section (an
            honest basis for choosing the epoch: its spots are not next to training spots); a section
            name or a list of them: hold those out. ``"random"``: random spots (one section only;
            leaky, and labelled so). The validation losses and ``validation_pcc`` are logged per epoch.
        train_size
            With ``validation="random"``: the fraction of spots to train on.
        optimizer
            ``"adamw"`` or ``"adam"``.
        lr, weight_decay
            Learning rate (peak of the one-cycle schedule) and weight decay.
        schedule
            ``"onecycle"`` (warm-up then cosine, per step), ``"step"`` (StepLR per epoch) or ``"constant"``.
        warmup
            Warm-up fraction of the one-cycle schedule.
        lr_step_size, lr_gamma
            The ``"step"`` schedule.
        augment
            ``"dihedral+stain"``, ``"dihedral"`` or ``"none"`` (``True``/``False``), see
            :class:`~st_predict.train.NH2STCollate`. A frozen trunk augments by caching the trunk
            maps of the 8 flips/rotations of each patch (stain jitter needs end-to-end training).
        best_epoch
            With a validation set: keep the weights of the epoch with the best ``validation_pcc``.
        precision
            Lightning's training precision, e.g. ``"32-true"`` or ``"bf16-mixed"``; ``"auto"``:
            ``"bf16-mixed"`` where the hardware computes in bfloat16 (CPUs with AVX512-BF16 or AMX,
            GPUs with bfloat16 support), else ``"32-true"``. Inference always runs in float32.
        batches
            ``"section"``: every training batch holds spots of one section
            (:class:`~st_predict.train.SectionBatchSampler`), so the contrastive negatives come from the
            same section and section-wide differences (stain, batch effects) cannot solve InfoNCE.
            ``"mixed"``: batches of random spots (the paper).
        center_sections
            Train on targets standardised within each section (each section's own mean and standard
            deviation per gene, mapped back onto the training spots' overall scale), so neither the
            MSE nor the contrastive terms spend capacity on between-section offsets that per-section
            correlation ignores and a new section does not share. Predictions stay on the data's scale.
        trunk_features
            ``trunk="frozen"`` only: precomputed trunk maps of every registered spot, made by this
            model's trunk (:func:`~st_predict.train.compute_fmaps`, ``(n_obs, 512, h, w)`` or with 8
            views ``(n_obs, 8, 512, h, w)``), e.g. shared between the folds of a benchmark.
        num_workers
            DataLoader workers.
        embed_batch_size
            Patches per trunk call when filling a cache.
        progress
            Progress bars for embedding and training (default: on a terminal or in a notebook, not when
            the output goes to a log file).
        checkpoint_dir
            Folder for Lightning checkpoints of the whole training state (weights, optimiser,
            schedule, epoch, random number generators): ``last.ckpt`` after every epoch and, with a
            validation set, ``best.ckpt`` at the best ``validation_pcc``
            (:class:`~st_predict.train.EpochCheckpoint`). Each is written beside its target and renamed
            into place, so a run killed while writing keeps the previous one.
        resume
            Continue from ``checkpoint_dir/last.ckpt`` (a run that was interrupted, e.g. pre-empted):
            call ``train`` with the same data, model and settings. On CPU with the same
            ``scvi.settings.seed`` the result equals an uninterrupted run's, bit for bit. Without a
            checkpoint yet, training starts from the first epoch (so one command serves both).
        plan_kwargs
            More keyword arguments for :class:`~st_predict.train.NH2STTrainingPlan`.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (a Lightning ``Trainer``), e.g. ``strategy="ddp"``.
        """
        given = {
            "max_epochs": max_epochs, "batch_size": batch_size, "optimizer": optimizer, "lr": lr,
            "weight_decay": weight_decay, "schedule": schedule, "warmup": warmup, "lr_step_size": lr_step_size,
            "lr_gamma": lr_gamma, "augment": augment, "validation": validation, "best_epoch": best_epoch,
            "precision": precision, "batches": batches, "center_sections": center_sections,
        }
        cfg = self.resolve_train_settings(**given)
        limit_threads()
        progress = interactive() if progress is None else bool(progress)
        if self.module.contrastive and cfg["batch_size"] < 2:
            raise ValueError(
                f"batch_size={cfg['batch_size']} is too small for a contrastive loss (needs >= 2 spots per batch: "
                "one positive and at least one negative)."
            )
        if self.module.trunk_mode == "finetune" and cfg["batch_size"] < 2:
            raise ValueError(
                f"batch_size={cfg['batch_size']} with trunk='finetune': the trunk's BatchNorm needs >= 2 patches "
                "per batch; raise batch_size or use trunk='frozen'."
            )
        data = self._training_data()
        train_idx, val_idx, self.validation_ = split_validation(data.libraries, cfg["validation"], train_size, settings.seed)
        self.train_sections_ = [str(s) for s in pd.unique(np.asarray(data.libraries)[train_idx])]
        if len(train_idx) < cfg["batch_size"]:
            if batch_size is not None or len(train_idx) < 2:
                raise ValueError(
                    f"Only {len(train_idx)} training spots for batch_size={cfg['batch_size']}: lower batch_size."
                )
            logger.info(
                "Only %d training spots: batch_size lowered from the recipe's %d to %d.",
                len(train_idx), cfg["batch_size"], len(train_idx),
            )
            cfg["batch_size"] = len(train_idx)
        device = _device_for(accelerator)
        self.module.to(device)
        source, plan_extra = self._training_source(cfg, train_idx, device, embed_batch_size, progress, trunk_features)
        self.fit_scales(train_idx)
        targets = self.training_targets(cfg["center_sections"], train_idx)
        collate = NH2STCollate(targets, data.neighbors, augment=cfg["augment"], **source)
        val_source = {**source, "neighbor_patches": True} if "patches" in source else source
        val_collate = NH2STCollate(targets, data.neighbors, augment="none", **val_source)
        groups = data.libraries[train_idx] if cfg["batches"] == "section" else None
        datamodule = NH2STDataModule(train_idx, val_idx, collate, val_collate, cfg["batch_size"], num_workers,
                                     train_groups=groups, seed=settings.seed or 0)
        if groups is not None:
            trainer_kwargs.setdefault("use_distributed_sampler", False)  # the section sampler shards itself
        plan = {k: cfg[k] for k in ("lr", "weight_decay", "optimizer", "schedule", "warmup", "lr_step_size", "lr_gamma")}
        plan.update(plan_extra)
        plan.update(plan_kwargs or {})
        callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
        keeper = None
        if len(val_idx):
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
            if cfg["best_epoch"]:
                keeper = BestEpoch("validation_pcc", "max")
                callbacks.append(keeper)
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir=, the folder of the interrupted run's checkpoints.")
        if checkpoint_dir is not None:
            if "ckpt_path" in trainer_kwargs:
                raise ValueError("Pass checkpoint_dir= and resume=True, or ckpt_path=, not both.")
            saver = EpochCheckpoint(checkpoint_dir, monitor="validation_pcc" if len(val_idx) else None)
            callbacks.append(saver)
            if resume:
                if saver.last_path.is_file():
                    trainer_kwargs["ckpt_path"] = str(saver.last_path)
                    logger.info("Resuming from %s.", saver.last_path)
                else:
                    logger.warning("No checkpoint at %s yet: training starts from the first epoch.", saver.last_path)
        trainer_kwargs.setdefault("enable_progress_bar", progress)
        trainer_kwargs.setdefault("log_every_n_steps", 1)  # the plan logs epoch means only
        trainer_kwargs.setdefault("precision", resolve_precision(cfg["precision"], device))
        self.train_settings_ = {**cfg, "train_size": train_size, "precision": trainer_kwargs["precision"]}
        with warnings.catch_warnings(), _without_lightning_tips():
            # a frozen trunk is in eval mode on purpose; Lightning's pytree deprecation is not ours
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            out = super().train(
                max_epochs=cfg["max_epochs"], accelerator=accelerator, devices=devices, datamodule=datamodule,
                plan_kwargs=plan, callbacks=callbacks, **trainer_kwargs,
            )
        self.best_epoch_ = keeper.best_epoch if keeper is not None else None
        return out

    def resolve_train_settings(self, **given) -> dict:
        """The training settings :meth:`train` would use: each ``None`` (or missing) keyword replaced
        by the model's recipe's value."""
        unknown = sorted(set(given) - set(TRAIN_KEYWORDS))
        if unknown:
            raise TypeError(f"Unknown training settings {unknown}; choose from {list(TRAIN_KEYWORDS)}.")
        defaults = {"warmup": 0.1, "lr_step_size": 50, "lr_gamma": 0.9, "validation": None, "best_epoch": False,
                    "precision": "32-true", "batches": "mixed", "center_sections": False}
        recipe = {**defaults, **{k: v for k, v in self.recipe_.train.items() if k in TRAIN_KEYWORDS}}
        cfg = {k: given[k] if given.get(k) is not None else recipe.get(k) for k in TRAIN_KEYWORDS}
        missing = [k for k, v in cfg.items() if v is None and k != "validation"]
        if missing:
            raise ValueError(f"Recipe {self.recipe_.name!r} sets no {missing}; pass them to train().")
        return cfg

    def fit_scales(self, train_idx: np.ndarray) -> None:
        """Fit, once per model, what training starts from: the target scale (per-gene mean and
        standard deviation of the training spots, translator started at the mean) and, for a frozen
        trunk, the standardisation of its pooled features. Both are saved with the model, so a
        retrained or a loaded model keeps them."""
        data = self._training_data()
        idx = torch.as_tensor(np.asarray(train_idx))
        if not bool(self.module.targets_fitted):
            self.module.fit_targets(data.targets[idx])
        head = self.module.path_head
        if head.needs_fit:
            if data.fmaps is None:
                raise RuntimeError("The frozen trunk's cache must exist before fitting its input scaling.")
            fmaps = data.fmaps[idx]
            head.fit_input_scaling(fmaps[:, 0] if fmaps.ndim == 5 else fmaps)

    def training_targets(self, center_sections: bool = False, train_idx: np.ndarray | None = None) -> torch.Tensor:
        """The expression the network trains on, ``(n_obs, n_genes)`` on the data's scale: the targets
        themselves, or (``center_sections``) each section standardised on its own spots and mapped
        back onto the overall mean and standard deviation of the training spots (``train_idx``,
        default all), so that every section has the same per-gene mean and spread."""
        data = self._training_data()
        if not center_sections:
            return data.targets
        ref = data.targets if train_idx is None else data.targets[torch.as_tensor(np.asarray(train_idx))]
        shift, scale = ref.mean(0), _safe_sd(ref)
        out = torch.empty_like(data.targets)
        for lib in np.unique(data.libraries):
            sel = torch.from_numpy(data.libraries == lib)
            y = data.targets[sel]
            out[sel] = (y - y.mean(0)) / _safe_sd(y) * scale + shift
        return out

    def _training_source(self, cfg, train_idx, device, embed_batch_size, progress, trunk_features):
        """What batches are made of: ``({"fmaps": ...} | {"patches": ..., "neighbor_patches": ...}, plan kwargs)``."""
        module = self.module
        if module.trunk_mode == "frozen":
            views = 8 if cfg["augment"] not in ("none", False) else 1
            return {"fmaps": self.trunk_cache(device, embed_batch_size, progress, views, trunk_features)}, {}
        if trunk_features is not None:
            raise ValueError("trunk_features is for trunk='frozen': an end-to-end trunk changes as it trains.")
        patches = self.training_patches(progress)
        if module.neighbor_trunk_grad or not module.use_neighbor_branch or not module.contrastive:
            return {"patches": patches, "neighbor_patches": True}, {}
        cache = compute_fmaps(module, patches, batch_size=embed_batch_size, device=device, progress=progress,
                              desc="Neighbour cache")
        return {"patches": patches, "neighbor_patches": False}, {"feature_cache": cache}

    def trunk_cache(
        self,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        progress: bool = True,
        views: int = 1,
        trunk_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Frozen trunk: its maps of every training spot, computed on first use (``views=8``: of the 8
        flips/rotations of each patch, for augmentation), or ``trunk_features`` when given."""
        if self.module.trunk_mode != "frozen":
            raise ValueError("trunk_cache is for trunk='frozen'.")
        data = self._training_data()
        have = data.fmaps
        if have is not None and (have.ndim == 5 or views == 1) and trunk_features is None:
            return have
        if trunk_features is not None:
            fmaps = trunk_features
            if fmaps.shape[0] != len(data.targets):
                raise ValueError(f"trunk_features has {fmaps.shape[0]} rows for {len(data.targets)} spots.")
            if fmaps.ndim not in (4, 5):
                raise ValueError(f"trunk_features must be (n, C, h, w) or (n, 8, C, h, w), got {tuple(fmaps.shape)}.")
        else:
            self.module.to(device)
            desc = "Embedding patches (frozen trunk" + (", 8 views)" if views == 8 else ")")
            fmaps = compute_fmaps(
                self.module, data.reader.read, len(data.targets), batch_size=batch_size, device=device,
                progress=progress, desc=desc, views=views,
            )
        head = self.module.path_head
        if head.pooling == "avg" and head.token_proj is None:
            fmaps = fmaps.mean((-2, -1), keepdim=True)  # all the avg head needs: 49x less memory at 224 px
        data.fmaps = fmaps
        return fmaps

    # -- inference -------------------------------------------------------------------------------
    def _inference(
        self, adata, indices, batch_size, what: str, progress: bool = False, keys: dict | None = None,
        tta: bool = False, trunk_features: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, pd.Index]:
        limit_threads()
        if adata is None:
            adata = self.adata if self.adata is not None else self._predict_adata
            if adata is None:
                raise ValueError("This model was loaded without AnnData: pass adata=.")
        cache = trunk_features
        if cache is None and adata is self.adata and self._data is not None and not any((keys or {}).values()):
            cache = self._data.fmaps
        if cache is not None and len(cache) != adata.n_obs:
            raise ValueError(f"trunk_features has {len(cache)} rows for {adata.n_obs} spots.")
        reader = None if cache is not None else self._reader_for(adata, keys)
        n_obs = adata.n_obs
        indices = np.arange(n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= n_obs):
            raise IndexError(f"indices must be in [0, {n_obs}).")
        module = self.module
        was_training = module.training
        module.eval()
        out = []
        starts = range(0, len(indices), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"Predicting {len(indices)} spots", unit="batch")
        try:
            with torch.inference_mode():
                for start in starts:
                    idx = indices[start : start + batch_size]
                    if cache is not None:
                        fm = cache[torch.as_tensor(idx)].to(module.device)
                        res = self._from_fmaps(fm, what, tta)
                    else:
                        batch = {"patches": reader.read(idx).to(module.device)}
                        if what == "expression":
                            res = module.predict_expression(batch, tta=tta)
                        else:
                            res = module.latent(batch)
                    out.append(res.float().cpu().numpy())
        finally:
            module.train(was_training)
        width = len(self.genes_) if what == "expression" else module.path_head.proj.out_features
        arr = np.concatenate(out) if out else np.zeros((0, width), dtype=np.float32)
        return arr, adata.obs_names[indices]

    def _from_fmaps(self, fm: torch.Tensor, what: str, tta: bool) -> torch.Tensor:
        module = self.module
        if fm.ndim == 5:  # (m, 8, C, h, w): the 8 views of a frozen trunk's cache
            if what == "expression" and tta:
                preds = [module.predict_expression({"fmaps": fm[:, v]}) for v in range(fm.shape[1])]
                return torch.stack(preds).mean(0)
            fm = fm[:, 0]
        if what == "expression":
            return module.predict_expression({"fmaps": fm})
        return module.latent({"fmaps": fm})

    def get_predicted_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int = 64,
        return_numpy: bool = False,
        progress: bool = False,
        library_key: str | None = None,
        image_key: str | None = None,
        spatial_key: str | None = None,
        tta: bool | None = None,
        trunk_features: torch.Tensor | None = None,
    ) -> pd.DataFrame | np.ndarray:
        """Predicted expression of the model's genes from each spot's H&E patch alone.

        Parameters
        ----------
        adata
            Any AnnData with the image and ``obsm`` spot positions under the keys given to
            :meth:`setup_anndata` (expression not needed: ``n_vars`` may be 0). ``None``: the
            training AnnData. Not modified.
        indices
            Spots (integer positions) to predict; default all.
        batch_size
            Patches per forward pass.
        return_numpy
            Return an array instead of a DataFrame.
        progress
            Show a progress bar.
        library_key, image_key, spatial_key
            Where ``adata`` keeps its sections, image and spot positions when it differs from the
            keys given to :meth:`setup_anndata` (e.g. train on ``"hires"`` images, predict from a
            Visium ``"fullres"`` one); ``None``: as at setup. The patch size is the setup's (in
            micrometres if it was given so, converted with ``adata``'s pixel sizes).
        tta
            Test-time augmentation (mean over the 8 flips/rotations of each patch); ``None``: the
            model's setting (:attr:`tta_`).
        trunk_features
            Frozen trunk only: precomputed trunk maps of ``adata``'s spots (see :meth:`train`).

        Returns
        -------
        ``(spots x genes)`` DataFrame (index ``obs_names``, columns :attr:`genes_`) on the target
        scale (``log1p`` counts per 10k for count data).
        """
        self._check_if_trained(warn=True)
        keys = {"library_key": library_key, "image_key": image_key, "spatial_key": spatial_key}
        tta = self.tta_ if tta is None else bool(tta)
        arr, names = self._inference(adata, indices, batch_size, "expression", progress, keys, tta, trunk_features)
        if return_numpy:
            return arr
        return pd.DataFrame(arr, index=names, columns=pd.Index(self.genes_))

    def get_latent_representation(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None, batch_size: int = 64
    ) -> np.ndarray:
        """The pathology latent ``h^p`` (input of the translator) of each spot, ``(n_spots, latent_dim)``."""
        self._check_if_trained(warn=True)
        return self._inference(adata, indices, batch_size, "latent")[0]

    def predict_slide(
        self,
        slide,
        mpp: float | None = None,
        pitch_um: float | None = None,
        patch_size_um: float | None = None,
        batch_size: int = 64,
        tta: bool | None = None,
        key_added: str = "nh2st",
        progress: bool | None = None,
        num_workers: int | None = None,
        image_key: str | None = None,
        library_id: str | None = None,
    ):
        """Predict expression over the tissue of a whole H&E slide that has no expression.

        Finds the tissue (lazyslide's ``find_tissues``), lays tiles on it every ``pitch_um``
        micrometres (default: the training data's spot pitch, :attr:`spot_pitch_um_`), each the
        physical size of the training patches (:attr:`patch_size_um_`), reads them lazily at the
        network's resolution through wsidata and runs trunk + translator on each batch. Needs
        ``pip install 'st-predict[wsi]'``.

        Parameters
        ----------
        slide
            A slide file (SVS, NDPI, pyramidal TIFF / OME-TIFF, anything OpenSlide or tiffslide
            reads), a :class:`wsidata.WSIData`, a :class:`spatialdata.SpatialData` (or the path of
            its ``.zarr`` store) with an RGB uint8 image element, or an AnnData with a Visium-style
            image in ``uns["spatial"][library_id]["images"]`` (its µm/px taken from
            ``metadata["pixel_size_um"]`` and the image's scale factor, as st_predict's readers
            write them). The input is not modified.
        mpp
            Micrometres per level-0 pixel, for a slide whose metadata has none (it overrides the
            metadata otherwise). SpatialData images carry no µm/px: pass it.
        pitch_um
            Distance between tile centres in micrometres; smaller than the spot pitch for denser maps.
        patch_size_um
            Tile side in micrometres, for a model trained without a known pixel size.
        batch_size
            Tiles per forward pass.
        tta
            Average over the 8 flips/rotations of each tile (default: the model's setting).
        key_added
            Name of the table (``sdata.tables[key_added]``); the tiles are the shapes
            ``f"{key_added}_tiles"`` and the tissue polygons ``f"{key_added}_tissues"``.
        progress
            Print the tile count and show a progress bar (default: on a terminal or in a notebook).
        num_workers
            DataLoader worker processes that read and resize tiles while the network runs
            (default: none on 4 cores or fewer, where they slow the network down; otherwise half
            the cores, at most 8; ``0`` reads in this process).
        image_key
            The image element of a SpatialData (needed when it has several), or the image of an
            AnnData (default ``"hires"``).
        library_id
            The library of an AnnData whose ``uns["spatial"]`` holds several.

        Returns
        -------
        The slide as a SpatialData object (:class:`wsidata.WSIData`) with a table of tiles x genes
        (``X``: predictions on the ``log1p`` scale of counts per 10k, ``obsm["spatial"]``: tile centres
        in level-0 pixels, ``uns["st_predict"]``: the slide and settings) annotating the tile shapes.
        The table alone is an AnnData: ``sdata.tables[key_added]``. For an AnnData input its
        ``obsm["spatial"]`` is in the AnnData's full-resolution pixels and its ``uns["spatial"]``
        holds the library's images, so ``sc.pl.spatial`` draws the tiles over the H&E.
        """
        from ._slide import predict_slide

        self._check_if_trained(warn=False)
        return predict_slide(self, slide, mpp=mpp, pitch_um=pitch_um, patch_size_um=patch_size_um,
                             batch_size=batch_size, tta=tta, key_added=key_added, progress=progress,
                             num_workers=num_workers, image_key=image_key, library_id=library_id)

    def predict(
        self,
        adata: AnnData | None = None,
        key_added: str = PREDICTED_KEY,
        batch_size: int = 64,
        progress: bool = False,
        library_key: str | None = None,
        image_key: str | None = None,
        spatial_key: str | None = None,
        tta: bool | None = None,
    ) -> pd.DataFrame:
        """Predict every spot of ``adata`` and write the DataFrame to ``adata.obsm[key_added]``.

        Also records, in ``adata.uns["st_predict"][key_added]``, the sections the model trained on
        (``training_sections``) and validated on (``validation_sections``), so that scoring can keep
        them apart from held-out sections (``st-predict evaluate`` does). These are the only changes
        made to ``adata``. Works on AnnData with an image and spot positions but no expression
        (``n_vars == 0``). ``library_key``, ``image_key``, ``spatial_key`` and ``tta`` may be given as
        in :meth:`get_predicted_expression`. Returns the DataFrame.
        """
        target = adata
        if target is None:
            target = self.adata if self.adata is not None else self._predict_adata
        if target is None:
            raise ValueError("This model was loaded without AnnData: pass adata=.")
        df = self.get_predicted_expression(
            target, batch_size=batch_size, progress=progress, library_key=library_key, image_key=image_key,
            spatial_key=spatial_key, tta=tta,
        )
        target.obsm[key_added] = df
        meta = dict(target.uns.get("st_predict", {})) if isinstance(target.uns.get("st_predict"), Mapping) else {}
        meta[key_added] = {
            "training_sections": list(self.train_sections_ or []),
            "validation_sections": [str(s) for s in ((self.validation_ or {}).get("sections") or [])],
        }
        target.uns["st_predict"] = meta
        logger.info("Added predicted expression of %d genes to adata.obsm[%r].", df.shape[1], key_added)
        return df

    # -- save / load -----------------------------------------------------------------------------
    def save(self, dir_path: str, prefix: str | None = None, overwrite: bool = False, save_anndata: bool = False, **kwargs):
        """Save the weights, genes, setup and hyperparameters to ``dir_path/model.pt`` (see
        :meth:`scvi.model.base.BaseModelClass.save`). ``save_anndata=True`` also writes the AnnData
        (only possible when its images are numpy arrays).

        The save is atomic: everything is written to a hidden folder next to ``dir_path`` and then
        renamed into place (over an existing model only with ``overwrite=True``, file by file with
        ``model.pt`` last), so a process killed during ``save`` leaves the previously saved model
        loadable. The file records the save format (:data:`SAVE_FORMAT`) and the st_predict version.
        """
        from st_predict import __version__

        target = os.path.abspath(os.fspath(dir_path))
        if os.path.exists(target) and not os.path.isdir(target):
            raise ValueError(f"{target} already exists and is not a folder.")
        if os.path.isdir(target) and os.listdir(target) and not overwrite:
            raise ValueError(f"{target} already exists and holds files; pass overwrite=True to replace the saved model.")
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        self.save_format_ = SAVE_FORMAT
        self.st_predict_version_ = __version__
        staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.saving-")
        try:
            super().save(staging, prefix=prefix, overwrite=True, save_anndata=save_anndata, **kwargs)
            names = sorted(os.listdir(staging), key=lambda n: n.endswith("model.pt"))  # model.pt last
            for name in names:
                with open(os.path.join(staging, name), "rb") as f:
                    os.fsync(f.fileno())
            if not os.path.isdir(target):
                os.rename(staging, target)
            else:
                for name in names:
                    os.replace(os.path.join(staging, name), os.path.join(target, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def load(
        cls,
        dir_path: str,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        **kwargs,
    ) -> NH2ST:
        """Load a model saved with :meth:`save`.

        Parameters
        ----------
        dir_path
            Folder given to :meth:`save`.
        adata
            ``None``: the AnnData saved with the model if any, else none (call
            ``predict(adata)`` later). An AnnData with expression: registered with the saved setup;
            its ``var_names`` must equal the training genes (else a ``ValueError`` lists the
            difference). An AnnData with no expression (``n_vars == 0``): kept as the default target
            of :meth:`predict`.
        accelerator, device
            Where to put the model.
        prefix
            File-name prefix given to :meth:`save`.
        """
        path = os.path.join(dir_path, f"{prefix or ''}model.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No saved NH2ST model at {path}.")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # a truncated or corrupted file: torch's message names zip internals
            raise ValueError(
                f"{path} is not a readable saved model (truncated or corrupted?): {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}"
            ) from err
        _check_save_format(saved, path)
        train_vars = pd.Index(np.asarray(saved["var_names"]).astype(str))
        model_genes = saved["attr_dict"]["genes_"]
        if "model_kwargs" not in saved["attr_dict"].get("init_params_", {}).get("kwargs", {}):
            raise ValueError(
                f"{path} was saved by an older st_predict whose NH2ST had no recipes; this release cannot "
                "rebuild its network. Retrain it with this release."
            )
        predict_only = None
        if adata is not None and adata.n_vars == 0:
            predict_only, load_arg = adata, False
        elif adata is not None:
            have = pd.Index(adata.var_names.astype(str))
            if not have.equals(train_vars):
                missing = [g for g in model_genes if g not in have]
                raise ValueError(
                    f"adata's genes differ from the {len(train_vars)} genes the model was trained with "
                    f"(adata has {len(have)}; {len(missing)} of the model's {len(model_genes)} predicted genes "
                    f"are absent{', e.g. ' + ', '.join(missing[:5]) if missing else ''}). Subset/reorder adata to "
                    "the training var_names, or load with adata=None and call model.predict(adata): "
                    "prediction needs only the image."
                )
            load_arg = adata
        else:
            has_adata = os.path.isfile(os.path.join(dir_path, f"{prefix or ''}adata.h5ad"))
            load_arg = None if has_adata else False
        del saved
        token = _LOADING.set(True)
        scvi_log = logging.getLogger("scvi")
        level = scvi_log.level
        scvi_log.setLevel(max(level, logging.WARNING))  # scvi-tools logs "File ... already downloaded" on every load
        try:
            model = super().load(dir_path, adata=load_arg, accelerator=accelerator, device=device, prefix=prefix, **kwargs)
        finally:
            _LOADING.reset(token)
            scvi_log.setLevel(level)
        model._predict_adata = predict_only
        return model


class _DropLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


@contextlib.contextmanager
def _without_lightning_tips():
    """Lightning advertises a logging service ("Tip: ... litlogger") at every fit: not news to a user."""
    target, drop = logging.getLogger("lightning.pytorch.utilities.rank_zero"), _DropLightningTips()
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


def _check_save_format(saved: Mapping, path: str) -> None:
    """Refuse a ``model.pt`` whose save format this release cannot read, naming both versions."""
    from st_predict import __version__

    attrs = saved.get("attr_dict", {}) if isinstance(saved, Mapping) else {}
    if not isinstance(saved, Mapping) or "model_state_dict" not in saved or not isinstance(attrs, Mapping):
        raise ValueError(f"{path} is not an st_predict saved model (no model_state_dict / attr_dict).")
    fmt = attrs.get("save_format_", 1)
    by = attrs.get("st_predict_version_", "an st_predict release that did not record its version")
    if not isinstance(fmt, int) or fmt > SAVE_FORMAT:
        raise ValueError(
            f"{path} has save format {fmt!r}, written by st_predict {by}; this release (st_predict "
            f"{__version__}) reads formats up to {SAVE_FORMAT}. Upgrade st_predict to load it."
        )


def _safe_sd(y: torch.Tensor) -> torch.Tensor:
    """Per-column standard deviation, 1 where it is (nearly) 0 or undefined (one row)."""
    sd = y.std(0) if len(y) > 1 else torch.ones(y.shape[1], dtype=y.dtype)
    return torch.where(sd > 1e-6, sd, torch.ones_like(sd))


def _cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX; Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """Lightning precision for ``precision="auto"`` on ``device`` (see :meth:`NH2ST.train`)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if device.type == "cpu" and _cpu_has_bf16() else "32-true"


def _device_for(accelerator: str) -> torch.device:
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
