"""Training machinery for NH2ST (pure torch + Lightning: no AnnData, no scvi-tools)."""

from st_predict._imaging import random_dihedral, stain_jitter
from st_predict._settings import AUGMENTATIONS as _AUGMENTATIONS
from st_predict._settings import RECIPES as _RECIPES
from st_predict._settings import Recipe, TrainingSettings, get_recipe

from ._data import NH2STCollate, NH2STDataModule, SectionBatchSampler, even_batches
from ._embed import compute_fmaps
from ._epoch_log import EpochLog
from ._split import split_validation
from ._trainingplan import BestEpoch, EpochCheckpoint, NH2STTrainingPlan, mean_gene_pcc

#: The named recipes (:class:`Recipe`) by name: ``"default"`` and ``"paper"``.
RECIPES = _RECIPES
#: ``augment`` values (:class:`TrainingSettings`, :class:`NH2STCollate`): ``"none"``, ``"dihedral"``,
#: ``"dihedral+stain"``.
AUGMENTATIONS = _AUGMENTATIONS

__all__ = [
    "AUGMENTATIONS",
    "RECIPES",
    "BestEpoch",
    "EpochCheckpoint",
    "EpochLog",
    "NH2STCollate",
    "NH2STDataModule",
    "NH2STTrainingPlan",
    "Recipe",
    "SectionBatchSampler",
    "TrainingSettings",
    "compute_fmaps",
    "even_batches",
    "get_recipe",
    "mean_gene_pcc",
    "random_dihedral",
    "split_validation",
    "stain_jitter",
]
