"""Training machinery for NH2ST (pure torch + Lightning: no AnnData, no scvi-tools)."""

from ._data import AUGMENTATIONS, NH2STCollate, NH2STDataModule, SectionBatchSampler, even_batches
from ._embed import compute_fmaps
from ._recipes import RECIPES, Recipe, get_recipe
from ._split import split_validation
from ._trainingplan import BestEpoch, NH2STTrainingPlan, mean_gene_pcc

__all__ = [
    "AUGMENTATIONS",
    "RECIPES",
    "BestEpoch",
    "NH2STCollate",
    "NH2STDataModule",
    "NH2STTrainingPlan",
    "Recipe",
    "SectionBatchSampler",
    "compute_fmaps",
    "even_batches",
    "get_recipe",
    "mean_gene_pcc",
    "split_validation",
]
