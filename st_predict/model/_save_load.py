"""Saving and loading NH2ST: atomic, versioned ``model.pt`` files (scvi-tools' layout)."""

from __future__ import annotations

import contextvars
import os
import sys
import types
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from st_predict._utils import InputError, MissingFileError, quiet_logger, staged_folder
from st_predict.module import NetworkSettings
from st_predict.train import TrainingSettings

from ._encoder import ENCODER_OVERRIDE, check_encoder_digest
from ._recipes import Recipe

#: Version of the saved-model layout (``model.pt``'s keys, the module's parameters and attributes).
#: Raised when a change means older releases cannot read new files or this release cannot read old
#: ones; models saved before versions were recorded are format 1. Format 2 records the network's
#: settings as one dict (``init_params_["non_kwargs"]["network"]``) and the patch geometry
#: (``patch_geometry_``). Format 3 adds the network setting ``context`` (what the translator predicts from);
#: formats 1 and 2 are read and migrated (:meth:`SaveLoadMixin.load`; they predicted from the patch alone).
SAVE_FORMAT = 3


def _legacy_pickle_paths() -> None:
    """Saved models pickled their recipe (and its settings) under the modules these classes lived in then:
    ``st_predict.train._recipes`` (format 1) and ``st_predict._settings`` (formats 1 and 2, a custom recipe).
    Those names point here, so that such files keep loading."""
    legacy = types.ModuleType("st_predict._settings")
    legacy.Recipe, legacy.NetworkSettings, legacy.TrainingSettings = Recipe, NetworkSettings, TrainingSettings
    sys.modules.setdefault("st_predict._settings", legacy)
    sys.modules.setdefault("st_predict.train._recipes", legacy)


_legacy_pickle_paths()

# Set while ``load`` rebuilds a model: the trunk weights then come from the saved state dict, so
# ``__init__`` must not fetch pretrained weights.
LOADING = contextvars.ContextVar("st_predict_loading", default=False)


def check_save_format(saved: Mapping, path: str) -> int:
    """The save format of a loaded ``model.pt``; refuses one this release cannot read, naming both
    versions."""
    from st_predict import __version__

    attrs = saved.get("attr_dict", {}) if isinstance(saved, Mapping) else {}
    if not isinstance(saved, Mapping) or "model_state_dict" not in saved or not isinstance(attrs, Mapping):
        raise InputError(f"{path} is not an st_predict saved model (no model_state_dict / attr_dict).")
    fmt = attrs.get("save_format_", 1)
    by = attrs.get("st_predict_version_", "an st_predict release that did not record its version")
    if not isinstance(fmt, int) or fmt > SAVE_FORMAT:
        raise InputError(
            f"{path} has save format {fmt!r}, written by st_predict {by}; this release (st_predict "
            f"{__version__}) reads formats up to {SAVE_FORMAT}. Upgrade st_predict to load it."
        )
    return fmt


class SaveLoadMixin:
    """``save`` and ``load`` of an NH2ST model (see :meth:`scvi.model.base.BaseModelClass.save`)."""

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
            raise InputError(f"{target} already exists and is not a folder.")
        if os.path.isdir(target) and os.listdir(target) and not overwrite:
            raise InputError(f"{target} already exists and holds files; pass overwrite=True to replace the saved model.")
        self.save_format_ = SAVE_FORMAT
        self.st_predict_version_ = __version__
        with staged_folder(target, last=f"{prefix or ''}model.pt") as staging:
            super().save(str(staging), prefix=prefix, overwrite=True, save_anndata=save_anndata, **kwargs)

    @classmethod
    def load(
        cls,
        dir_path: str,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        encoder: torch.nn.Module | None = None,
        encoder_weights: str | os.PathLike | None = None,
        **kwargs,
    ):
        """Load a model saved with :meth:`save` (by this release, or an earlier one whose save format
        it reads).

        Parameters
        ----------
        dir_path
            Folder given to :meth:`save` (or the ``model.pt`` file in it).
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
        encoder
            The module instance, for a model trained with a user encoder module (its weights come from
            the saved model).
        encoder_weights
            Where the encoder's weights are on this machine, when not where they were at training
            (a frozen hub or registry encoder is rebuilt, not read from the model file). The
            weights must be those the model was trained with: their digest is checked.
        """
        from ._runtime import check_accelerator

        check_accelerator(accelerator)
        name = f"{prefix or ''}model.pt"
        if os.path.isfile(dir_path) and os.path.basename(os.fspath(dir_path)) == name:
            dir_path = os.path.dirname(os.path.abspath(dir_path))  # the model file itself: its folder is the model
        path = os.path.join(dir_path, name)
        if not os.path.isfile(path):
            raise MissingFileError(f"No saved NH2ST model at {path}" + (
                ": pass the folder that save() wrote, not a file in it." if os.path.isfile(dir_path) else "."))
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise InputError(
                f"{path} is not a readable saved model (truncated or corrupted?): {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}"
            ) from err
        check_save_format(saved, path)
        init = saved["attr_dict"].get("init_params_", {})
        if "network" not in init.get("non_kwargs", {}) and "model_kwargs" not in init.get("kwargs", {}):
            raise InputError(
                f"{path} was saved by an older st_predict whose NH2ST had no recipes; this release cannot "
                "rebuild its network. Retrain it with this release."
            )
        train_vars = pd.Index(np.asarray(saved["var_names"]).astype(str))
        model_genes = saved["attr_dict"]["genes_"]
        predict_only = None
        if adata is not None and adata.n_vars == 0:
            predict_only, load_arg = adata, False
        elif adata is not None:
            have = pd.Index(adata.var_names.astype(str))
            if not have.equals(train_vars):
                missing = [g for g in model_genes if g not in have]
                raise InputError(
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
        token = LOADING.set(True)
        given = ENCODER_OVERRIDE.set({"encoder": encoder, "encoder_weights": encoder_weights})
        try:
            with quiet_logger("scvi"):  # scvi-tools logs "File ... already downloaded" on every load
                model = super().load(dir_path, adata=load_arg, accelerator=accelerator, device=device, prefix=prefix,
                                     **kwargs)
        finally:
            ENCODER_OVERRIDE.reset(given)
            LOADING.reset(token)
        check_encoder_digest(model)
        model._predict_adata = predict_only
        return model
