"""NH2ST as an scvi-tools model: ``NH2ST.setup_anndata(adata); model = NH2ST(adata); model.train()``."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import rich.pretty  # noqa: F401  (scvi-tools' view_anndata_setup calls rich.pretty without importing it)
import torch
from anndata import AnnData
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, ObsmField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin
from scvi.utils import setup_anndata_dsp

from st_predict import tl
from st_predict._utils import (
    N_GENES,
    PATCH_SIZE_PX,
    PREDICT_BATCH_SIZE,
    PREDICTED_KEY,
    REGISTRY_KEYS,
    InputError,
    MissingKeyError,
    quiet_logger,
    user_stacklevel,
)
from st_predict.module import NetworkSettings, NH2STModule
from st_predict.pp import (
    N_NEIGHBORS_STORED,
    NEIGHBORS_KEY,
    PatchGeometry,
    check_expression,
    check_sections_have_counts,
    select_genes,
    spatial_neighbors,
    spot_coordinates,
    spot_libraries,
    stored_neighbors_match,
)
from st_predict.train import NH2STTrainingPlan, TrainingSettings

from ._docstrings import nh2st_dsp
from ._encoder import encoder_digest, resolve_encoder
from ._fields import PatchField, setup_facts
from ._inference import InferenceMixin
from ._predict_checks import check_key_added, check_placement
from ._recipes import RECIPES, Recipe, get_recipe
from ._reliability import INTERVAL_LEVEL, ReliabilityMixin
from ._save_load import LOADING, SaveLoadMixin
from ._subspot import SubspotMixin
from ._training import TrainingData, TrainingMixin

logger = logging.getLogger(__name__)


def _method_of(func):
    """``func(model, ...)`` as a method: its signature with ``self`` for ``model``, its docstring without the
    ``model`` parameter."""
    @functools.wraps(func)
    def method(self, *args, **kwargs):
        return func(self, *args, **kwargs)

    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    method.__signature__ = sig.replace(parameters=[params[0].replace(name="self"), *params[1:]])
    method.__doc__ = re.sub(r"\n    model\n(?:        [^\n]*\n)+", "\n", func.__doc__ or "", count=1)
    return method


@nh2st_dsp.dedent
class NH2ST(SubspotMixin, ReliabilityMixin, SaveLoadMixin, InferenceMixin, TrainingMixin, UnsupervisedTrainingMixin,
            BaseModelClass):
    """NH2ST :cite:p:`Qu2025`: spatial gene expression from H&E patches, trained with a query branch
    and a hypergraph neighbour branch aligned by cross-attention and contrastive learning.

    Only the pathology side runs at inference, so :meth:`predict` works on slides with an H&E image and
    spot positions but no expression: with ``context="patch"`` (the paper) the translator path
    ``translator(head(trunk(patch)))`` of each spot's own patch; with ``context="neighbors"`` also the
    pathology hypergraph over the spot's ``K`` nearest spots (or tiles), ``translator([h_s^p, h_n^p])``,
    built from their patches alone.

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
        ``"default"`` or ``"paper"`` (see :data:`st_predict.model.RECIPES`), or a
        :class:`~st_predict.model.Recipe`.
    n_genes
        Number of genes to predict: the most highly expressed genes detected in every section
        (ignored when ``genes`` is given).
    genes
        Explicit list of genes to predict (all must be in ``adata.var_names``).
    weights
        Deprecated name of ``encoder_weights``.
    encoder
        The image trunk (default: the recipe's, ``"resnet18"``):

        - ``"resnet18"``;
        - a vision key of the lazyslide-models registry (``"uni"``, ``"uni2"``, ``"h-optimus-0"``,
          ``"virchow2"``, ``"gigapath"``, ``"phikon"``, ...; ``st_predict.nn.registry_vision_keys()``
          lists them);
        - a timm model name, or a Hugging Face Hub id ``"hf-hub:<org>/<name>"`` (read from the local HF
          cache when it is there, also with ``HF_HUB_OFFLINE=1``);
        - a :class:`torch.nn.Module` of yours mapping normalised ``(B, 3, S, S)`` patches to ``(B, D)``
          vectors or ``(B, C, h, w)`` maps (input size and normalisation from its timm config if it has
          one, else ``image_size`` (224) and ImageNet's).

        Any encoder but the ResNet18 defaults to ``trunk="frozen"`` and to its own input size: the
        patch (its micrometres fixed at setup) is resampled to that size and normalised as the
        encoder was trained. Its frozen features can be cached on disk (``train(feature_cache=...)``).
        The encoder's name and weights are saved with the model; the weights of a frozen hub or
        registry encoder are not copied into the model file but rebuilt on loading and checked
        against a digest.
    encoder_weights
        The encoder's weights. The ResNet18: ``"imagenet"`` (torchvision IMAGENET1K_V1 from the torch hub cache
        or the internet; falls back to random init with a loud warning; the default), a path to a ResNet18 state
        dict (e.g. a histology self-supervised checkpoint), a state dict itself, or ``"random"``. Any other
        encoder: a local file (for a registry key, its ``model_path``; for a timm name or hub id, a timm state
        dict), ``"random"`` (timm names only), or ``None``: the published weights. Gated models read the Hugging
        Face token from ``HF_TOKEN``. Shown in the summary, saved.
    library_size
        Normalisation of count targets: library size over ``"all_genes"`` (scanpy's
        ``normalize_total``) or over the ``"selected_genes"`` (authors' code).
    tta
        Average predictions over the 8 flips/90-degree rotations of each patch (test-time
        augmentation); ``None``: the recipe's choice. :meth:`get_predicted_expression` can override it.
    network
        All network settings at once (a :class:`~st_predict.module.NetworkSettings` or a dict of
        them); default: the recipe's.
    **network_overrides
        Network settings (:class:`~st_predict.module.NetworkSettings`), each defaulting to the
        recipe's value:

        %(network_settings)s

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

    # whole slides and cohorts: the functions of st_predict.tl, as methods
    predict_slide = _method_of(tl.predict_slide)
    predict_slides = _method_of(tl.predict_slides)
    as_tile_model = _method_of(tl.as_tile_model)

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        recipe: str | Recipe = "default",
        n_genes: int = N_GENES,
        genes: Sequence[str] | None = None,
        weights: str | os.PathLike | Mapping | None = None,
        encoder: str | torch.nn.Module | None = None,
        encoder_weights: str | os.PathLike | None = None,
        library_size: Literal["all_genes", "selected_genes"] = "all_genes",
        tta: bool | None = None,
        network: NetworkSettings | Mapping | None = None,
        **network_overrides,
    ):
        super().__init__(adata, registry)
        if library_size not in ("all_genes", "selected_genes"):
            raise InputError(f"library_size must be 'all_genes' or 'selected_genes', got {library_size!r}.")
        the_recipe = get_recipe(recipe)
        if LOADING.get():
            # saved before the translator had a context (format <= 2): it predicted from the patch alone
            if isinstance(network, Mapping) and "context" not in network:
                network = {**network, "context": "patch"}
            elif network is None and "context" not in network_overrides:
                network_overrides = {**network_overrides, "context": "patch"}
        if network is None:
            network = the_recipe.network
        elif not isinstance(network, NetworkSettings):
            network = NetworkSettings.from_dict(network)
        unknown = sorted(set(network_overrides) - set(NetworkSettings.names()))
        if unknown:
            raise TypeError(
                f"NH2ST got unknown keyword(s) {unknown}. Network settings are {list(NetworkSettings.names())}; "
                f"training settings ({', '.join(TrainingSettings.names())}) go to model.train()."
            )
        loading = LOADING.get()
        if weights is not None:
            if not loading:
                warnings.warn("NH2ST(weights=) is deprecated: use encoder_weights= (the ResNet18's too).", FutureWarning,
                              stacklevel=user_stacklevel())
            if encoder_weights is not None and not loading:
                raise InputError("Give encoder_weights= (weights= is its deprecated name), not both.")
            encoder_weights = weights if encoder_weights is None else encoder_weights
        # the encoder, resolved and built once; its spec completes the network settings, which are checked once.
        # Saved as such: a loaded model rebuilds the same network even if the recipe's defaults change later
        built, changes, saved_weights = resolve_encoder(network, network_overrides, encoder, encoder_weights, loading)
        network = network.replace(**{**network_overrides, **changes})
        setup = self.registry_["setup_args"]
        # the registered facts (sections, patch, pitch, neighbours), read once
        self._facts = setup_facts(self.adata_manager) if adata is not None else None
        if adata is not None:
            libraries = self._facts.libraries
            check_sections_have_counts(
                self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY), libraries,
                f"adata.layers[{setup['layer']!r}]" if setup.get("layer") else "adata.X",
            )
            genes = select_genes(
                self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY), adata.var_names, libraries,
                n_top=n_genes, genes=genes, is_count_data=setup["is_count_data"],
            )
        elif genes is None:
            raise InputError("NH2ST without adata needs the gene list (genes=...).")
        genes = [str(g) for g in genes]
        self.genes_ = genes
        self._library_size = library_size
        self.recipe_ = the_recipe
        self.tta_ = bool(the_recipe.tta) if tta is None else bool(tta)
        self.module = self._module_cls(len(genes), network, encoder=built)
        self.weights_source_ = "from saved model" if loading and self.module.saves_trunk else built[1].weights
        self.encoder_digest_ = None if loading else encoder_digest(self.module)
        self._data: TrainingData | None = None
        self._predict_adata: AnnData | None = None
        self.validation_: dict | None = None
        # train(reliability=True): fold models' weights, per-gene reliability, conformal calibration
        self.fold_states_ = self.gene_reliability_ = self.conformal_ = self.reliability_sections_ = None
        self.shift_reference_ = self.reliability_scope_ = None
        self.train_sections_: list[str] | None = None
        self.best_epoch_: int | None = None
        self.train_settings_: dict | None = None
        self.patch_geometry_: PatchGeometry | None = None
        self.spot_pitch_um_: float | None = None
        # what load() rebuilds the model from (scvi-tools' layout): the resolved genes and network
        self.init_params_ = {
            "non_kwargs": {
                # a named recipe is saved by name, a custom one as it is
                "recipe": the_recipe.name if RECIPES.get(the_recipe.name) == the_recipe else the_recipe,
                "n_genes": n_genes, "genes": genes,
                "weights": None,  # its deprecated name: encoder_weights
                "encoder_weights": saved_weights,
                "library_size": library_size, "tta": tta, "network": network.to_dict(),
            },
            "kwargs": {},
        }
        if adata is not None:
            self.patch_geometry_, self.spot_pitch_um_ = self._facts.geometry, self._facts.spot_pitch_um
            self._training_data()  # check neighbours, patches and targets now, not at train()

    @property
    def network_settings(self) -> NetworkSettings:
        """The network's settings, resolved (recipe + overrides)."""
        return self.module.settings

    @property
    def module_kwargs(self) -> dict:
        """The network's settings as a dict (:attr:`network_settings`)."""
        return self.module.settings.to_dict()

    @property
    def patch_size_um_(self) -> float | None:
        """Side of the training patches in micrometres (``patch_geometry_.size_um``; ``None`` when the
        training data had no pixel size)."""
        return None if self.patch_geometry_ is None else self.patch_geometry_.size_um

    @patch_size_um_.setter
    def patch_size_um_(self, value: float | None) -> None:
        # scvi-tools saves every attribute ending in "_" and sets them again on load. Models saved in
        # format 1 recorded only this value, not the geometry: rebuild the geometry from it and the setup.
        geometry = self.patch_geometry_
        if geometry is not None and geometry.size_um == value:
            return
        setup = self.registry_["setup_args"]
        # set up in micrometres: the pixels on the training data were not saved (only sections with a pixel
        # size can then be predicted, as before)
        px = float(setup["patch_size"]) if setup.get("patch_size_um") is None else (geometry.size_px if geometry else None)
        self.patch_geometry_ = PatchGeometry(None if value is None else float(value), px)

    # -- summary ---------------------------------------------------------------------------------
    @property
    def summary_string(self) -> str:
        """:attr:`description` and whether the model is trained (shown by ``repr``)."""
        return f"{self.description}\nTraining status: {'Trained' if self.is_trained_ else 'Not Trained'}"

    @property
    def description(self) -> str:
        """One paragraph describing the model: recipe, genes, trunk and its weights, branches, losses, patch."""
        p = self.module.settings
        branch = (
            f"neighbour branch K={p.n_neighbors}, {p.graph} degree {p.hyperedge_degree}, L={p.n_hgnn_layers}"
            if p.use_neighbor_branch
            else "query branch only"
        )
        nce = (
            f"InfoNCE tau={p.temperature}{' symmetric' if p.symmetric_nce else ''}"
            f"{' (residual form: solvable without the image)' if p.cross_residual else ''}, "
            f"lambda=({p.lambda_query}, {p.lambda_neighbor})"
            if p.contrastive
            else "no contrastive loss"
        )
        val = ""
        if self.validation_ is not None:
            v = self.validation_
            where = f"section(s) {', '.join(v['sections'])}" if v["kind"] == "section" else "random spots (leaky)"
            best = f", best epoch {self.best_epoch_}" if self.best_epoch_ else ""
            val = f"\nValidation: {where}{best}."
        patch = f"; patches {self.patch_geometry_}" if self.patch_geometry_ is not None else ""
        sees = ("predicts each spot from its own patch (context 'patch', the paper)" if p.context == "patch" else
                f"predicts each spot from its patch and its {p.n_neighbors} nearest spots' (context 'neighbors')")
        return (
            f"NH2ST model (recipe {self.recipe_.name!r}): {len(self.genes_)} genes, latent {p.latent_dim}, "
            f"{'ResNet18' if p.encoder == 'resnet18' else p.encoder} trunk {p.trunk} at {p.image_size} px "
            f"({p.pooling} pooling), weights: "
            f"{self.weights_source_}; {p.attention}-attention ({p.attention_mode}), {branch}; {nce}{patch}; {sees}."
            f"{val}{self.reliability_description()}"
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
        patch_size: float = PATCH_SIZE_PX,
        patch_size_um: float | None = None,
        is_count_data: bool = True,
        n_neighbors: int = N_NEIGHBORS_STORED,
        neighbors_key: str = NEIGHBORS_KEY,
        **kwargs,
    ):
        """%(summary)s.

        Checks everything training needs and says what is wrong by name: expression (finite; for
        counts also non-negative integers), ``adata.obsm[spatial_key]``, the image and scale factor
        of every section, and that every spot's patch lies inside its image. Registers, once, the facts
        every part of the model reads (``model.view_anndata_setup()`` lists them): the expression, the spot
        positions, the section of each spot (``library``, a categorical field), each spot's nearest spots of
        its section (``neighbor_indices`` and ``neighbor_distances``) and the patch (``patch``: the image, the
        patch side and its pixels on each section, the spot pitch).

        Writes scvi-tools' ``adata.uns["_scvi_uuid"]``, ``adata.uns["_scvi_manager_uuid"]`` and
        ``adata.obs["_scvi_library"]`` (the sections' codes) and, when they are absent or do not belong to
        these spots (an AnnData subset after they were computed), the neighbour arrays
        ``adata.obsm[f"{neighbors_key}_indices"]`` and ``adata.obsm[f"{neighbors_key}_distances"]``
        (:func:`st_predict.pp.spatial_neighbors`). Nothing else of the AnnData changes.

        The patch is resolved here, once, into a :class:`~st_predict.pp.PatchGeometry`: when the
        sections' pixel sizes are known it is a physical size (``patch_size`` pixels become
        micrometres with their median pixel size), and every section the model later predicts is
        cropped at that many micrometres, whatever its resolution.

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
            Patch side in full-resolution pixels of this data, centred on each spot. Patches are
            resampled to the network's ``image_size``.
        patch_size_um
            Patch side in micrometres instead, converted with each section's pixel size
            (``adata.uns["spatial"][library]["metadata"]["pixel_size_um"]``, written by the readers),
            so sections scanned at different resolutions give the same physical patch.
        is_count_data
            ``True``: raw counts, normalised by the model to ``log1p(counts / library size * 1e4)``.
            ``False``: already normalised values, used as they are.
        n_neighbors
            Nearest spots of the same section stored per spot (a model with ``K`` neighbours reads the first
            ``K``; default: 25, the paper's largest ``K``).
        neighbors_key
            Prefix of the ``adata.obsm`` neighbour arrays (:func:`st_predict.pp.spatial_neighbors`): arrays
            already there are used when they belong to these spots and hold at least ``n_neighbors``.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if adata.is_view:
            raise InputError(
                "setup_anndata got a view of an AnnData (e.g. adata[mask]), which it cannot register: pass "
                "adata[mask].copy(), or st_predict.data.select_sections(adata, [...]) for whole sections "
                "(it keeps only their images)."
            )
        if adata.n_obs == 0:
            raise InputError("The AnnData is empty (n_obs == 0): there are no spots to train on.")
        if adata.n_vars == 0:
            raise InputError(
                "The AnnData has no genes (n_vars == 0). Training needs expression; to predict on an "
                "image-only AnnData, skip setup_anndata and call model.predict(adata)."
            )
        if layer is not None and layer not in adata.layers:
            raise MissingKeyError(f"layer={layer!r} is not in adata.layers (layers: {list(adata.layers)}).")
        matrix = adata.layers[layer] if layer is not None else adata.X
        check_expression(matrix, f"adata.layers[{layer!r}]" if layer else "adata.X", is_count_data)
        coords = spot_coordinates(adata, spatial_key)
        libraries = spot_libraries(adata, library_key)
        have = adata.obsm.get(f"{neighbors_key}_indices")
        if have is None or np.asarray(have).shape[1] < n_neighbors or not stored_neighbors_match(
                adata, neighbors_key, coords, libraries):
            if have is not None:
                logger.info("adata.obsm[%r] does not belong to these spots (or holds fewer than %d neighbours): "
                            "computed again.", f"{neighbors_key}_indices", n_neighbors)
            spatial_neighbors(adata, n_neighbors, library_key, spatial_key, neighbors_key)
        anndata_fields = [
            # counts are checked by check_expression above (which accepts float counts with rounding
            # noise); scvi's own check would warn about those
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            ObsmField(REGISTRY_KEYS.SPATIAL_KEY, spatial_key),
            CategoricalObsField(REGISTRY_KEYS.LIBRARY_KEY, library_key),
            ObsmField(REGISTRY_KEYS.NEIGHBOR_INDICES_KEY, f"{neighbors_key}_indices"),
            ObsmField(REGISTRY_KEYS.NEIGHBOR_DISTANCES_KEY, f"{neighbors_key}_distances"),
            PatchField(image_key, spatial_key, library_key, patch_size, patch_size_um, neighbors_key),
        ]
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        with quiet_logger("scvi.data.fields"):  # not "INFO Generating sequential column names" (obsm has none)
            adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    # -- inference -------------------------------------------------------------------------------
    def get_predicted_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int = PREDICT_BATCH_SIZE,
        return_numpy: bool = False,
        progress: bool = False,
        library_key: str | None = None,
        image_key: str | None = None,
        spatial_key: str | None = None,
        tta: bool | None = None,
        trunk_features: torch.Tensor | None = None,
        feature_cache: str | os.PathLike | bool | None = None,
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
            Visium ``"fullres"`` one); ``None``: as at setup. The patch is the model's
            :attr:`patch_geometry_`: the training patches' micrometres on every section of ``adata``
            whose pixel size is known.
        tta
            Test-time augmentation (mean over the 8 flips/rotations of each patch); ``None``: the
            model's setting (:attr:`tta_`).
        trunk_features
            Frozen trunk only: precomputed trunk maps of ``adata``'s spots (see :meth:`train`).
        feature_cache
            Frozen trunk only: read the encoder's features of ``adata``'s sections from the on-disk
            cache (a folder, or ``True`` for the default one; see :meth:`train`), computing and
            storing those that are missing. Predicting the same section again, with this model or
            another with the same encoder and patch, then runs no encoder.

        Returns
        -------
        ``(spots x genes)`` DataFrame (index ``obs_names``, columns :attr:`genes_`) on the target
        scale (``log1p`` counts per 10k for count data).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
        self._check_if_trained(warn=True)
        keys = {"library_key": library_key, "image_key": image_key, "spatial_key": spatial_key}
        tta = self.tta_ if tta is None else bool(tta)
        arr, names = self._inference(adata, indices, batch_size, "expression", progress, keys, tta, trunk_features,
                                     feature_cache)
        if return_numpy:
            return arr
        return pd.DataFrame(arr, index=names, columns=pd.Index(self.genes_))

    def get_latent_representation(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None, batch_size: int = PREDICT_BATCH_SIZE
    ) -> np.ndarray:
        """The pathology latent ``h^p`` (input of the translator) of each spot, ``(n_spots, latent_dim)``."""
        self._check_if_trained(warn=True)
        return self._inference(adata, indices, batch_size, "latent")[0]

    def predict(
        self,
        adata: AnnData | None = None,
        key_added: str = PREDICTED_KEY,
        batch_size: int = PREDICT_BATCH_SIZE,
        progress: bool = False,
        library_key: str | None = None,
        image_key: str | None = None,
        spatial_key: str | None = None,
        tta: bool | None = None,
        feature_cache: str | os.PathLike | bool | None = None,
        interval_level: float | None = INTERVAL_LEVEL,
        ensemble: bool | None = None,
        overwrite: bool = False,
        allow_off_tissue: bool = False,
        interval_depth: float | None = None,
    ) -> pd.DataFrame:
        """Predict every spot of ``adata`` and write the DataFrame to ``adata.obsm[key_added]``.

        Before predicting, each new section's spots are checked against its image: x and y swapped (against
        its array grid), coordinates in a downscaled image's pixels or in micrometres (the spot pitch in um
        against the training data's and the platforms'), or spots on glass (more than a quarter of the patches)
        raise an :class:`~st_predict.InputError` naming the likely cause; ``allow_off_tissue=True`` predicts
        them anyway. Patches of one colour only give an :class:`~st_predict.InputWarning`.

        ``key_added`` may name a key an earlier ``predict`` wrote (it is replaced); a key that holds anything else
        of the user's is refused unless ``overwrite=True``, and the spot coordinates (``obsm["spatial"]``, or
        ``spatial_key``) are never replaced.

        A model trained with ``reliability=True`` also writes, at ``interval_level`` (default 90 %; ``None``:
        none), bounds for a **measurement** at ``interval_depth`` UMI per spot (default: the training sections'
        median, :attr:`calibration_depth`; counts noise included) in ``obsm[f"{key_added}_lower"]`` and
        ``..._upper``, bounds for the **expected** expression in ``..._expected_lower`` and
        ``..._expected_upper``, their model part in ``..._model_sd`` (``st-predict evaluate`` rebuilds the
        first at each section's own depth), each gene's reliability
        (``uns["st_predict"][key_added]["gene_reliability"]``), and per new section the shift detector's
        distance (``["shift"]``) and ``["intervals_trusted"]`` (``False``, with an
        :class:`~st_predict.InputWarning`, for a section unlike the calibration sections). ``ensemble``: the
        point is the mean of the full and fold models (default :data:`ENSEMBLE_DEFAULT`).

        Also records, in ``adata.uns["st_predict"][key_added]``, the sections the model trained on
        (``training_sections``) and validated on (``validation_sections``), so that scoring can keep
        them apart from held-out sections (``st-predict evaluate`` does). These are the only changes
        made to ``adata``. Works on AnnData with an image and spot positions but no expression
        (``n_vars == 0``). ``library_key``, ``image_key``, ``spatial_key``, ``tta`` and ``feature_cache``
        may be given as in :meth:`get_predicted_expression`. Returns the DataFrame.
        """
        target = self._target(adata)
        if interval_depth is not None and not self.has_reliability:
            raise InputError("interval_depth is for the intervals of a model trained with reliability=True.")
        check_key_added(target, key_added, spatial_key or "spatial", overwrite)
        if not target.obs_names.is_unique:
            dup = target.obs_names[target.obs_names.duplicated()]
            raise InputError(f"adata.obs_names has {len(dup)} duplicates (e.g. {dup[0]!r}): the predictions are a "
                             "DataFrame indexed by them. Call adata.obs_names_make_unique() first.")
        keys = {"library_key": library_key, "image_key": image_key, "spatial_key": spatial_key}
        setup, lib_key = self._prediction_keys(target, keys)
        if target is not self.adata:  # the training sections were checked by training on them
            check_placement(self, target, self._reader_for(target, keys), spot_coordinates(target, setup["spatial_key"]),
                            spot_libraries(target, lib_key), setup["spatial_key"], allow_off_tissue)
        df = self.get_predicted_expression(
            target, batch_size=batch_size, progress=progress, library_key=library_key, image_key=image_key,
            spatial_key=spatial_key, tta=tta, feature_cache=feature_cache,
        )
        entry = {"library_key": lib_key or "",  # where evaluate finds the sections
                 "training_sections": list(self.train_sections_ or []),
                 "validation_sections": [str(s) for s in ((self.validation_ or {}).get("sections") or [])]}
        if self.has_reliability:
            df, more = self._reliability_into(target, df, key_added, lambda: self.get_predicted_expression(
                target, batch_size=batch_size, library_key=library_key, image_key=image_key, spatial_key=spatial_key,
                tta=tta, feature_cache=feature_cache, return_numpy=True), interval_level, ensemble, interval_depth,
                None if target is self.adata else self._reader_for(target, keys).read, spot_libraries(target, lib_key))
            entry.update(more)
        target.obsm[key_added] = df
        meta = dict(target.uns.get("st_predict", {})) if isinstance(target.uns.get("st_predict"), Mapping) else {}
        meta[key_added] = entry
        target.uns["st_predict"] = meta
        logger.info("Added predicted expression of %d genes to adata.obsm[%r].", df.shape[1], key_added)
        return df
