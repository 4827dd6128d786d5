"""Training NH2ST: what training needs from the registered AnnData (targets, neighbours, patches,
trunk caches), and ``train`` itself."""

from __future__ import annotations

import inspect
import logging
import numbers
import os
import warnings
from collections.abc import Sequence

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from scvi import settings
from scvi.train import Trainer

from st_predict._utils import REGISTRY_KEYS, InputError, interactive, thread_limits
from st_predict.dataloaders import (
    FeatureCache,
    NH2STCollate,
    NH2STDataModule,
    image_digest,
    maps_key,
    split_validation,
    state_digest,
)
from st_predict.pp import (
    absent_genes_hint,
    make_patch_reader,
    normalize_expression,
)
from st_predict.train import (
    RECIPE,
    BestEpoch,
    EpochCheckpoint,
    EpochLog,
    RNGStates,
    TrainingSettings,
    compute_fmaps,
)

from ._docstrings import nh2st_dsp
from ._runtime import device_for, quiet_lightning, resolve_precision

logger = logging.getLogger(__name__)

#: End-to-end training keeps its patches in memory up to this many bytes (7,100 spots at 224 px, 87,000 at
#: 64 px); above, they go to the on-disk patch store (``train(feature_cache=...)`` chooses it always).
PATCHES_IN_MEMORY_MAX = 1 << 30

#: keywords of Lightning's ``Trainer`` (through scvi-tools' ``Trainer``) that ``train`` passes on
_TRAINER_KEYWORDS = (
    frozenset(inspect.signature(Trainer).parameters) | frozenset(inspect.signature(pl.Trainer).parameters)
) - {"kwargs"} | {"ckpt_path"}


class TrainingData:
    """What training needs from the registered AnnData, computed once per model."""

    def __init__(self, targets: torch.Tensor, neighbors: torch.Tensor | None, reader, libraries: np.ndarray):
        self.targets = targets
        self.neighbors = neighbors
        self.reader = reader
        self.libraries = libraries
        self.fmaps: torch.Tensor | None = None  # frozen trunk: cached maps (n, C, h, w) or (n, 8, C, h, w)
        self.patches = None  # end to end: uint8 patches at the trunk's resolution (a tensor or a PatchStore)


def _safe_sd(y: torch.Tensor) -> torch.Tensor:
    """Per-column standard deviation, 1 where it is (nearly) 0 or undefined (one row)."""
    sd = y.std(0) if len(y) > 1 else torch.ones(y.shape[1], dtype=y.dtype)
    return torch.where(sd > 1e-6, sd, torch.ones_like(sd))


class TrainingMixin:
    """The training data of the registered AnnData and :meth:`train`."""

    # -- data ------------------------------------------------------------------------------------
    def _training_data(self) -> TrainingData:
        if self._data is not None:
            return self._data
        if self.adata is None:
            raise InputError("This model has no training AnnData (it was loaded without one).")
        setup = self.registry_["setup_args"]
        adata = self.adata
        counts = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        gene_idx = adata.var_names.get_indexer(self.genes_)
        if (gene_idx < 0).any():
            missing = [g for g, i in zip(self.genes_, gene_idx, strict=True) if i < 0]
            raise InputError(f"{len(missing)} model genes are not in adata.var_names: {missing[:10]}."
                             + absent_genes_hint(missing, adata.var_names, adata.var))
        targets = normalize_expression(counts, gene_idx, setup["is_count_data"], self._library_size)
        facts = self._facts  # the registry's: sections, neighbours, the patch's pixels on each section
        libraries = facts.libraries
        neighbors = None
        if self.module.settings.uses_neighbors:  # the neighbour branch and the translator's context use them
            neighbors = torch.from_numpy(facts.neighbors_for(self.module.n_neighbors))
        reader = make_patch_reader(adata, setup["spatial_key"], setup["image_key"], setup["library_key"],
                                   facts.patch_px, self.module.image_size)
        self._data = TrainingData(torch.from_numpy(targets), neighbors, reader, libraries)
        return self._data

    def training_patches(self, progress: bool = False, feature_cache=None):
        """uint8 patches ``(n_obs, 3, S, S)`` of every training spot at the network's resolution, cropped
        once for end-to-end training: kept in memory (a tensor; always with ``feature_cache=False``), or with
        ``feature_cache`` (a folder, or ``True`` for the default one), and with ``None`` when they would take
        more than :data:`PATCHES_IN_MEMORY_MAX` bytes, in the on-disk patch store (a
        :class:`~st_predict.dataloaders._patch_store.PatchStore` that batches index like the tensor)."""
        data = self._training_data()
        if data.patches is None:
            n, size = len(data.targets), self.module.image_size
            if feature_cache is None and n * 3 * size * size > PATCHES_IN_MEMORY_MAX:
                logger.info("The %d training patches take %.1f GiB: they go to the on-disk patch store of the "
                            "default cache folder (pass feature_cache= to choose it).", n, n * 3 * size**2 / 2**30)
                feature_cache = True
            if feature_cache not in (None, False):
                from st_predict.dataloaders import patch_store

                cache = feature_cache if isinstance(feature_cache, FeatureCache) else FeatureCache(
                    None if feature_cache is True else feature_cache)
                data.patches = patch_store(data.reader, cache, progress)
                return data.patches
            chunk = 256
            starts = range(0, n, chunk)
            if progress:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc="Cropping patches", unit="batch")
            data.patches = torch.cat([data.reader.read(np.arange(s, min(s + chunk, n))) for s in starts])
            data.reader.release()
        return data.patches

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

    def trunk_cache(
        self,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        progress: bool = True,
        views: int = 1,
        trunk_features: torch.Tensor | None = None,
        feature_cache: FeatureCache | str | os.PathLike | bool | None = None,
    ) -> torch.Tensor:
        """Frozen trunk: its maps of every training spot, computed on first use (``views=8``: of the 8
        flips/rotations of each patch, for augmentation), or ``trunk_features`` when given.

        ``feature_cache``: also keep them on disk, one entry per section
        (``True``: its default folder), keyed by the
        trunk's weights, the network's input size and normalisation, the views, the section, its
        image and the spots' crop boxes; another model or run on the same sections reads them back."""
        if self.module.trunk_mode != "frozen":
            raise InputError("trunk_cache is for trunk='frozen'.")
        data = self._training_data()
        have = data.fmaps
        if have is not None and (have.ndim == 5 or views == 1) and trunk_features is None:
            return have
        if trunk_features is not None:
            fmaps = trunk_features
            if fmaps.shape[0] != len(data.targets):
                raise InputError(f"trunk_features has {fmaps.shape[0]} rows for {len(data.targets)} spots.")
            if fmaps.ndim not in (4, 5):
                raise InputError(f"trunk_features must be (n, C, h, w) or (n, 8, C, h, w), got {tuple(fmaps.shape)}.")
            fmaps = self._reduce_maps(fmaps)
        else:
            fmaps = self.encoder_maps(data.reader, views, feature_cache, device, batch_size, progress)
        data.fmaps = fmaps
        return fmaps

    def _reduce_maps(self, fm: torch.Tensor) -> torch.Tensor:
        """What the head reads of the maps: their spatial mean for an avg head without tokens (49x less
        memory at 224 px with the ResNet18), else the maps."""
        return fm.mean((-2, -1), keepdim=True) if self._pooled_maps() else fm

    def _pooled_maps(self) -> bool:
        head = self.module.path_head
        return head.pooling == "avg" and head.token_proj is None

    def encoder_maps(
        self,
        reader,
        views: int = 1,
        feature_cache: FeatureCache | str | os.PathLike | bool | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        progress: bool = False,
        desc: str | None = None,
    ) -> torch.Tensor:
        """The frozen encoder's maps (reduced as the head reads them) of every spot of a patch reader,
        ``(n, C, h, w)`` or with ``views=8`` ``(n, 8, C, h, w)``; with ``feature_cache``, section by
        section from the on-disk cache (computed and stored when missing)."""
        self.module.to(device)
        desc = desc or "Embedding patches (frozen trunk" + (", 8 views)" if views == 8 else ")")

        def compute(rows: np.ndarray) -> torch.Tensor:
            return compute_fmaps(
                self.module, lambda i: reader.read(rows[i]), len(rows), batch_size=batch_size,
                device=device, progress=progress, desc=desc, views=views, reduce=self._reduce_maps,
            )

        if feature_cache is None or feature_cache is False:
            return compute(np.arange(len(reader.libraries)))
        return self._cached_maps(feature_cache, reader, compute, views)

    def _cached_maps(self, feature_cache, reader, compute, views: int) -> torch.Tensor:
        """The frozen encoder's maps of every spot of ``reader``, one cache entry per section. A
        one-view request is served from an 8-view entry (its first view) when there is one."""
        if not isinstance(feature_cache, FeatureCache):
            feature_cache = FeatureCache(None if feature_cache is True else feature_cache)
        info = self.module.encoder_info
        weights = state_digest(self.module.trunk)
        out = None
        for lib in pd.unique(reader.libraries):
            rows = np.flatnonzero(reader.libraries == lib)
            key = maps_key(info, weights, self.module.image_size, views, self._pooled_maps(), str(lib),
                           image_digest(reader.images[lib]), reader.boxes[rows])
            fm = feature_cache.get({**key, "views": 8}) if views == 1 else None
            if fm is not None:
                fm = fm[:, 0]
            else:
                fm = feature_cache.get_or_compute(key, lambda rows=rows: compute(rows))
            if out is None:
                out = torch.empty((len(reader.libraries), *fm.shape[1:]), dtype=fm.dtype)
            out[rows] = fm
        return out

    def _training_source(self, cfg: TrainingSettings, device, embed_batch_size, progress, trunk_features,
                         feature_cache=None):
        """What batches are made of: ``({"fmaps": ...} | {"patches": ..., "neighbor_patches": ...}, plan kwargs)``."""
        module = self.module
        if module.trunk_mode == "frozen":
            views = 8 if cfg.augment != "none" else 1
            maps = self.trunk_cache(device, embed_batch_size, progress, views, trunk_features, feature_cache)
            return {"fmaps": maps}, {}
        if trunk_features is not None:
            raise InputError("trunk_features is for trunk='frozen': an end-to-end trunk changes as it trains.")
        patches = self.training_patches(progress, feature_cache)
        if module.neighbor_trunk_grad or not module.settings.uses_neighbors:
            return {"patches": patches, "neighbor_patches": True}, {}
        read = patches if isinstance(patches, torch.Tensor) else patches.__getitem__
        # pooled when the head reads only the maps' mean: 2 KB a spot instead of 100 KB at 224 px
        cache = compute_fmaps(module, read, len(patches), batch_size=embed_batch_size, device=device,
                              progress=progress, desc="Neighbour cache", reduce=self._reduce_maps)
        return {"patches": patches, "neighbor_patches": False}, {"neighbor_cache": cache}

    # -- training --------------------------------------------------------------------------------
    def resolve_train_settings(self, settings: TrainingSettings | None = None, **overrides) -> TrainingSettings:
        """The training settings :meth:`train` would use: ``settings`` (default: the model's recipe's) with
        ``overrides`` replaced, each as it is (:data:`~st_predict.train.RECIPE` leaves a setting as it is)."""
        return (settings or self.recipe_.training).replace(**overrides)

    @nh2st_dsp.dedent
    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int = RECIPE,
        optimizer: str = RECIPE,
        lr: float = RECIPE,
        weight_decay: float = RECIPE,
        schedule: str = RECIPE,
        warmup: float = RECIPE,
        lr_step_size: int = RECIPE,
        lr_gamma: float = RECIPE,
        augment: str | bool = RECIPE,
        validation: str | Sequence[str] | None = RECIPE,
        best_epoch: bool = RECIPE,
        precision: str = RECIPE,
        batches: str = RECIPE,
        center_sections: bool = RECIPE,
        settings: TrainingSettings | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float = 1.0,
        trunk_features: torch.Tensor | None = None,
        feature_cache: str | os.PathLike | bool | None = None,
        num_workers: int = 0,
        embed_batch_size: int = 16,
        progress: bool | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        plan_kwargs: dict | None = None,
        reliability: bool = False,
        group_key: str | None = None,
        **trainer_kwargs,
    ):
        """Train NH2ST with PyTorch Lightning, with the recipe's training settings and those given here.

        As in scvi-tools, ``model.train(20)`` trains 20 epochs. ``model.train(lr=3e-4)`` trains with
        ``model.recipe_.training.replace(lr=3e-4)`` (:class:`~st_predict.train.TrainingSettings`): every
        training setting left out keeps the recipe's value, and one given is used as it is, so
        ``validation=None`` trains without the recipe's validation section. Other keywords go to Lightning's
        ``Trainer`` (e.g. ``strategy="ddp"``, ``callbacks=[...]``, ``limit_train_batches=``).

        End to end (``trunk="finetune"``), each spot's patch is cropped once at the network's
        resolution; with cached neighbours (``neighbor_trunk_grad=False``) the trunk maps of every
        spot are computed once before training and each spot refreshes its own when it is a target.
        With ``trunk="frozen"`` the trunk's maps (of the 8 flips/rotations when augmenting) are
        computed once per model (progress bar) and batches are read from that cache.

        Parameters
        ----------
        max_epochs
            Epochs; ``None``: the recipe's (20 in the default recipe).
        batch_size, optimizer, lr, weight_decay, schedule, warmup, lr_step_size, lr_gamma, augment, validation, best_epoch, precision, batches, center_sections
            Training settings, each the recipe's when left out (:class:`~st_predict.train.TrainingSettings`):

            %(training_settings)s
        settings
            All training settings at once (default: the recipe's, :attr:`recipe_`'s ``training``); the
            settings given above replace its values.
        accelerator, devices
            Lightning's ``"cpu"``, ``"gpu"``, ``"auto"``...; several GPUs with ``strategy="ddp"``, several
            machines with ``num_nodes=`` as well (started by ``torchrun`` or Slurm; see the user guide).
        train_size
            With ``validation="random"``: the fraction of spots to train on.
        trunk_features
            ``trunk="frozen"`` only: precomputed trunk maps of every registered spot, made by this
            model's trunk (:func:`~st_predict.train.compute_fmaps`, ``(n_obs, 512, h, w)`` or with 8
            views ``(n_obs, 8, 512, h, w)``), e.g. shared between the folds of a benchmark.
        feature_cache
            A folder (``True``: ``$ST_PREDICT_CACHE_DIR``, else ``~/.cache/st_predict/features``) of
            what training computes from the images, one entry per section, keyed by everything it depends
            on. ``trunk="frozen"``: the trunk's maps, keyed by the trunk's weights, input size, views, the
            section's image and its spots' crop boxes. End to end: the patch store, each section's patches
            cropped once (the section's image decoded only then) into a zarr array keyed by the section's
            image, crop boxes and patch size, from which each batch reads its own rows, so memory is bounded
            by the batch, not by the data. A later ``train`` on the same sections (another model, fold or
            run) reads them instead of computing them; a change to any part of the key computes them
            afresh. ``None``: kept in memory for this model only, except end-to-end patches of more than
            1 GiB (:data:`PATCHES_IN_MEMORY_MAX`), which go to the store in the default folder; ``False``:
            in memory whatever their size.
        num_workers
            DataLoader workers (each draws its own augmentations; see
            :class:`~st_predict.dataloaders.NH2STCollate`).
        embed_batch_size
            Patches per trunk call when filling a cache.
        progress
            Progress bars for embedding and training. Default: bars on a terminal or in a notebook; when the
            output goes to a log file, one line per epoch instead (:class:`~st_predict.train.EpochLog`).
            ``False``: nothing.
        checkpoint_dir
            Folder for Lightning checkpoints of the whole training state (weights, optimiser,
            schedule, epoch, random number generators): ``last.ckpt`` after every epoch and, with a
            validation set, ``best.ckpt`` at the best ``validation_pcc``
            (:class:`~st_predict.train.EpochCheckpoint`). Each is written beside its target and renamed
            into place, so a run killed while writing keeps the previous one.
        resume
            Continue from ``checkpoint_dir/last.ckpt`` (a run that was interrupted, e.g. pre-empted):
            call ``train`` with the same data, model and settings. Only the remaining epochs run; on
            CPU with the same ``scvi.settings.seed`` the result equals an uninterrupted run's, bit for
            bit. Without a checkpoint yet, training starts from the first epoch (so one command serves
            both).
        plan_kwargs
            More keyword arguments for :class:`~st_predict.train.NH2STTrainingPlan`.
        reliability
            Also estimate how far each gene's predictions can be trusted on a new section, and calibrate
            per-spot intervals. One more model is trained per training section, with that section held
            out (same genes, network, starting weights and settings): **K more trainings** for K sections,
            so it costs about K + 1 times a plain ``train``. Each fold model predicts every training
            spot; the spots of its held-out section are out of fold. Kept with the model:

            - :attr:`gene_reliability_`: each gene's out-of-fold PCC within each section, averaged over
              sections (``reliability``), with a 95 % interval over sections (``ci_low``, ``ci_high``) and
              ``reliable`` when ``ci_low > 0``;
            - the fold models, which predict with the model: their spread makes the intervals adaptive and
              their mean with the model is the ensemble prediction (``predict(ensemble=True)``);
            - split-conformal calibration: the out-of-fold residuals, less the counts noise of the spot's depth
              (Poisson sampling of its UMIs), scaled by the fold models' spread, each section weighted equally;
              at the training depth and with the training counts thinned binomially to 1/2 ... 1/64 of it, so
              that intervals and reliability can be asked for at a lower depth (``predict(interval_depth=)``,
              :meth:`gene_reliability`);
            - a shift detector: an image-feature distance of each section to the others, whose threshold
              (1.5x the largest leave-one-section-out distance) ``predict`` compares new sections with.

            ``predict`` then writes 90 % bounds by default, for a measurement at the training depth and for
            the expected expression (see :meth:`predict`). They cover spots of sections exchangeable with the
            training sections; a section past the shift threshold is flagged and its intervals marked untrusted.
            Needs at least two training sections (or groups) and no ``validation``.
        group_key
            With ``reliability=True``: an ``obs`` column of patients (or any group of sections). Each fold
            model then holds out one group, never part of one, and each group weighs the same in the
            calibration. ``None`` or a single group: folds by section, and the estimates are within-patient
            (said in :attr:`gene_reliability_`'s ``attrs`` and the model summary).
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (a Lightning ``Trainer``); a keyword that is neither a
            training setting nor a ``Trainer`` argument is a ``TypeError``.
        """
        given = {"max_epochs": RECIPE if max_epochs is None else int(max_epochs), "batch_size": batch_size,
                 "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, "schedule": schedule,
                 "warmup": warmup, "lr_step_size": lr_step_size, "lr_gamma": lr_gamma, "augment": augment,
                 "validation": validation, "best_epoch": best_epoch, "precision": precision, "batches": batches,
                 "center_sections": center_sections}
        names = set(TrainingSettings.names())
        unknown = sorted(set(trainer_kwargs) - _TRAINER_KEYWORDS)
        if unknown:
            raise TypeError(
                f"train() got unknown keyword(s) {unknown}: training settings are {sorted(names)}, and other "
                "keywords must be Lightning Trainer arguments."
            )
        if isinstance(max_epochs, bool) or (max_epochs is not None and not isinstance(max_epochs, numbers.Integral)):
            raise InputError(f"max_epochs must be a number of epochs, got {max_epochs!r} (training settings are "
                             "keywords: model.train(max_epochs, lr=..., ...)).")
        cfg = self.resolve_train_settings(settings, **given)
        if reliability and cfg.validation is not None:
            raise InputError("reliability=True holds out every training section in turn; train without validation= "
                             f"(got validation={cfg.validation!r}).")
        batch_given = settings is not None or batch_size is not RECIPE
        self.fold_states_ = self.gene_reliability_ = self.conformal_ = self.reliability_sections_ = None
        self.shift_reference_ = self.reliability_scope_ = None
        with thread_limits():
            out = self._fit(cfg, batch_given, accelerator, devices, train_size, trunk_features, num_workers,
                            embed_batch_size, progress, checkpoint_dir, resume, plan_kwargs, trainer_kwargs,
                            feature_cache)
        if group_key is not None and not reliability:
            raise InputError("group_key= sets the folds of reliability=True; pass reliability=True too.")
        if reliability:  # a bad group_key is refused before training, not after
            self.reliability_folds(group_key)
        if reliability:
            self._fit_reliability(cfg, accelerator, devices, progress, feature_cache, group_key)
        return out

    def _fit(self, cfg, batch_given, accelerator, devices, train_size, trunk_features, num_workers, embed_batch_size,
             progress, checkpoint_dir, resume, plan_kwargs, trainer_kwargs, feature_cache=None):
        epoch_lines = progress is None and not interactive()  # a log file: a line per epoch, no bar redraws
        progress = interactive() if progress is None else bool(progress)
        if self.module.contrastive and cfg.batch_size < 2:
            raise InputError(
                f"batch_size={cfg.batch_size} is too small for a contrastive loss (needs >= 2 spots per batch: "
                "one positive and at least one negative)."
            )
        if self.module.trunk_mode == "finetune" and cfg.batch_size < 2:
            raise InputError(
                f"batch_size={cfg.batch_size} with trunk='finetune': the trunk's BatchNorm needs >= 2 patches "
                "per batch; raise batch_size or use trunk='frozen'."
            )
        if resume and checkpoint_dir is None:
            raise InputError("resume=True needs checkpoint_dir=, the folder of the interrupted run's checkpoints.")
        if checkpoint_dir is not None and "ckpt_path" in trainer_kwargs:
            raise InputError("Pass checkpoint_dir= and resume=True, or ckpt_path=, not both.")
        data = self._training_data()
        train_idx, val_idx, self.validation_ = split_validation(data.libraries, cfg.validation, train_size, settings.seed)
        self.train_sections_ = [str(s) for s in pd.unique(np.asarray(data.libraries)[train_idx])]
        if len(train_idx) < cfg.batch_size:
            if batch_given or len(train_idx) < 2:
                raise InputError(
                    f"Only {len(train_idx)} training spots for batch_size={cfg.batch_size}: lower batch_size."
                )
            logger.info(
                "Only %d training spots: batch_size lowered from the recipe's %d to %d.",
                len(train_idx), cfg.batch_size, len(train_idx),
            )
            cfg = cfg.replace(batch_size=len(train_idx))
        device = device_for(accelerator)
        self.module.to(device)
        source, plan_extra = self._training_source(cfg, device, embed_batch_size, progress, trunk_features,
                                                   feature_cache)
        self.fit_scales(train_idx)
        targets = self.training_targets(cfg.center_sections, train_idx)
        seed = settings.seed or 0
        # augmentations from torch's global generator: checkpointed with the training state (a resumed run
        # draws what the interrupted one would have), and seeded by torch in each DataLoader worker
        collate = NH2STCollate(targets, data.neighbors, augment=cfg.augment, **source)
        val_source = {**source, "neighbor_patches": True} if "patches" in source else source
        val_collate = NH2STCollate(targets, data.neighbors, augment="none", **val_source)
        groups = data.libraries[train_idx] if cfg.batches == "section" else None
        datamodule = NH2STDataModule(train_idx, val_idx, collate, val_collate, cfg.batch_size, num_workers,
                                     train_groups=groups, seed=seed)
        if groups is not None:
            trainer_kwargs.setdefault("use_distributed_sampler", False)  # the section sampler shards itself
        plan = {"settings": cfg, **plan_extra, **(plan_kwargs or {})}
        callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
        keeper = None
        if len(val_idx):
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
            if cfg.best_epoch:
                keeper = BestEpoch("validation_pcc", "max")
                callbacks.append(keeper)
        if checkpoint_dir is not None:
            saver = EpochCheckpoint(checkpoint_dir, monitor="validation_pcc" if len(val_idx) else None)
            callbacks += [saver, RNGStates()]
            if resume:
                if saver.last_path.is_file():
                    trainer_kwargs["ckpt_path"] = str(saver.last_path)
                    logger.info("Resuming from %s.", saver.last_path)
                else:
                    logger.warning("No checkpoint at %s yet: training starts from the first epoch.", saver.last_path)
        trainer_kwargs.setdefault("enable_progress_bar", progress)
        trainer_kwargs.setdefault("log_every_n_steps", 1)  # the plan logs epoch means only
        trainer_kwargs.setdefault("precision", resolve_precision(cfg.precision, device))
        self.train_settings_ = {**cfg.to_dict(), "train_size": train_size, "precision": trainer_kwargs["precision"]}
        if epoch_lines:
            callbacks.append(EpochLog())
        with warnings.catch_warnings(), quiet_lightning():
            # a frozen trunk is in eval mode on purpose; Lightning's pytree deprecation is not ours
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            out = super().train(
                max_epochs=cfg.max_epochs, accelerator=accelerator, devices=devices, datamodule=datamodule,
                plan_kwargs=plan, callbacks=callbacks, **trainer_kwargs,
            )
        self.best_epoch_ = keeper.best_epoch if keeper is not None else None
        return out
