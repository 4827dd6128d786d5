"""NH2ST as an scvi-tools model: ``NH2ST.setup_anndata(adata); model = NH2ST(adata); model.train()``."""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import settings
from scvi.data import AnnDataManager
from scvi.data.fields import LayerField, ObsmField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin
from scvi.utils import setup_anndata_dsp

from st_predict._constants import PREDICTED_KEY, REGISTRY_KEYS
from st_predict.module import NH2STModule
from st_predict.nn import load_trunk_weights
from st_predict.pp import (
    check_expression,
    make_patch_reader,
    normalize_expression,
    select_genes,
    spatial_knn,
    spot_coordinates,
    spot_libraries,
)
from st_predict.train import NH2STCollate, NH2STDataModule, NH2STTrainingPlan, compute_fmaps

logger = logging.getLogger(__name__)

# Set while ``NH2ST.load`` rebuilds a model: the trunk weights then come from the saved state dict,
# so ``__init__`` must not fetch pretrained weights.
_LOADING = contextvars.ContextVar("st_predict_loading", default=False)


class _TrainingData:
    """What training needs from the registered AnnData, computed once per model."""

    def __init__(self, targets: torch.Tensor, neighbors: torch.Tensor | None, reader):
        self.targets = targets
        self.neighbors = neighbors
        self.reader = reader
        self.fmaps: torch.Tensor | None = None


class NH2ST(UnsupervisedTrainingMixin, BaseModelClass):
    """NH2ST :cite:p:`Qu2025`: spatial gene expression from H&E patches, trained with a query branch
    and a hypergraph neighbour branch aligned by cross-attention and contrastive learning.

    Only the translator path, ``translator(head(trunk(patch)))``, runs at inference, so
    :meth:`predict` works on slides with an H&E image and spot positions but no expression.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (``None`` only when loading).
    registry
        Saved registry (used by :meth:`load`).
    n_genes
        Number of genes to predict: the most highly expressed genes detected in every section
        (ignored when ``genes`` is given).
    genes
        Explicit list of genes to predict (all must be in ``adata.var_names``).
    latent_dim
        Latent size ``N``.
    trunk
        ``"frozen"``: the ResNet18 trunk is fixed and its feature maps are computed once per spot
        and cached (the fast path on CPU). ``"finetune"``: trained end to end (the paper; a GPU job
        at 224 px).
    weights
        Trunk initialisation: ``"imagenet"`` (torchvision IMAGENET1K_V1 from the torch hub cache or
        the internet; falls back to random init with a loud warning), a path to a ResNet18 state dict
        (e.g. a histology self-supervised checkpoint), or ``"random"``. Shown in the summary, saved.
    image_size
        Side of the patch fed to the trunk, in pixels (multiple of 32). Crops of
        ``setup_anndata(patch_size=...)`` full-resolution pixels are resampled to it.
    pooling
        ``"avg"`` (global average of the trunk map, default) or ``"flatten"`` (the authors' code:
        ``Linear(512*7*7 -> N)``, 3x slower to train on CPU and weaker on HER2ST with a frozen trunk,
        see the changelog). Pooled features are standardised on the training spots before the
        projection.
    attention
        ``"cross"`` (NH2ST), ``"self"`` or ``"none"`` (ablations).
    attention_mode
        ``"vector"`` (one vector per modality, as Eq. 1) or ``"tokens"`` (attend over trunk-map,
        gene-group and hypergraph-node tokens).
    n_heads
        Attention heads.
    share_attention
        One attention block for both branches (authors' code).
    use_neighbor_branch
        ``False``: query branch only (ablation).
    n_neighbors
        ``K`` spatial neighbours per spot (same section only).
    hyperedge_degree
        Nodes per hyperedge.
    n_hgnn_layers
        ``L`` (hyper)graph convolution layers.
    graph
        ``"hypergraph"`` or ``"graph"`` (ablation).
    hypergraph_norm
        ``"rw"`` (torch_geometric) or ``"sym"`` (HGNN) normalisation.
    contrastive
        ``False`` drops both contrastive losses (ablation).
    symmetric_nce
        Symmetric InfoNCE instead of the paper's one-directional Eq. 2.
    temperature
        InfoNCE temperature.
    lambda_query, lambda_neighbor
        Loss weights of Eq. 5.
    translator_hidden
        Hidden width of the translator.
    activation
        Nonlinearity inside the ST encoder and translator (``"none"``: authors' code).
    dropout
        Dropout.
    n_gene_tokens
        Gene-group tokens for ``attention_mode="tokens"``.
    library_size
        Normalisation of count targets: library size over ``"all_genes"`` (scanpy's
        ``normalize_total``) or over the ``"selected_genes"`` (authors' code).
    neighbor_trunk_grad
        ``trunk="finetune"`` only: ``False`` encodes the neighbours' patches without gradient (only
        the target patches train the trunk), about 3x faster on CPU; ``True`` is the paper.

    Notes
    -----
    Targets and predictions are ``log1p(counts / library size * 1e4)`` (natural log) of the selected
    genes, unless ``setup_anndata(is_count_data=False)`` said the data is already normalised, in which
    case they are on that scale.

    Examples
    --------
    >>> adata = st_predict.data.synthetic_tissue()
    >>> st_predict.NH2ST.setup_anndata(adata, library_key="section")
    >>> model = st_predict.NH2ST(adata, weights="random")
    >>> model.train(max_epochs=20)
    >>> model.predict(new_adata, key_added="nh2st")  # new_adata needs an image and obsm["spatial"] only
    """

    _module_cls = NH2STModule
    _training_plan_cls = NH2STTrainingPlan

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        n_genes: int = 250,
        genes: Sequence[str] | None = None,
        latent_dim: int = 512,
        trunk: Literal["frozen", "finetune"] = "frozen",
        weights: str | os.PathLike | None = "imagenet",
        image_size: int = 224,
        pooling: Literal["flatten", "avg"] = "avg",
        attention: Literal["cross", "self", "none"] = "cross",
        attention_mode: Literal["vector", "tokens"] = "vector",
        n_heads: int = 8,
        share_attention: bool = False,
        use_neighbor_branch: bool = True,
        n_neighbors: int = 8,
        hyperedge_degree: int = 4,
        n_hgnn_layers: int = 2,
        graph: Literal["hypergraph", "graph"] = "hypergraph",
        hypergraph_norm: Literal["rw", "sym"] = "rw",
        contrastive: bool = True,
        symmetric_nce: bool = False,
        temperature: float = 0.05,
        lambda_query: float = 1.0,
        lambda_neighbor: float = 0.5,
        translator_hidden: int = 256,
        activation: Literal["relu", "gelu", "none"] = "relu",
        dropout: float = 0.0,
        n_gene_tokens: int = 16,
        library_size: Literal["all_genes", "selected_genes"] = "all_genes",
        neighbor_trunk_grad: bool = True,
    ):
        super().__init__(adata, registry)
        if library_size not in ("all_genes", "selected_genes"):
            raise ValueError(f"library_size must be 'all_genes' or 'selected_genes', got {library_size!r}.")
        setup = self.registry_["setup_args"]
        if adata is not None:
            libraries = spot_libraries(adata, setup["library_key"])
            genes = select_genes(
                self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY), adata.var_names, libraries,
                n_top=n_genes, genes=genes, is_count_data=setup["is_count_data"],
            )
        elif genes is None:
            raise ValueError("NH2ST without adata needs the gene list (genes=...).")
        genes = [str(g) for g in genes]
        self.genes_ = genes
        self.module = self._module_cls(
            n_genes=len(genes), latent_dim=latent_dim, image_size=image_size, trunk=trunk, pooling=pooling,
            attention=attention, attention_mode=attention_mode, n_heads=n_heads, share_attention=share_attention,
            use_neighbor_branch=use_neighbor_branch, n_neighbors=n_neighbors, hyperedge_degree=hyperedge_degree,
            n_hgnn_layers=n_hgnn_layers, graph=graph, hypergraph_norm=hypergraph_norm, contrastive=contrastive,
            symmetric_nce=symmetric_nce, temperature=temperature, lambda_query=lambda_query,
            lambda_neighbor=lambda_neighbor, translator_hidden=translator_hidden, activation=activation,
            dropout=dropout, n_gene_tokens=n_gene_tokens, neighbor_trunk_grad=neighbor_trunk_grad,
        )
        self.weights_source_ = "from saved model" if _LOADING.get() else load_trunk_weights(self.module.trunk, weights)
        self._data: _TrainingData | None = None
        self._predict_adata: AnnData | None = None
        self.init_params_ = self._get_init_params(locals())  # ``genes`` holds the resolved list
        if adata is not None:
            self._training_data()  # check neighbours, patches and targets now, not at train()

    # -- summary ---------------------------------------------------------------------------------
    @property
    def summary_string(self) -> str:
        """One paragraph describing the model (shown by ``repr``)."""
        p = self.init_params_["non_kwargs"]
        branch = (
            f"neighbour branch K={p['n_neighbors']}, {p['graph']} degree {p['hyperedge_degree']}, L={p['n_hgnn_layers']}"
            if p["use_neighbor_branch"]
            else "query branch only"
        )
        nce = (
            f"InfoNCE tau={p['temperature']}{' symmetric' if p['symmetric_nce'] else ''}, "
            f"lambda=({p['lambda_query']}, {p['lambda_neighbor']})"
            if p["contrastive"]
            else "no contrastive loss"
        )
        return (
            f"NH2ST model: {len(self.genes_)} genes, latent {p['latent_dim']}, ResNet18 trunk {p['trunk']} "
            f"at {p['image_size']} px ({p['pooling']} pooling), weights: {self.weights_source_}; "
            f"{p['attention']}-attention ({p['attention_mode']}), {branch}; {nce}.\n"
            f"Training status: {'Trained' if self.is_trained_ else 'Not Trained'}"
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
            Patch side in full-resolution pixels, centred on each spot (224).
        is_count_data
            ``True``: raw counts, normalised by the model to ``log1p(counts / library size * 1e4)``.
            ``False``: already normalised values, used as they are.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
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
        make_patch_reader(adata, spatial_key, image_key, library_key, patch_size, out_size=32)  # validates
        anndata_fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=is_count_data),
            ObsmField(REGISTRY_KEYS.SPATIAL_KEY, spatial_key),
        ]
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    # -- data ------------------------------------------------------------------------------------
    def _setup(self) -> dict:
        return self.registry_["setup_args"]

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
        targets = normalize_expression(
            counts, gene_idx, setup["is_count_data"], self.init_params_["non_kwargs"]["library_size"]
        )
        libraries = spot_libraries(adata, setup["library_key"])
        neighbors = None
        if self.module.use_neighbor_branch:
            coords = spot_coordinates(adata, setup["spatial_key"])
            neighbors = torch.from_numpy(spatial_knn(coords, libraries, self.module.n_neighbors))
        reader = make_patch_reader(
            adata, setup["spatial_key"], setup["image_key"], setup["library_key"], setup["patch_size"],
            self.module.image_size,
        )
        self._data = _TrainingData(torch.from_numpy(targets), neighbors, reader)
        return self._data

    def _reader_for(self, adata: AnnData, keys: dict | None = None):
        setup = {**self._setup(), **{k: v for k, v in (keys or {}).items() if v is not None}}
        library_key = setup["library_key"]
        if library_key is not None and library_key not in adata.obs:
            if keys and keys.get("library_key"):
                raise KeyError(f"adata.obs has no column {library_key!r} (library_key).")
            library_key = None  # single-section data without the column: spot_libraries checks uns
        return make_patch_reader(
            adata, setup["spatial_key"], setup["image_key"], library_key, setup["patch_size"], self.module.image_size
        )

    # -- training --------------------------------------------------------------------------------
    def train(
        self,
        max_epochs: int = 20,
        batch_size: int = 8,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float = 1.0,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        lr_step_size: int = 50,
        lr_gamma: float = 0.9,
        augment: bool = True,
        num_workers: int = 0,
        embed_batch_size: int = 16,
        progress: bool = True,
        plan_kwargs: dict | None = None,
        **trainer_kwargs,
    ):
        """Train NH2ST (Adam + StepLR, paper defaults) with PyTorch Lightning.

        With ``trunk="frozen"`` the trunk's feature maps of every spot are computed first (once per
        model, progress bar) and batches are read from that cache; with ``"finetune"`` patches are
        cropped on the fly and the trunk trains end to end.

        Parameters
        ----------
        max_epochs
            Epochs (20).
        batch_size
            Target spots per batch (8); each brings its ``K`` neighbours. Must be >= 2 for the
            contrastive losses; the last incomplete batch of an epoch is dropped.
        accelerator, devices
            Lightning's ``"cpu"``, ``"gpu"``, ``"auto"``...; several GPUs with ``strategy="ddp"``.
        train_size
            Fraction of spots to train on; the rest (random spots) is the validation set whose
            losses are logged every epoch. 1.0: no validation.
        lr, weight_decay
            Adam.
        lr_step_size, lr_gamma
            StepLR (per epoch).
        augment
            Random flips and 90-degree rotations of patches (for cached maps, of the feature maps).
        num_workers
            DataLoader workers.
        embed_batch_size
            Patches per trunk call when filling the frozen cache.
        progress
            Progress bars for embedding and training.
        plan_kwargs
            More keyword arguments for :class:`~st_predict.train.NH2STTrainingPlan`.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (a Lightning ``Trainer``), e.g. ``strategy="ddp"``.
        """
        if self.module.contrastive and batch_size < 2:
            raise ValueError(
                f"batch_size={batch_size} is too small for a contrastive loss (needs >= 2 spots per batch: "
                "one positive and at least one negative)."
            )
        if not 0 < train_size <= 1:
            raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
        data = self._training_data()
        n_obs = len(data.targets)
        rng = np.random.default_rng(settings.seed)
        perm = rng.permutation(n_obs)
        n_train = int(round(train_size * n_obs))
        train_idx, val_idx = np.sort(perm[:n_train]), np.sort(perm[n_train:])
        if len(train_idx) < batch_size:
            raise ValueError(
                f"Only {len(train_idx)} training spots for batch_size={batch_size}: lower batch_size or train_size < 1."
            )
        device = _device_for(accelerator)
        if self.module.trunk_mode == "frozen":
            fmaps = self._cached_fmaps(device, embed_batch_size, progress)
            source = {"fmaps": fmaps}
            if fmaps.shape[-1] == 1:  # pooled cache: flips/rotations cannot change an average
                augment = False
        else:
            source = {"read_patches": data.reader.read}
        if not self.is_trained_:
            # start from the per-gene mean, with standardised trunk features (fitted on training spots)
            self.module.init_output_bias(data.targets[torch.from_numpy(train_idx)].mean(0))
            if self.module.trunk_mode == "frozen":
                sample = fmaps[torch.from_numpy(train_idx)]
            else:
                pick = np.sort(rng.choice(train_idx, min(len(train_idx), 256), replace=False))
                sample = compute_fmaps(self.module.to(device), lambda i: data.reader.read(pick[i]), len(pick),
                                       batch_size=embed_batch_size, device=device, progress=False)
            self.module.path_head.fit_input_scaling(sample)
        collate = NH2STCollate(data.targets, data.neighbors, augment=augment, **source)
        val_collate = NH2STCollate(data.targets, data.neighbors, augment=False, **source)
        datamodule = NH2STDataModule(train_idx, val_idx, collate, val_collate, batch_size, num_workers)
        plan = {"lr": lr, "weight_decay": weight_decay, "lr_step_size": lr_step_size, "lr_gamma": lr_gamma}
        plan.update(plan_kwargs or {})
        if len(val_idx):
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        trainer_kwargs.setdefault("enable_progress_bar", progress)
        return super().train(
            max_epochs=max_epochs, accelerator=accelerator, devices=devices, datamodule=datamodule,
            plan_kwargs=plan, **trainer_kwargs,
        )

    def _cached_fmaps(
        self, device: torch.device, batch_size: int = 16, progress: bool = True, fmaps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Trunk feature maps of every training spot, computed on first use (frozen trunk only), or
        ``fmaps`` when given (precomputed by this model's trunk, e.g. shared between folds)."""
        data = self._training_data()
        if data.fmaps is None:
            self.module.to(device)
            if fmaps is None:
                fmaps = compute_fmaps(
                    self.module, data.reader.read, len(data.targets), batch_size=batch_size, device=device,
                    progress=progress, desc="Embedding patches (frozen trunk)",
                )
            elif fmaps.shape[0] != len(data.targets):
                raise ValueError(f"fmaps has {fmaps.shape[0]} rows for {len(data.targets)} spots.")
            head = self.module.path_head
            if head.pooling == "avg" and head.token_proj is None:
                fmaps = fmaps.mean((2, 3), keepdim=True)  # all the avg head needs: 49x less memory
            data.fmaps = fmaps
        return data.fmaps

    # -- inference -------------------------------------------------------------------------------
    def _inference(
        self, adata, indices, batch_size, what: str, progress: bool = False, keys: dict | None = None
    ) -> tuple[np.ndarray, pd.Index]:
        if adata is None:
            adata = self.adata if self.adata is not None else self._predict_adata
            if adata is None:
                raise ValueError("This model was loaded without AnnData: pass adata=.")
        use_cache = (
            adata is self.adata and self._data is not None and self._data.fmaps is not None
            and not any((keys or {}).values())
        )
        reader = None if use_cache else self._reader_for(adata, keys)
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
                    if use_cache:
                        batch = {"fmaps": self._data.fmaps[idx].to(module.device)}
                    else:
                        batch = {"patches": reader.read(idx).to(module.device)}
                    res = module.predict_expression(batch) if what == "expression" else module.latent(batch)
                    out.append(res.float().cpu().numpy())
        finally:
            module.train(was_training)
        width = len(self.genes_) if what == "expression" else module.path_head.proj.out_features
        arr = np.concatenate(out) if out else np.zeros((0, width), dtype=np.float32)
        return arr, adata.obs_names[indices]

    def get_predicted_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int = 16,
        return_numpy: bool = False,
        progress: bool = False,
        library_key: str | None = None,
        image_key: str | None = None,
        spatial_key: str | None = None,
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
            Visium ``"fullres"`` one); ``None``: as at setup. The patch size (full-resolution
            pixels) is the one of the setup.

        Returns
        -------
        ``(spots x genes)`` DataFrame (index ``obs_names``, columns :attr:`genes_`) on the target
        scale (``log1p`` counts per 10k for count data).
        """
        self._check_if_trained(warn=True)
        keys = {"library_key": library_key, "image_key": image_key, "spatial_key": spatial_key}
        arr, names = self._inference(adata, indices, batch_size, "expression", progress, keys)
        if return_numpy:
            return arr
        return pd.DataFrame(arr, index=names, columns=pd.Index(self.genes_))

    def get_latent_representation(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None, batch_size: int = 16
    ) -> np.ndarray:
        """The pathology latent ``h^p`` (input of the translator) of each spot, ``(n_spots, latent_dim)``."""
        self._check_if_trained(warn=True)
        return self._inference(adata, indices, batch_size, "latent")[0]

    def predict(
        self,
        adata: AnnData | None = None,
        key_added: str = PREDICTED_KEY,
        batch_size: int = 16,
        progress: bool = False,
        library_key: str | None = None,
        image_key: str | None = None,
        spatial_key: str | None = None,
    ) -> pd.DataFrame:
        """Predict every spot of ``adata`` and write the DataFrame to ``adata.obsm[key_added]``.

        This is the only change made to ``adata``. Works on AnnData with an image and spot positions
        but no expression (``n_vars == 0``). ``library_key``, ``image_key`` and ``spatial_key`` may be
        given as in :meth:`get_predicted_expression`. Returns the DataFrame.
        """
        target = adata
        if target is None:
            target = self.adata if self.adata is not None else self._predict_adata
        if target is None:
            raise ValueError("This model was loaded without AnnData: pass adata=.")
        df = self.get_predicted_expression(
            target, batch_size=batch_size, progress=progress, library_key=library_key, image_key=image_key,
            spatial_key=spatial_key,
        )
        target.obsm[key_added] = df
        logger.info("Added predicted expression of %d genes to adata.obsm[%r].", df.shape[1], key_added)
        return df

    # -- save / load -----------------------------------------------------------------------------
    def save(self, dir_path: str, prefix: str | None = None, overwrite: bool = False, save_anndata: bool = False, **kwargs):
        """Save the weights, genes, setup and hyperparameters to ``dir_path/model.pt`` (see
        :meth:`scvi.model.base.BaseModelClass.save`). ``save_anndata=True`` also writes the AnnData
        (only possible when its images are numpy arrays)."""
        super().save(dir_path, prefix=prefix, overwrite=overwrite, save_anndata=save_anndata, **kwargs)

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
        saved = torch.load(path, map_location="cpu", weights_only=False)
        train_vars = pd.Index(np.asarray(saved["var_names"]).astype(str))
        model_genes = saved["attr_dict"]["genes_"]
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
        try:
            model = super().load(dir_path, adata=load_arg, accelerator=accelerator, device=device, prefix=prefix, **kwargs)
        finally:
            _LOADING.reset(token)
        model._predict_adata = predict_only
        return model


def _device_for(accelerator: str) -> torch.device:
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
