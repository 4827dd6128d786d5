"""Training machinery for NH2ST (pure torch + Lightning: no AnnData, no scvi-tools): the training settings,
the Lightning training plan and its callbacks, and the trunk's feature maps for a cache.

:class:`TrainingSettings` and its value lists are pure Python (the command line reads them without torch);
the rest loads Lightning on first use."""

from st_predict._utils import lazy_exports

from ._config import AUGMENTATIONS, BATCHES, OPTIMIZERS, RECIPE, SCHEDULES, TrainingSettings

_LAZY = {
    "BestEpoch": "._trainingplan", "EpochCheckpoint": "._trainingplan", "NH2STTrainingPlan": "._trainingplan", "RNGStates": "._trainingplan",
    "mean_gene_pcc": "._trainingplan", "BinTrainingPlan": "._bins", "compute_fmaps": "._embed", "EpochLog": "._epoch_log",
    # where these were before they moved (st_predict.dataloaders, st_predict.nn, st_predict.model)
    "NH2STCollate": "st_predict.dataloaders", "NH2STDataModule": "st_predict.dataloaders",
    "SectionBatchSampler": "st_predict.dataloaders", "even_batches": "st_predict.dataloaders",
    "split_validation": "st_predict.dataloaders", "random_dihedral": "st_predict.nn", "stain_jitter": "st_predict.nn",
    "RECIPES": "st_predict.model", "Recipe": "st_predict.model", "get_recipe": "st_predict.model",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, eager=globals())

__all__ = [
    "AUGMENTATIONS",
    "BATCHES",
    "OPTIMIZERS",
    "RECIPE",
    "SCHEDULES",
    "BestEpoch",
    "BinTrainingPlan",
    "EpochCheckpoint",
    "EpochLog",
    "NH2STTrainingPlan",
    "RNGStates",
    "TrainingSettings",
    "compute_fmaps",
    "mean_gene_pcc",
]
